"""One Ray Serve replica: the gpt2serve app, with its own engine, as the deployment's ASGI ingress.

The replica builds the app of `gpt2serve serve` (`create_app(settings)`: every route, middleware, limit
and error of a plain server) and adds three things:

- readiness: the app's start-up (which Ray Serve runs before the replica takes traffic) waits until the
  engine has loaded and warmed up, so a replica still loading gets no request; a model that fails to load
  fails the replica's start. `check_health` (polled by Ray Serve's controller) fails once the engine no
  longer serves, and the controller replaces the replica.
- `X-Replica-Id` on every answer: Ray Serve's id of the replica that answered.
- `gpt2serve_replica_info{replica_id}` in the replica's `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpt2serve.api.app import GIL_SWITCH_S, create_app
from gpt2serve.api.state import ServerState
from gpt2serve.settings import Settings

logger = logging.getLogger(__name__)

REPLICA_HEADER = "X-Replica-Id"
LOAD_POLL_S = 0.05


def current_replica_id() -> str:
    """Ray Serve's id of the replica this code runs in."""
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


class ReplicaHeaderMiddleware:
    """Adds `X-Replica-Id` to every answer (pure ASGI: streams pass through untouched)."""

    def __init__(self, app: ASGIApp, replica_id: str):
        self.app, self.replica_id = app, replica_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REPLICA_HEADER, self.replica_id)
            await send(message)

        await self.app(scope, receive, tagged)


class ReplicaCollector(Collector):
    def __init__(self, replica_id: str):
        self.replica_id = replica_id

    def collect(self) -> Iterator[Metric]:
        doc = "The Ray Serve replica answering."
        info = GaugeMetricFamily("gpt2serve_replica_info", doc, labels=["replica_id"])
        info.add_metric([self.replica_id], 1)
        yield info


async def wait_loaded(state: ServerState) -> None:
    """Until the engine serves; RuntimeError if it failed to load."""
    while not state.ready:
        if state.load_error is not None:
            raise RuntimeError(state.load_error)
        await asyncio.sleep(LOAD_POLL_S)


def build_replica_app(settings: Settings, replica_id: str) -> FastAPI:
    """`create_app(settings)` whose start-up ends only once the model serves, tagged with `replica_id`."""
    app = create_app(settings)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with inner(app):
            await wait_loaded(app.state.server)
            logger.info("replica %s serves %s", replica_id, settings.model)
            yield

    app.router.lifespan_context = lifespan
    app.add_middleware(ReplicaHeaderMiddleware, replica_id=replica_id)
    app.state.metrics.registry.register(ReplicaCollector(replica_id))
    return app


class GPT2Replica:
    """The deployment's class (wrapped by `serve.ingress()` in gpt2serve.scale.serve)."""

    def __init__(self, settings: Settings):
        sys.setswitchinterval(GIL_SWITCH_S)  # as `gpt2serve serve` (see gpt2serve.api.app)
        self.settings = settings
        self.gpt2serve_app: FastAPI | None = None  # (`app` is Ray's wrapper's property)

    def __serve_build_asgi_app__(self) -> FastAPI:  # noqa: N807 (Ray Serve's hook)
        self.gpt2serve_app = build_replica_app(self.settings, current_replica_id())
        return self.gpt2serve_app

    def check_health(self) -> None:
        """Raises once the engine no longer serves: Ray Serve then replaces the replica."""
        state: ServerState = self.gpt2serve_app.state.server
        engine = state.engine
        if not state.ready or engine is None or not engine.running:
            raise RuntimeError(f"the engine does not serve: {state.unavailable_reason()}")
