"""SamplingParams: one validated object describing how to decode a request.

Semantics follow Hugging Face `generate()`: logits processors (repetition penalty, n-gram ban), then
temperature -> top-k -> top-p. Errors name these fields (`n`, `max_new_tokens`, `prompt` ...); each API
renames them into its own words when it answers (see `gpt2serve.api.errors.renamed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from gpt2serve.engine.errors import InvalidParameterError

MAX_RETURN_SEQUENCES = 16
MAX_BEAMS = 16
MAX_STOP_STRINGS = 8
MAX_SEED = 2**63 - 1
DEFAULT_NEW_TOKENS = 16  # tokens generated when neither max_new_tokens nor max_length is given
# Float32 logits are divided by the temperature and by (or multiplied with) the repetition penalty: outside
# these bounds that overflows to inf or flattens every logit to 0, and a NaN row cannot be drawn from.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-5, 1e5
MIN_PENALTY, MAX_PENALTY = 1e-5, 1e5


def require(ok: bool, param: str, message: str) -> None:
    """Raise InvalidParameterError(param, message) unless `ok`."""
    if not ok:
        raise InvalidParameterError(param, message)


def _require_float32_range(v: object, param: str, low: float, high: float) -> None:
    require(
        _is_number(v) and low <= v <= high,
        param,
        f"`{param}` must be a number in [{low:g}, {high:g}] (beyond it float32 logits overflow or flatten), "
        f"got {v!r}",
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request. Construct it and it is validated; invalid values raise
    `InvalidParameterError` naming the field, the allowed range and the given value."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    num_beams: int = 1
    n: int = 1  # sequences returned (num_return_sequences)
    max_new_tokens: int | None = None
    max_length: int | None = None  # counts the prompt's tokens, as in HF generate
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_at_eos: bool = True
    seed: int | None = None
    logprobs: int | None = None  # return the top-`logprobs` alternatives per token (OpenAI)
    early_stopping: bool = True

    def __post_init__(self) -> None:
        self._validate()

    def replace(self, **changes: object) -> SamplingParams:
        return replace(self, **changes)

    # -- validation --------------------------------------------------------------------------------
    def _validate(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        _require_float32_range(t, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE)
        require(_is_int(k) and k >= 0, "top_k", f"`top_k` must be an integer >= 0, got {k!r}")
        require(_is_number(p) and 0 < p <= 1, "top_p", f"`top_p` must be in (0, 1], got {p!r}")
        b = self.num_beams
        require(
            _is_int(b) and 1 <= b <= MAX_BEAMS,
            "num_beams",
            f"`num_beams` must be in [1, {MAX_BEAMS}], got {b!r}",
        )
        n = self.n
        require(
            _is_int(n) and 1 <= n <= MAX_RETURN_SEQUENCES,
            "n",
            f"`n` must be in [1, {MAX_RETURN_SEQUENCES}], got {n!r}",
        )
        if b > 1:
            require(n <= b, "n", f"`n` must be <= num_beams ({b}) in beam mode, got {n}")
            require(not self.do_sample, "num_beams", "beam search with sampling is not supported")
        for name in ("max_new_tokens", "max_length"):
            v = getattr(self, name)
            require(
                v is None or (_is_int(v) and v >= 1), name, f"`{name}` must be an integer >= 1, got {v!r}"
            )
        _require_float32_range(self.repetition_penalty, "repetition_penalty", MIN_PENALTY, MAX_PENALTY)
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            require(_is_number(v) and -2 <= v <= 2, name, f"`{name}` must be in [-2, 2], got {v!r}")
        ng = self.no_repeat_ngram_size
        require(
            _is_int(ng) and ng >= 0,
            "no_repeat_ngram_size",
            f"`no_repeat_ngram_size` must be an integer >= 0, got {ng!r}",
        )
        self._validate_stop_and_seed()

    def _validate_stop_and_seed(self) -> None:
        stop = self.stop
        require(
            isinstance(stop, tuple) and all(isinstance(s, str) and s for s in stop),
            "stop",
            f"`stop` must be a list of non-empty strings, got {stop!r}",
        )
        require(
            len(stop) <= MAX_STOP_STRINGS,
            "stop",
            f"`stop` may hold at most {MAX_STOP_STRINGS} strings, got {len(stop)}",
        )
        s = self.seed
        require(
            s is None or (_is_int(s) and 0 <= s <= MAX_SEED),
            "seed",
            f"`seed` must be an integer in [0, {MAX_SEED}], got {s!r}",
        )
        lp = self.logprobs
        require(
            lp is None or (_is_int(lp) and 0 <= lp <= 5),
            "logprobs",
            f"`logprobs` must be in [0, 5], got {lp!r}",
        )

    # -- per-request limits ------------------------------------------------------------------------
    def new_token_budget(self, prompt_len: int, context: int) -> int:
        """How many tokens to generate for a prompt of `prompt_len` tokens in a `context`-token model."""
        require(prompt_len >= 1, "prompt", "`prompt` must not be empty")
        require(
            prompt_len < context,
            "prompt",
            f"`prompt` is {prompt_len} tokens; the model's context is {context}, "
            f"so it must be at most {context - 1}",
        )
        room = context - prompt_len
        if self.max_length is not None:
            require(
                self.max_length <= context,
                "max_length",
                f"`max_length` must be <= {context} (the model's context), got {self.max_length}",
            )
            require(
                self.max_length > prompt_len,
                "max_length",
                f"`max_length` counts the prompt's tokens: it must be greater than the prompt's "
                f"{prompt_len} tokens, got {self.max_length}",
            )
            budget = self.max_length - prompt_len
        elif self.max_new_tokens is not None:
            require(
                self.max_new_tokens <= context,
                "max_new_tokens",
                f"`max_new_tokens` must be <= {context} (the model's context), got {self.max_new_tokens}",
            )
            budget = self.max_new_tokens
        else:
            budget = DEFAULT_NEW_TOKENS
        return min(budget, room)

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample and self.num_beams == 1

    @property
    def is_beam(self) -> bool:
        return self.num_beams > 1
