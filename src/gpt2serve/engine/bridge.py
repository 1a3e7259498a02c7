"""The one bridge from asyncio code into the engine thread.

`EngineBatch` submits one engine request per prompt, all at once, so every validation error and a full
queue surface before anything runs (and before a stream sends its first byte); then it yields the
requests' StreamDeltas and results as the engine thread hands them over. Leaving the iteration early (a
client went away) cancels the requests, which frees their KV slots at the engine's next step.
The HTTP routes and the batch command all go through it (`generate`: one prompt's result); `generate_sync`
is the same wait for a caller on a plain thread (the CLI, benchmarks).
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.request import GenerationResult, Request, StreamDelta

if TYPE_CHECKING:
    from gpt2serve.engine.engine import Engine


class EngineBatch:
    """Engine requests for several prompts with the same parameters: all are queued, or none is."""

    def __init__(
        self,
        engine: Engine,
        prompts: list[str],
        params: SamplingParams,
        stream: bool,
        prompt_ids: list[list[int]] | None = None,
        deadline: float | None = None,
    ):
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.requests: list[Request] = []
        self.results: list[GenerationResult | None] = [None] * len(prompts)
        try:
            for k, prompt in enumerate(prompts):
                ids = None if prompt_ids is None else prompt_ids[k]
                sink = self._sink(loop, k)
                self.requests.append(engine.submit(prompt, params, sink, stream, ids, deadline))
        except BaseException:
            self.cancel()
            raise

    @classmethod
    async def open(
        cls,
        engine: Engine,
        prompts: list[str],
        params: SamplingParams,
        stream: bool,
        deadline: float | None = None,
    ) -> EngineBatch:
        """The batch, its prompts tokenized off the event loop first (where they are long)."""
        ids = [await engine.intake.encode_async(p) if p else [] for p in prompts]
        return cls(engine, prompts, params, stream, ids, deadline)

    def _sink(self, loop: asyncio.AbstractEventLoop, k: int) -> Callable[[object], None]:
        def sink(item: object) -> None:
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, (k, item))
            except RuntimeError:  # the event loop is gone: nobody will read this
                self.cancel()

        return sink

    async def items(self) -> AsyncIterator[tuple[int, StreamDelta | GenerationResult]]:
        """(prompt index, StreamDelta or GenerationResult) in arrival order; the first engine error is
        raised. Ends after every prompt's result; leaving early cancels what still runs."""
        pending = len(self.requests)
        try:
            while pending:
                k, item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, GenerationResult):
                    self.results[k] = item
                    pending -= 1
                yield k, item
        finally:
            self.cancel()

    async def wait(self) -> list[GenerationResult]:
        """Every prompt's result, in prompt order."""
        async for _ in self.items():
            pass
        return list(self.results)

    def cancel(self) -> None:
        for req in self.requests:
            req.cancel()


async def generate(
    engine: Engine, prompt: str, params: SamplingParams, deadline: float | None = None
) -> GenerationResult:
    """One request's result, awaited through an EngineBatch of one prompt."""
    batch = await EngineBatch.open(engine, [prompt], params, stream=False, deadline=deadline)
    (result,) = await batch.wait()
    return result


def generate_sync(engine: Engine, prompt: str, params: SamplingParams) -> GenerationResult:
    """One request's result, submitted and waited for on the calling thread (not an event loop's)."""
    q: queue.Queue = queue.Queue()
    req = engine.submit(prompt, params, q.put, stream=False)
    try:
        item = q.get()
    finally:
        req.cancel()
    if isinstance(item, BaseException):
        raise item
    return item
