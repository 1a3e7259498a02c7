"""Streaming answers: server-sent events (SSE), for both the native and the OpenAI streams.

`EngineBatch` submits one engine request per prompt, all at once, so every validation error and a full
queue (503) surface before the first byte is sent; then it yields the requests' StreamDeltas and results
as they come. Closing the iteration (the client went away) cancels the requests, which frees their KV
slots at the engine's next step.

The native stream (`POST /invocations` with `"stream": true`, or with `Accept: text/event-stream` and no
`"stream": false`) sends one event per new piece of text of each sequence:

    data: {"index": 0, "text": "...", "finish_reason": null}

`finish_reason` is "stop" or "length" on a sequence's last event. For the current request format the
first event of each sequence starts with the prompt, so the texts of sequence i concatenate to the i-th
string of the non-streamed answer. A last event carries that whole answer:

    event: done
    data: {"outputs": <the non-streamed JSON answer>, "usage": {"prompt_tokens": P, "completion_tokens": C}}

(`usage` counts tokens: the prompt's, and those generated over all sequences; a v1 `"test": true`
request, which runs no model, has none.)

An error after the stream began ends it with `event: error` and the usual `{"error": {...}}` object.
Text is split only between characters, never inside a multi-byte one (the engine's incremental decoder
holds back an unfinished character, and a tail that could begin a stop string).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gpt2serve.api.content import media_type
from gpt2serve.api.errors import describe, speaking
from gpt2serve.api.protocol import V1_TEST_OUTPUT, SeedRequest, V1Request, parse_request
from gpt2serve.api.state import ServerState
from gpt2serve.engine.engine import Engine
from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.request import GenerationResult, StreamDelta

SSE_MEDIA_TYPE = "text/event-stream"
DONE = b"data: [DONE]\n\n"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(data: Any, event: str | None = None) -> bytes:
    """One SSE event; `data` is written as one line of compact JSON."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class SSEResponse(StreamingResponse):
    """A chunked `text/event-stream` answer that always closes its body iterator, so an abandoned
    stream releases its engine requests at once (not when the iterator is garbage-collected)."""

    def __init__(self, chunks: AsyncIterator[bytes], headers: dict[str, str] | None = None,
                 media_type: str = SSE_MEDIA_TYPE):  # fmt: skip
        super().__init__(chunks, headers={**STREAM_HEADERS, **(headers or {})}, media_type=media_type)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


class EngineBatch:
    """Engine requests for several prompts with the same parameters: all are queued, or none is."""

    def __init__(
        self,
        engine: Engine,
        prompts: list[str],
        params: SamplingParams,
        stream: bool,
        prompt_ids: list[list[int]] | None = None,
    ):
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.requests: list = []
        self.results: list[GenerationResult | None] = [None] * len(prompts)
        try:
            for k, prompt in enumerate(prompts):
                ids = None if prompt_ids is None else prompt_ids[k]
                self.requests.append(engine.submit(prompt, params, self._sink(loop, k), stream, ids))
        except BaseException:
            self.cancel()
            raise

    @classmethod
    async def open(
        cls, engine: Engine, prompts: list[str], params: SamplingParams, stream: bool
    ) -> EngineBatch:
        """The batch, its prompts tokenized off the event loop first."""
        ids = [await engine.encode_async(p) if p else [] for p in prompts]
        return cls(engine, prompts, params, stream, ids)

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


def wants_stream(accept: str | None, body: Any) -> bool:
    """A JSON body with `"stream": true`, or `Accept: text/event-stream` unless the body says
    `"stream": false`."""
    flag = body.get("stream") if isinstance(body, dict) else None
    if flag is not None:
        return flag is True
    for item in (accept or "").split(","):
        kind, params = media_type(item)
        if kind == SSE_MEDIA_TYPE and params.get("q", "1") not in ("0", "0.0", "0.00", "0.000"):
            return True
    return False


async def open_native_stream(state: ServerState, body: Any) -> AsyncIterator[bytes]:
    """Validate a native request and queue it; return its SSE events. Raises (before anything is sent)
    what the non-streamed request would: APIError, ValidationError, InvalidParameterError, overload."""
    req = parse_request(body)
    with speaking(req.names):
        params = req.to_params()
        if isinstance(req, V1Request) and req.test:
            return _canned(req)
        batch = await EngineBatch.open(state.require_engine(), [req.input], params, stream=True)
    prefix = req.input if isinstance(req, SeedRequest) else ""
    return _native_events(batch, params, prefix, req.answer)


async def _native_events(
    batch: EngineBatch, params: SamplingParams, prefix: str, answer: Callable[[GenerationResult], Any]
) -> AsyncIterator[bytes]:
    started: set[int] = set()
    # Greedy decoding runs one sequence for n identical answers: its pieces go to every index.
    copies = params.n if params.is_greedy else 1
    try:
        async for _, item in batch.items():
            if isinstance(item, GenerationResult):
                yield sse_event({"outputs": answer(item), "usage": usage(item)}, event="done")
                continue
            for i in range(copies) if copies > 1 else (item.index,):
                text = item.text if i in started else prefix + item.text
                started.add(i)
                if text or item.finish_reason:
                    yield sse_event({"index": i, "text": text, "finish_reason": item.finish_reason})
    finally:
        batch.cancel()  # at once, even when closed while suspended at a `yield`


def usage(result: GenerationResult) -> dict[str, int]:
    """Token counts of a finished request (every sequence's generated tokens summed)."""
    return {"prompt_tokens": len(result.prompt_token_ids), "completion_tokens": result.completion_tokens}


async def _canned(req: V1Request) -> AsyncIterator[bytes]:
    """A v1 `"test": true` request streamed: the canned sample, no model run."""
    for i in range(req.num_return_sequences):
        yield sse_event({"index": i, "text": V1_TEST_OUTPUT, "finish_reason": "stop"})
    yield sse_event({"outputs": req.answer(None)}, event="done")


async def with_error_event(chunks: AsyncIterator[bytes], request_id: str = "-") -> AsyncIterator[bytes]:
    """`chunks`, ended by an `event: error` SSE event if they fail after the stream began."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:
        yield sse_event(describe(exc, request_id).body, event="error")
    finally:
        await chunks.aclose()


async def native_sse_response(state: ServerState, body: Any, request_id: str = "-") -> SSEResponse:
    """The streamed answer to a native request (see the module docstring)."""
    return SSEResponse(with_error_event(await open_native_stream(state, body), request_id))
