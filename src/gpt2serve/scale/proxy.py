"""Ray Serve proxy middleware: a request that a dying replica dropped unanswered goes to another replica.

Runs in Ray Serve's HTTP proxy, which takes its middlewares from the function named by the environment
variable `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` of the proxy's process: `proxy_middlewares` here
(`serve --ray` sets it for the local Ray instance it starts; a cluster's head must be started with it).
When a replica dies with
requests in flight (its process killed, its node lost), Ray's proxy ends those requests without an answer
(it would send a bare 500). This middleware holds each request's body (up to the server's body limit)
and, when no answer has begun, sends the request again, to whichever replica the router picks now, up
to `tries` times; after that, or for a body too large to hold, the caller gets the 503 envelope with
`Retry-After`. An answer once begun is never retried: a stream cut by a dying replica just ends (without
its `done` event). The replicas' own errors (4xx, 503, 504, a 500 envelope) are answers, passed on.
Generation has no side effects beyond per-replica counters, so sending a request twice is harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

RETRY_TRIES = 3
RETRY_BACKOFF_S = 0.2
RETRY_AFTER_S = 1
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "gpt2serve.scale.proxy.proxy_middlewares"
BODY_LIMIT_ENV = "GPT2SERVE_PROXY_MAX_BODY_BYTES"  # the largest body held for a retry
DEFAULT_BODY_LIMIT = 6 * 2**20


def proxy_middlewares() -> list:
    """The Ray Serve proxy's middlewares (Ray calls this in the proxy's process)."""
    from starlette.middleware import Middleware

    limit = int(os.environ.get(BODY_LIMIT_ENV) or DEFAULT_BODY_LIMIT)
    return [Middleware(RetryUnansweredMiddleware, max_body_bytes=limit)]


def unavailable_body() -> bytes:
    message = "the replica serving this request stopped before answering; retry"
    error = {"message": message, "type": "service_unavailable", "param": None, "code": None}
    return json.dumps({"error": error}).encode()


async def read_body(receive: Receive, limit: int) -> tuple[list[Message], bool]:
    """The request's body messages, up to `limit` bytes; and whether it all fits (then it can be replayed)."""
    messages: list[Message] = []
    size = 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, False  # the client left
        size += len(message.get("body", b""))
        if size > limit:
            return messages, False
        if not message.get("more_body", False):
            return messages, True


class RetryUnansweredMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, tries: int = RETRY_TRIES):
        self.app, self.max_body_bytes, self.tries = app, max_body_bytes, tries

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held, replayable = await read_body(receive, self.max_body_bytes)
        left = {"client": False}
        for attempt in range(self.tries if replayable else 1):
            if attempt:
                logger.warning("%s %s: no answer from its replica; retry %d", scope["method"], scope["path"],
                               attempt)  # fmt: skip
                await asyncio.sleep(RETRY_BACKOFF_S * attempt)
            if await self._attempt(scope, list(held), receive, send, left):
                return
            if left["client"]:
                return
        await self._unavailable(send)

    async def _attempt(
        self, scope: Scope, held: list[Message], receive: Receive, send: Send, left: dict
    ) -> bool:
        """One pass through Ray's proxy; whether an answer began."""
        started = False

        async def replay() -> Message:
            message = held.pop(0) if held else await receive()
            if message["type"] == "http.disconnect":
                left["client"] = True
            return message

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, replay, watch)
        except Exception:
            if started:
                raise
            logger.warning("a request ended without an answer", exc_info=True)
        return started

    async def _unavailable(self, send: Send) -> None:
        body = unavailable_body()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"retry-after", str(RETRY_AFTER_S).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})
