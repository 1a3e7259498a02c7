"""The FastAPI application and `serve()`, which runs it under uvicorn.

Start-up: the server listens at once and loads the model in the background (GET /ping answers 503 until
the model has loaded and run one warm-up generation, then 200). Shutdown: on SIGTERM the server stops
accepting connections, lets requests in flight finish for up to `shutdown_grace_s`, stops the engine
and exits with status 0.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from gpt2serve import __version__
from gpt2serve.api.auth import install_auth
from gpt2serve.api.errors import install_error_handlers
from gpt2serve.api.metrics import ServerMetrics
from gpt2serve.api.middleware import RequestContextMiddleware
from gpt2serve.api.state import ServerState
from gpt2serve.engine.engine import Engine
from gpt2serve.settings import Settings

# Route modules; one that is not installed is skipped (each must expose `router`).
ROUTE_MODULES = (
    "gpt2serve.api.routes.seed",
    "gpt2serve.api.routes.response_stream",
    "gpt2serve.api.routes.openai",
    "gpt2serve.api.routes.metrics",
)
KEEP_ALIVE_S = 75  # longer than the 60 s idle timeout of the load balancers in front of endpoints


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
        RequestContextMiddleware, max_body_bytes=settings.max_body_bytes, observer=metrics.observe
    )
    for name in ROUTE_MODULES:
        if importlib.util.find_spec(name) is not None:
            app.include_router(importlib.import_module(name).router)
    return app


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


def _exit_cleanly(signum: int, frame: object) -> None:
    """Runs once uvicorn has finished its graceful shutdown. Exit at once: a model still loading in the
    background is abandoned, not waited for (interpreter exit would join its worker threads)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve(settings: Settings) -> None:
    """Run the server until SIGTERM or SIGINT; return (exit status 0) after a graceful shutdown."""
    configure_logging(settings.log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # uvicorn's loggers go through the root handler configured above
        log_level=settings.log_level,
        access_log=False,  # RequestContextMiddleware logs each request once, with its id
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    server = uvicorn.Server(config)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on SIGTERM, then restores this handler and raises the signal
        # again: exit with status 0 rather than die of the signal.
        signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run()
