"""The OpenAI legacy completions request (`POST /v1/completions`) and the `text_completion` objects
that answer it, streamed or not.

Documented choices:
- `model` may name anything (or be left out): there is one served model, and answers name it.
- `temperature` 0 is greedy decoding; otherwise sampling with `temperature` and `top_p` (and `top_k`,
  an extension; 0 or -1: off). `presence_penalty` / `frequency_penalty` are OpenAI's penalties.
- `max_tokens` (default 16) is cut to what fits the model's context after the prompt.
- `best_of` is accepted when it equals `n` (or is absent); `best_of` > `n` is refused.
- `suffix` (insertion) and a non-empty `logit_bias` are refused with 400; `user` is accepted and ignored.
- `prompt` is a string or a list of strings; token-id prompts are refused. Choice `prompt_idx * n + i` is
  the i-th completion of prompt `prompt_idx`.
- `logprobs` (0-5) gives OpenAI's legacy object: `tokens`, `token_logprobs`, `top_logprobs` (the
  `logprobs` most likely tokens at each position; empty for 0), `text_offset`. A token that is only part of a
  multi-byte character is shown as `bytes:\\xNN...`. With `echo`, the prompt's tokens are listed with
  `null` log-probabilities (prompt scoring is not computed). The end-of-text token is not listed.
  `logprobs` with `stream` is refused.
- `seed` is an integer in [0, 2^63 - 1]; leave it out for unseeded sampling (OpenAI has no "no seed"
  value, so -1 is refused like any other negative seed).
"""

from __future__ import annotations

import time
import uuid
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict

from gpt2serve.api.errors import APIError
from gpt2serve.engine.errors import InvalidParameterError
from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.request import CompletionOutput, GenerationResult
from gpt2serve.engine.tokenizer import IncrementalDecoder, Tokenizer

DEFAULT_MAX_TOKENS = 16
MAX_TEMPERATURE = 2.0
# The engine's field names -> OpenAI's, for its error messages (see api/errors.renamed).
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "max_length": "max_tokens"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: Any = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = None
    echo: bool | None = False
    stop: str | list[str] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    suffix: str | None = None

    @property
    def prompts(self) -> list[str]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            return list(p)
        if isinstance(p, list) and p and all(isinstance(x, (int, list)) for x in p):
            raise APIError(400, "token-id prompts are not supported; send `prompt` as text", param="prompt")
        raise APIError(400, "`prompt` must be a string or a non-empty list of strings", param="prompt")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_params(self) -> SamplingParams:
        self._refuse_unsupported()
        n = 1 if self.n is None else self.n
        t = 1.0 if self.temperature is None else self.temperature
        if not 0 <= t <= MAX_TEMPERATURE:
            message = f"`temperature` must be in [0, {MAX_TEMPERATURE:g}] (0: greedy), got {t!r}"
            raise InvalidParameterError("temperature", message)
        max_tokens = DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        top_k = 0 if self.top_k in (None, -1) else self.top_k
        return SamplingParams(
            do_sample=t > 0,
            temperature=t if t > 0 else 1.0,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=top_k,
            n=n,
            max_new_tokens=max_tokens,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            stop=stop,
            seed=self.seed,
            logprobs=self.logprobs,
        )

    def _refuse_unsupported(self) -> None:
        if self.suffix:
            raise APIError(400, "`suffix` is not supported: GPT-2 cannot insert text", param="suffix")
        if self.logit_bias:
            raise APIError(400, "`logit_bias` is not supported", param="logit_bias")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise APIError(
                400, f"`best_of` must equal `n` ({self.n or 1}): choosing the best of more completions "
                "is not supported", param="best_of",
            )  # fmt: skip
        if self.stream and self.logprobs is not None:
            message = "`logprobs` is not supported with `stream`; ask without streaming"
            raise APIError(400, message, param="logprobs")


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def envelope(cid: str, created: int, model: str, choices: list[dict]) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}


def usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(len(r.prompt_token_ids) for r in results)
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(
    req: CompletionRequest, results: list[GenerationResult], model: str, tokenizer: Tokenizer
) -> dict[str, Any]:
    """The whole `text_completion` answer."""
    n = req.n or 1
    choices = []
    for k, result in enumerate(results):
        for out in result.outputs:
            prefix = result.prompt if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = legacy_logprobs(result, out, tokenizer, bool(req.echo))
            choices.append({
                "text": prefix + out.text, "index": k * n + out.index, "logprobs": logprobs,
                "finish_reason": out.finish_reason,
            })  # fmt: skip
    body = envelope(completion_id(), int(time.time()), model, choices)
    body["usage"] = usage(results)
    return body


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: vocabulary character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token as OpenAI lists it: its text, or `bytes:\\xNN` when it is not whole characters."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text
    piece = tokenizer.id_to_token(token_id) or ""
    decoder = _byte_decoder()
    raw = bytes(decoder[c] for c in piece if c in decoder)
    return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _offsets(tokenizer: Tokenizer, context: list[int], ids: list[int], start: int) -> list[int]:
    """Character offset of each token of `ids` in the text, which begins at `start`."""
    decoder, offsets, at = IncrementalDecoder(tokenizer, context), [], start
    for t in ids:
        offsets.append(at)
        at += len(decoder.push(t))
    return offsets


def legacy_logprobs(
    result: GenerationResult, out: CompletionOutput, tokenizer: Tokenizer, echo: bool
) -> dict[str, list]:
    """OpenAI's legacy `logprobs` object of one choice."""
    picked = (out.logprobs or [])[: len(out.token_ids)]
    ids = [lp.token_id for lp in picked]
    tokens = [token_text(tokenizer, t) for t in ids]
    token_logprobs: list[float | None] = [lp.logprob for lp in picked]
    top: list[dict[str, float] | None] = [{token_text(tokenizer, t): v for t, v in lp.top} for lp in picked]
    prompt_ids = result.prompt_token_ids
    offsets = _offsets(tokenizer, prompt_ids, ids, len(result.prompt) if echo else 0)
    if echo:
        tokens = [token_text(tokenizer, t) for t in prompt_ids] + tokens
        token_logprobs = [None] * len(prompt_ids) + token_logprobs
        top = [None] * len(prompt_ids) + top
        offsets = _offsets(tokenizer, [], prompt_ids, 0) + offsets
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
