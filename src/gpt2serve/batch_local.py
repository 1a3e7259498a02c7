"""Local answers for `gpt2serve batch`: one engine, loaded once, with many requests in flight.

The engine's decode loop batches whatever is in flight, so the job keeps `concurrency` requests
submitted (by default twice the KV slots, so the next requests are queued when one finishes).
"""

from __future__ import annotations

import asyncio
from typing import Any

from gpt2serve.api import openai_protocol as proto
from gpt2serve.api.errors import speaking
from gpt2serve.api.protocol import answer_request
from gpt2serve.batch import BatchOptions, FatalLineError, is_openai
from gpt2serve.engine import bridge
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.engine import Engine
from gpt2serve.engine.errors import EngineOverloadedError, EngineStoppedError
from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.request import GenerationResult


class LocalBatch:
    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def load(cls, options: BatchOptions) -> LocalBatch:
        queue = max(256, options.concurrency or 0)
        config = EngineConfig(
            device=options.device, dtype=options.dtype, max_batch_size=options.max_batch_size,
            max_queue=queue, request_timeout_s=None, threads=options.threads,
        )  # fmt: skip
        engine = Engine.load(options.model, config)
        engine.start()
        return cls(engine)

    def close(self) -> None:
        self.engine.stop()

    async def answer(self, body: Any) -> tuple[Any, int]:
        """The server's answer to one request, and the tokens it generated."""
        tokens = 0

        async def counted(prompt: str, params: SamplingParams) -> GenerationResult:
            nonlocal tokens
            result = await bridge.generate(self.engine, prompt, params)  # the job's one call into the engine
            tokens += result.completion_tokens
            return result

        try:
            if is_openai(body):
                return await self._completion(body, counted), tokens
            return await answer_request(body, counted), tokens
        except (EngineStoppedError, EngineOverloadedError) as exc:
            raise FatalLineError(str(exc)) from exc

    async def _completion(self, body: dict, counted) -> dict:
        """An OpenAI `text_completion`, as POST /v1/completions answers it (never streamed here)."""
        req = proto.CompletionRequest.model_validate(body)
        with speaking(proto.OPENAI_NAMES):
            prompts, params = req.prompts, req.to_params()
            results = await asyncio.gather(*(counted(p, params) for p in prompts))
        return proto.completion(req, list(results), self.engine.model_name, self.engine.tokenizer)
