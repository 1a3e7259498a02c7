"""The FastAPI application and `serve()`, which runs it under uvicorn.

Start-up: the server listens at once and loads the model in the background (GET /ping answers 503 until
the model has loaded and run one warm-up generation, then 200). A port that cannot be bound, or a model
that fails to load, ends the process with status 1 after one logged line saying why.

Shutdown: on SIGTERM the server stops accepting connections, lets requests in flight finish for up to
`shutdown_grace_s`, then stops the engine, which answers every request still open with 503 (a stream: its
error event), and exits with status 0.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from gpt2serve import __version__
from gpt2serve.api.auth import install_auth
from gpt2serve.api.connections import guarded_protocol
from gpt2serve.api.errors import install_error_handlers
from gpt2serve.api.metrics import ServerMetrics
from gpt2serve.api.middleware import RequestContextMiddleware
from gpt2serve.api.openapi import install_openapi
from gpt2serve.api.state import ServerState
from gpt2serve.engine.engine import Engine
from gpt2serve.settings import Settings

logger = logging.getLogger(__name__)

# Route modules, each exposing `router`; a missing one fails create_app (a server short of routes is a bug).
ROUTE_MODULES = (
    "gpt2serve.api.routes.seed",
    "gpt2serve.api.routes.response_stream",
    "gpt2serve.api.routes.openai",
    "gpt2serve.api.routes.metrics",
    "gpt2serve.api.routes.info",
    "gpt2serve.api.routes.playground",
)
KEEP_ALIVE_S = 75  # longer than the 60 s idle timeout of the load balancers in front of endpoints
# The engine thread releases the GIL around every C call and must win it back from the event loop: at
# Python's default 5 ms a busy loop cost the engine ~5 ms per call (a 10x flood served 24 requests in 15 s
# against 316 unloaded; with 0.5 ms, 78 in 10 s, and unchanged unloaded: RELIABILITY.md).
GIL_SWITCH_S = 0.0005
FLUSH_S = 2.0  # after the shutdown grace, time to send the 503s of the requests it ended


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """The app; it loads `settings.model` in the background when it starts (or uses `engine`)."""
    state = ServerState(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        yield
        await run_in_threadpool(state.close)

    app = FastAPI(title="gpt2serve", version=__version__, lifespan=lifespan)
    app.state.server = state
    app.state.metrics = metrics = ServerMetrics(state)
    install_error_handlers(app)
    install_auth(app, settings)  # API keys, SigV4, quotas, CORS: inside the request context middleware
    app.add_middleware(
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, observer=metrics.observe,
        body_timeout_s=settings.body_timeout_s,
    )
    for name in ROUTE_MODULES:
        app.include_router(importlib.import_module(name).router)
    install_openapi(app)
    return app


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


def _exit_now(status: int) -> None:
    """Exit at once: a model still loading in the background is abandoned, not waited for (interpreter
    exit would join its worker threads)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _exit_cleanly(signum: int, frame: object) -> None:
    """Runs once uvicorn has finished its graceful shutdown after SIGTERM."""
    _exit_now(0)


class StartupError(Exception):
    """The server cannot start (the port is taken ...); the message is one line."""


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound socket for `host:port` (uvicorn listens on it), or StartupError with one line saying why."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


class GracefulServer(uvicorn.Server):
    """uvicorn, whose graceful shutdown ends in answers: when the grace period runs out, the engine
    stops and every request still open gets the 503 envelope (a stream, its error event), with
    `FLUSH_S` left to send them before uvicorn would cancel what remains."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float):
        super().__init__(config)
        self.state, self.grace_s = state, grace_s

    async def shutdown(self, sockets: list | None = None) -> None:
        loop = asyncio.get_running_loop()

        def stop_engine() -> None:
            logger.warning("shutdown grace of %g s is over: ending the requests still open", self.grace_s)
            loop.run_in_executor(None, self.state.close)

        timer = loop.call_later(self.grace_s, stop_engine)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings for `app`: timeouts and the connection cap from `settings`."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings.header_timeout_s, settings.max_connections),
        log_config=None,  # uvicorn's loggers go through the root handler configured above
        log_level=settings.log_level,
        access_log=False,  # RequestContextMiddleware logs each request once, with its id
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s + FLUSH_S),
        timeout_keep_alive=KEEP_ALIVE_S,
    )


def serve(settings: Settings) -> int:
    """Run the server until SIGTERM or SIGINT (exit status 0 after a graceful shutdown). Exits with status
    1 after one logged line if the port cannot be bound or the model fails to load."""
    configure_logging(settings.log_level)
    sys.setswitchinterval(GIL_SWITCH_S)
    try:
        sock = listen_socket(settings.host, settings.port)
    except StartupError as exc:
        logger.error("%s", exc)
        return 1
    app = create_app(settings)
    server = GracefulServer(uvicorn_config(app, settings), app.state.server, settings.shutdown_grace_s)

    def load_failed(reason: str) -> None:
        server.should_exit = True  # uvicorn's main loop polls this: it shuts down, then we exit 1

    app.state.server.on_load_failure = load_failed
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGTERM, then restores this handler and raises the signal
        # again: exit with status 0 rather than die of the signal.
        signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run(sockets=[sock])
    if app.state.server.load_error is not None:
        _exit_now(1)
    return 0
