"""The server's state: settings, and the engine, loaded in the background so /ping can answer 503 meanwhile.

Route modules reach it with `server_state(request)` and get a serving engine with `require_engine(request)`,
which raises EngineStoppedError (503) while the model loads, after it failed to load, or during shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from fastapi import Request

from gpt2serve.engine.engine import Engine
from gpt2serve.engine.errors import EngineStoppedError
from gpt2serve.engine.params import SamplingParams
from gpt2serve.settings import Settings

logger = logging.getLogger("gpt2serve.api")

WARMUP_PROMPT = "Hello"


class ServerState:
    """Owns the engine: loads it (or takes a given one), starts it, warms it up, stops it."""

    def __init__(self, settings: Settings, engine: Engine | None = None):
        self.settings = settings
        self.engine: Engine | None = engine
        self.ready = False
        self.load_error: str | None = None
        self._closing = False
        self._lock = threading.Lock()
        self._loader: threading.Thread | None = None
        # Called (from the load thread) with the reason when the model fails to load; `serve()` uses it
        # to make the process exit non-zero.
        self.on_load_failure: Callable[[str], None] | None = None

    def start_loading(self) -> None:
        """Load in a daemon thread: a stuck download must not keep the process alive at shutdown."""
        self._loader = threading.Thread(target=self._load, name="gpt2serve-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        started = time.monotonic()
        name = self.settings.model if self.engine is None else self.engine.model_name
        try:
            engine = self.engine or Engine.load(self.settings.model, self.settings.engine_config())
            engine.start()
            engine.generate_sync(WARMUP_PROMPT, SamplingParams(max_new_tokens=2))
        except Exception as exc:
            self.load_error = f"the model {name!r} could not be loaded: {exc}"
            logger.debug("model load failed", exc_info=exc)
            logger.error("%s", self.load_error)
            if self.on_load_failure is not None:
                self.on_load_failure(self.load_error)
            return
        with self._lock:
            self.engine = engine
            if self._closing:  # shutdown began while loading
                engine.stop()
                return
            self.ready = True
        random = ""
        if engine.is_random:
            random = " (random weights: its text is gibberish, for tests and benchmarks)"
        took = time.monotonic() - started
        logger.info("model %s%s ready in %.1f s on %s", name, random, took, engine.device)

    def close(self) -> None:
        """Stop the engine; requests still inside it end with EngineStoppedError."""
        with self._lock:
            self._closing = True
            self.ready = False
            engine = self.engine
        if engine is not None:
            engine.stop()

    def require_engine(self) -> Engine:
        if self.ready and self.engine is not None:
            return self.engine
        raise EngineStoppedError(self.unavailable_reason())

    def unavailable_reason(self) -> str:
        if self.load_error:
            return self.load_error
        if self._closing:
            return "the server is shutting down"
        return f"the model {self.settings.model!r} is still loading; retry when GET /ping answers 200"


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def require_engine(request: Request) -> Engine:
    """FastAPI dependency: the serving engine, or 503."""
    return server_state(request).require_engine()
