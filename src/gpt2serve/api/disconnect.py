"""Cancel a non-streamed generation when its HTTP client goes away.

Starlette does not cancel a handler whose client disconnected: a non-streamed request would generate to
the end for nobody. `until_disconnected(request, work)` runs `work` as a task and asks the server every
`POLL_S` seconds whether the client is still there (`Request.is_disconnected()` does not block); when it
is gone, the task is cancelled, which cancels its engine requests (their KV slots are freed at the
engine's next step), and `ClientDisconnectedError` is raised. Its answer (status 499, the "client closed
request" status some proxies log) is never delivered; it only shows in the access log and the metrics.

Call it after the request body has been read: an unread body would be consumed by the polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from gpt2serve.api.errors import APIError

T = TypeVar("T")
POLL_S = 0.25
CLIENT_CLOSED_STATUS = 499


class ClientDisconnectedError(APIError):
    def __init__(self) -> None:
        super().__init__(CLIENT_CLOSED_STATUS, "the client closed the connection", "client_closed_request")


async def until_disconnected(request: Request, work: Awaitable[T], poll_s: float = POLL_S) -> T:
    """`await work`, cancelled (with ClientDisconnectedError) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnectedError()
    finally:
        if not task.done():
            task.cancel()
            # Let it run its clean-up (engine requests cancelled) before going on.
            await asyncio.gather(task, return_exceptions=True)
