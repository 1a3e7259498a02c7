"""Streaming answers: server-sent events (SSE), for both the native and the OpenAI streams.

Both stream formats run one loop, `text_pieces`, over the engine's asyncio bridge (`EngineBatch`, in
engine/bridge.py): every validation error and a full queue (503) surface before the first byte is sent;
closing the stream (the client went away) cancels the requests, which frees their KV slots at the
engine's next step.

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

import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gpt2serve.api.content import media_type
from gpt2serve.api.errors import describe, speaking
from gpt2serve.api.protocol import V1_TEST_OUTPUT, SeedRequest, V1Request, parse_request
from gpt2serve.api.state import ServerState
from gpt2serve.engine.bridge import EngineBatch
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


async def text_pieces(
    batch: EngineBatch, prefixes: list[str]
) -> AsyncIterator[tuple[int, StreamDelta | GenerationResult]]:
    """The one stream loop under both SSE formats: the batch's (prompt index, item) pairs, the first piece
    of each sequence's text led by its prompt's entry of `prefixes`, and pieces with neither text nor a
    finish reason left out. Closing it (a client went away) cancels the batch at once."""
    started: set[tuple[int, int]] = set()
    items = batch.items()
    try:
        async for k, item in items:
            if isinstance(item, StreamDelta):
                first = (k, item.index) not in started
                started.add((k, item.index))
                text = prefixes[k] + item.text if first else item.text
                if not (text or item.finish_reason):
                    continue
                item = StreamDelta(item.index, text, item.finish_reason)
            yield k, item
    finally:
        await items.aclose()
        batch.cancel()  # at once, even when closed while suspended at a `yield`


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
    return _native_events(batch, prefix, req.answer)


async def _native_events(
    batch: EngineBatch, prefix: str, answer: Callable[[GenerationResult], Any]
) -> AsyncIterator[bytes]:
    async with aclosing(text_pieces(batch, [prefix])) as pieces:
        async for _, item in pieces:
            if isinstance(item, GenerationResult):
                yield sse_event({"outputs": answer(item), "usage": usage(item)}, event="done")
            else:
                yield sse_event({"index": item.index, "text": item.text, "finish_reason": item.finish_reason})


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
