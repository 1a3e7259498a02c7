"""The two request formats of the SageMaker GPT-2 endpoint and their conversion to SamplingParams.

`SeedRequest` is the current format (docs/API.md §1): answered with a JSON array of strings, each the prompt
followed by its continuation. `V1Request` is the first-generation format (docs/API.md §2): answered with
`{"input": ..., "output": [continuations], "test": ...}`.

Documented choices:
- `seed` -1 (or absent) means "not seeded"; other seeds are in [0, 2^63 - 1].
- Types are checked strictly (a string "5" for an integer field is a 400 naming the field); ranges are
  checked by `SamplingParams` (InvalidParameterError naming the field).
- Unknown keys are ignored: SageMaker clients and tools may add their own.
- A body is served as v1 if it holds any of `length`, `k`, `p`, `stop_token`, `test`, or holds
  `repetition_penalty` without any key only the current format knows (`repetition_penalty` is also
  accepted by the current format). A body holding a v1-only key and a current-only key is refused.
- `greedy` with `num_return_sequences` N returns N identical strings (Hugging Face `generate` would
  refuse; greedy decoding has one answer, and the engine decodes it once).
- `max_new_tokens` (tokens to generate, prompt not counted) may replace `max_length`; given both, the
  request is refused as ambiguous.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from gpt2serve.api.errors import APIError, speaking
from gpt2serve.engine.errors import InvalidParameterError
from gpt2serve.engine.params import MAX_SEED, SamplingParams, require
from gpt2serve.engine.request import GenerationResult

# Runs one prompt: the engine's async bridge, or a caller's wrapper of it.
Generate = Callable[[str, SamplingParams], Awaitable[GenerationResult]]

V1_ONLY_KEYS = ("length", "k", "p", "stop_token", "test")
CURRENT_ONLY_KEYS = (
    "mode", "max_length", "max_new_tokens", "top_k", "top_p", "num_beams", "no_repeat_ngram_size", "stop",
    "stream",
)  # fmt: skip
DEFAULT_MAX_LENGTH = 100
SAMPLE_TOP_P_TOP_K = 50  # sample-top-p keeps HF generate's default top_k (50) under its top_p
# What a v1 request with "test": true gets instead of a generation.
V1_TEST_OUTPUT = " This is a test response from the GPT-2 text generation model; the model did not run."

# The fields of the current request each mode reads beyond the common ones (`input`, the lengths,
# `num_return_sequences`, `no_repeat_ngram_size`, `repetition_penalty`, `stop`); a sampling mode reads
# `seed`. The playground disables the others (tests/api/test_info.py checks this against to_params).
MODE_FIELDS: dict[str, tuple[str, ...]] = {
    "sample-top-p": ("top_p", "seed"),
    "sample-top-k": ("top_k", "seed"),
    "sample": ("temperature", "top_k", "top_p", "seed"),
    "beam": ("num_beams",),
    "greedy": (),
}

_STRICT = ConfigDict(strict=True, extra="ignore")

# The engine's field names -> each format's, for its error messages (see api/errors.renamed).
SEED_NAMES = {"n": "num_return_sequences", "prompt": "input"}
V1_NAMES = {**SEED_NAMES, "top_k": "k", "top_p": "p", "max_new_tokens": "length", "stop": "stop_token"}


class Mode(str, Enum):
    """The current format's decoding modes (docs/API.md §1)."""

    GREEDY = "greedy"
    BEAM = "beam"
    SAMPLE = "sample"
    SAMPLE_TOP_K = "sample-top-k"
    SAMPLE_TOP_P = "sample-top-p"

    @classmethod
    def parse(cls, value: object) -> Mode:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise InvalidParameterError("mode", f"`mode` must be one of {allowed}; got {value!r}") from None


def _seed(seed: int | None) -> int | None:
    """The seed API's rule: -1 (or absent) means "not seeded"."""
    if seed is None or seed == -1:
        return None
    message = f"`seed` must be an integer in [0, {MAX_SEED}] (or -1 for no seed), got {seed!r}"
    require(0 <= seed <= MAX_SEED, "seed", message)
    return seed


class SeedRequest(BaseModel):
    """The current request (docs/API.md §1)."""

    model_config = _STRICT
    names: ClassVar[dict[str, str]] = SEED_NAMES

    input: str = Field(description="text to be completed")
    max_length: int | None = Field(
        None, description="length limit in tokens, counting the prompt's (100 unless max_new_tokens is given)"
    )
    max_new_tokens: int | None = Field(None, description="tokens to generate, the prompt not counted")
    num_return_sequences: int = Field(3, description="how many completions to return")
    mode: str = Field("sample-top-p", description="sample-top-p | sample-top-k | sample | beam | greedy")
    top_p: float = Field(0.92, description="nucleus probability (sample, sample-top-p)")
    top_k: int = Field(50, description="top-k cut-off (sample, sample-top-k)")
    temperature: float = Field(0.7, description="logits temperature (sample)")
    num_beams: int = Field(5, description="beams in beam mode")
    # None: 2 in beam mode; in the other modes no n-gram ban unless the caller asks for one. The original
    # endpoint's beam mode used 2 (its documented default); applying it to sampling too would change
    # every sampled text, so there it applies only when given explicitly.
    no_repeat_ngram_size: int | None = Field(
        None, description="every n-gram of this size may occur only once (2 in beam mode, else off)"
    )
    seed: int | None = Field(None, description="seed for repeatable text; -1 or absent: not seeded")
    stop: str | list[str] | None = Field(None, description="cut the text before this string (repeatable)")
    repetition_penalty: float = Field(1.0, description="penalty for tokens already present (1.0: off)")
    stream: bool = False

    def to_params(self) -> SamplingParams:
        if self.max_length is not None and self.max_new_tokens is not None:
            raise InvalidParameterError(
                "max_new_tokens",
                "give either `max_length` (counting the prompt) or `max_new_tokens`, not both",
            )
        max_length = self.max_length
        if max_length is None and self.max_new_tokens is None:
            max_length = DEFAULT_MAX_LENGTH
        common = dict(
            n=self.num_return_sequences,
            max_length=max_length,
            max_new_tokens=self.max_new_tokens,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ()),
            repetition_penalty=self.repetition_penalty,
            seed=_seed(self.seed),
        )
        if self.no_repeat_ngram_size is not None:  # else the mode's (2 in beam mode, else off)
            common["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return SamplingParams(**{**self._mode_fields(), **common})

    def _mode_fields(self) -> dict[str, Any]:
        """The fields `mode` sets, from this request's values (its defaults are the API's)."""
        mode = Mode.parse(self.mode)
        if mode is Mode.GREEDY:
            return {"do_sample": False}
        if mode is Mode.BEAM:
            return {"num_beams": self.num_beams, "no_repeat_ngram_size": 2}
        if mode is Mode.SAMPLE:
            return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k,
                    "top_p": self.top_p}  # fmt: skip
        if mode is Mode.SAMPLE_TOP_K:
            return {"do_sample": True, "top_k": self.top_k}
        return {"do_sample": True, "top_k": SAMPLE_TOP_P_TOP_K, "top_p": self.top_p}

    def answer(self, result: GenerationResult) -> list[str]:
        """The prompt followed by each continuation. `text` is the decode of the generated ids in the
        prompt's context (special tokens skipped, cut before a stop string), and GPT-2's byte-level BPE
        round-trips text exactly, so this equals decoding prompt ids + generated ids."""
        return [result.prompt + out.text for out in result.outputs]


class V1Request(BaseModel):
    """The first-generation request (docs/API.md §2): always samples."""

    model_config = _STRICT
    names: ClassVar[dict[str, str]] = V1_NAMES

    input: str
    length: int = 50  # tokens to generate, the prompt not counted
    stop_token: str | None = None
    num_return_sequences: int = 1
    temperature: float = 1.0
    k: int = 50
    p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    test: bool = False

    def to_params(self) -> SamplingParams:
        return SamplingParams(
            do_sample=True,
            temperature=self.temperature,
            top_k=self.k,
            top_p=self.p,
            n=self.num_return_sequences,
            max_new_tokens=self.length,
            repetition_penalty=self.repetition_penalty,
            stop=(self.stop_token,) if self.stop_token else (),
            seed=_seed(self.seed),
        )

    def answer(self, result: GenerationResult | None) -> dict[str, Any]:
        """`result` None: the canned answer of a test request."""
        if result is None:
            output = [V1_TEST_OUTPUT] * self.num_return_sequences
        else:
            output = [out.text for out in result.outputs]
        return {"input": self.input, "output": output, "test": self.test}


def parse_request(body: Any) -> SeedRequest | V1Request:
    """Validate one decoded JSON body as the current or the first-generation request."""
    if not isinstance(body, dict):
        kind = {list: "an array", str: "a string"}.get(type(body), type(body).__name__)
        raise APIError(400, f"the request body must be a JSON object with an `input` field, got {kind}")
    v1_keys = [k for k in V1_ONLY_KEYS if k in body]
    current_keys = [k for k in CURRENT_ONLY_KEYS if k in body]
    if v1_keys and current_keys:
        raise APIError(
            400,
            f"the request mixes fields of the first-generation format ({', '.join(v1_keys)}) with fields of "
            f"the current format ({', '.join(current_keys)}); use one format",
            param=current_keys[0],
        )
    if v1_keys or ("repetition_penalty" in body and not current_keys):
        return V1Request.model_validate(body)
    return SeedRequest.model_validate(body)


async def answer_request(body: Any, generate: Generate) -> Any:
    """Validate one decoded JSON body, run it with `generate`, and shape the answer for its format."""
    req = parse_request(body)
    with speaking(req.names):
        params = req.to_params()
        if isinstance(req, V1Request) and req.test:
            return req.answer(None)
        return req.answer(await generate(req.input, params))
