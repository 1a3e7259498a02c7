"""ASGI middleware: a request id on every answer, the request body size limit and read deadline, one log
line per request (and one observation for the metrics).

Pure ASGI (no BaseHTTPMiddleware) so streamed answers pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2serve.api.errors import APIError, BodyTooLargeError, describe

access_log = logging.getLogger("gpt2serve.access")

REQUEST_ID_HEADER = "X-Request-Id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
QUIET_PATHS = ("/ping", "/health")  # polled every few seconds: logged at DEBUG unless they fail
# Called with (method, route path template or None, status, seconds) when an answer ends.
Observer = Callable[[str, str | None, int, float], None]


class BodyReadTimeoutError(APIError):
    def __init__(self, timeout_s: float):
        message = f"the request body did not arrive within {timeout_s:g} s of its headers"
        super().__init__(408, message, "timeout_error")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Tags each request with an id (the caller's X-Request-Id if it is sane, else a new one), sends it
    back as X-Request-Id, enforces `max_body_bytes` and `body_timeout_s` (the whole body must arrive
    within it of the headers: 408, and the connection is closed), turns an unhandled exception into the 500
    envelope and logs method, path, status and duration (and hands them to `observer`, if given)."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, observer: Observer | None = None,
        body_timeout_s: float | None = None,
    ):  # fmt: skip
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.observer = observer
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        request_id = given if given and _VALID_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = [0]  # 0: no answer started yet
        body_state = {"timed_out": False}

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = MutableHeaders(scope=message)
                headers.append(REQUEST_ID_HEADER, request_id)
                if body_state["timed_out"]:  # the rest of the body is not read: close the connection
                    headers["connection"] = "close"
            await send(message)

        try:
            if self._declared_too_large(scope):
                await describe(BodyTooLargeError(self.max_body_bytes)).response()(scope, receive, send_tagged)
                return
            await self.app(scope, self._limited(receive, body_state), send_tagged)
        except Exception as exc:
            if status[0]:  # the answer has begun: nothing better to send
                raise
            # Answer here rather than in Starlette's outer error middleware, so the 500 carries the
            # request id header too (describe() logs the traceback).
            await describe(exc, request_id).response()(scope, receive, send_tagged)
        finally:
            self._log(scope, status[0], started, request_id)
            if self.observer is not None:
                route = getattr(scope.get("route"), "path", None)  # set by the router on a match
                self.observer(scope.get("method", "-"), route, status[0], time.perf_counter() - started)

    def _declared_too_large(self, scope: Scope) -> bool:
        length = _header(scope, b"content-length")
        return length is not None and length.strip().isdigit() and int(length) > self.max_body_bytes

    def _limited(self, receive: Receive, body_state: dict[str, bool]) -> Receive:
        """`receive` that raises BodyTooLargeError once more than the limit has arrived (chunked bodies),
        and BodyReadTimeoutError when the body is not complete `body_timeout_s` after the headers."""
        seen = [0]
        timeout = self.body_timeout_s
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        complete = [False]

        async def limited() -> Message:
            if complete[0] or deadline is None:
                message = await receive()  # after the body: waits for a disconnect, with no deadline
            else:
                try:
                    left = deadline - asyncio.get_running_loop().time()
                    message = await asyncio.wait_for(receive(), max(left, 0.0))
                except TimeoutError:
                    body_state["timed_out"] = True
                    raise BodyReadTimeoutError(timeout) from None
            if message["type"] == "http.request":
                complete[0] = not message.get("more_body", False)
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body_bytes:
                    raise BodyTooLargeError(self.max_body_bytes)
            return message

        return limited

    @staticmethod
    def _log(scope: Scope, status: int, started: float, request_id: str) -> None:
        path = scope.get("path", "")
        level = logging.DEBUG if path in QUIET_PATHS and status < 400 else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        client = scope.get("client") or ("-", 0)
        ms = (time.perf_counter() - started) * 1000
        method = scope.get("method", "-")
        access_log.log(level, "%s %s %s %d %.1fms id=%s", client[0], method, path, status, ms, request_id)
