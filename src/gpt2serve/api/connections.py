"""Slow and surplus clients at the connection level: a header read timeout and a connection cap.

uvicorn's h11 protocol has an idle keep-alive timeout but no deadline for a request's headers, so a client
sending one header byte at a time holds its connection (and a file descriptor) forever. `guarded_protocol`
returns an `H11Protocol` subclass (passed to uvicorn as `http=`) that:

- gives each request `header_timeout_s` from its first byte (or from the connection's start) until its
  headers are complete; past it the connection gets a 408 envelope and is closed;
- refuses a connection beyond `max_connections` open ones with a 503 envelope (`Retry-After`) and closes it.

The body read deadline is enforced per request by `RequestContextMiddleware` (it needs the ASGI app to
answer 408 with the envelope).
"""

from __future__ import annotations

import asyncio
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from gpt2serve.api.errors import RETRY_AFTER_S, envelope

logger = logging.getLogger(__name__)


def raw_response(status: int, reason: str, error: dict, extra: str = "") -> bytes:
    """A complete HTTP/1.1 answer with a JSON body that closes the connection."""
    body = json.dumps(error).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"connection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """The h11 protocol class with these limits."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                message = f"this server is at its limit of {max_connections} open connections; retry later"
                logger.warning("refused a connection: %d open", len(self.connections) - 1)
                error = envelope(message, "overloaded_error")
                retry = f"retry-after: {RETRY_AFTER_S}\r\n"
                transport.write(raw_response(503, "Service Unavailable", error, retry))
                transport.close()
                return
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._cancel_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_timed_out)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            message = f"the request's headers did not arrive within {header_timeout_s:g} s"
            self.transport.write(raw_response(408, "Request Timeout", envelope(message, "timeout_error")))
            self.transport.close()

    return GuardedH11Protocol
