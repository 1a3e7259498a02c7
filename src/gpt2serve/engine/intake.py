"""A request's way into the engine: its prompt tokenized within the server's limits, its parameters
checked against them and the model's context, and the `Request` the scheduler queues."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.errors import InvalidParameterError
from gpt2serve.engine.params import SamplingParams, require
from gpt2serve.engine.request import Request
from gpt2serve.engine.tokenizer import Tokenizer
from gpt2serve.engine.usage import current_meter, metered

if TYPE_CHECKING:
    import torch

INLINE_ENCODE_CHARS = 4096  # prompts up to this long are tokenized in the caller's thread (< 1 ms)


class Intake:
    """Turns (prompt, SamplingParams, sink) into a validated Request, or InvalidParameterError."""

    def __init__(self, tokenizer: Tokenizer, context: int, config: EngineConfig, device: torch.device):
        self.tokenizer, self.context, self.config, self.device = tokenizer, context, config, device

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.config.max_prompt_tokens or self.context - 1, self.context - 1)

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, or InvalidParameterError naming the limit. A prompt longer than the
        limit can hold (every token covers at most `max_token_chars` characters) is refused before
        tokenizing it."""
        limit = self.max_prompt_tokens
        most = limit * self.tokenizer.max_token_chars
        require(
            len(prompt) <= most,
            "prompt",
            f"`prompt` is {len(prompt)} characters: more than the {limit} tokens this server takes can hold "
            f"(at most {most} characters)",
        )
        try:
            ids = self.tokenizer.encode(prompt)
        except (TypeError, ValueError) as exc:  # e.g. a lone surrogate, which UTF-8 cannot encode
            raise InvalidParameterError("prompt", f"`prompt` cannot be tokenized: {exc}") from None
        context = self.context
        why = f" (the model's context is {context})" if limit == context - 1 else " (--max-prompt-tokens)"
        require(len(ids) <= limit, "prompt", f"`prompt` is {len(ids)} tokens; at most {limit}{why}")
        return ids

    async def encode_async(self, prompt: str) -> list[int]:
        """`encode` off the event loop for a long prompt (tokenizing 100k characters takes ~40 ms)."""
        if len(prompt) <= INLINE_ENCODE_CHARS:
            return self.encode(prompt)
        return await asyncio.to_thread(self.encode, prompt)

    def request(
        self,
        prompt: str,
        params: SamplingParams,
        sink: Callable[[object], None],
        stream: bool,
        prompt_ids: list[int] | None,
        deadline: float | None,
    ) -> Request:
        """The Request to queue (see `Engine.submit` for the arguments)."""
        longest = self.config.max_stop_length
        for stop in params.stop:
            require(
                len(stop) <= longest,
                "stop",
                f"a `stop` string may be at most {longest} characters, got one of {len(stop)}",
            )
        if prompt_ids is None:
            prompt_ids = self.encode(prompt) if prompt else []
        budget = params.new_token_budget(len(prompt_ids), self.context)
        if deadline is None and self.config.request_timeout_s is not None:
            deadline = time.monotonic() + self.config.request_timeout_s
        meter = current_meter.get()  # the caller's, where the HTTP layer meters its key's usage
        if meter is not None:
            sink = metered(sink, meter)
        return Request(prompt, prompt_ids, params, budget, sink, stream, deadline, self.device)
