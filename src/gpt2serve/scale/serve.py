"""`gpt2serve serve --ray`: the app as a Ray Serve application, one engine per replica.

Ray Serve's HTTP proxy listens on `--host`/`--port` and routes each request to a replica with room: a
replica takes at most `max_ongoing_requests` at once (its KV slots, `--max-batch-size`), so requests wait
in Ray's router for a replica with a free slot rather than in one engine's queue; past `--max-queue`
waiting requests the proxy answers 503. `--replicas N` runs N replicas; `--autoscale MIN:MAX` lets Ray
Serve scale between MIN and MAX on the requests in flight per replica (`--target-ongoing-requests`).
Each replica reserves `--threads` CPUs (default 1) and runs its engine on that many threads.

Without `--ray-address` a local Ray instance is started for the server (and stopped with it); with one,
the application is deployed on that cluster, whose nodes must have gpt2serve installed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import replace
from typing import Any

from gpt2serve.api.app import KEEP_ALIVE_S, configure_logging
from gpt2serve.scale.cluster import RayUnavailableError, import_ray, join
from gpt2serve.settings import Settings

logger = logging.getLogger(__name__)

APP_NAME = "gpt2serve"
DEPLOYMENT_NAME = "gpt2serve"
HEALTH_CHECK_PERIOD_S = 5.0
HEALTH_CHECK_TIMEOUT_S = 30.0


def replica_settings(settings: Settings) -> Settings:
    """What each replica's app is given: its engine on `--threads` threads (default 1)."""
    return replace(settings, threads=settings.threads or 1)


def target_ongoing(settings: Settings) -> float:
    return settings.target_ongoing_requests or max(1.0, settings.max_batch_size / 2)


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Ray Serve's options for the deployment, from the settings."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": settings.max_batch_size,
        "max_queued_requests": settings.max_queue,
        "ray_actor_options": {"num_cpus": replica_settings(settings).threads},
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
        "graceful_shutdown_timeout_s": settings.shutdown_grace_s,
    }
    if settings.autoscale is not None:
        low, high = settings.autoscale
        options["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": high, "initial_replicas": low,
            "target_ongoing_requests": target_ongoing(settings),
        }  # fmt: skip
    else:
        options["num_replicas"] = settings.replicas or 1
    return options


def build_application(settings: Settings) -> Any:
    """The bound Ray Serve application (deploy it with `serve.run`)."""
    from ray import serve

    from gpt2serve.scale.replica import GPT2Replica

    deployment = serve.deployment(serve.ingress()(GPT2Replica), **deployment_options(settings))
    return deployment.bind(replica_settings(settings))


def http_options(settings: Settings) -> dict[str, Any]:
    """Where Ray Serve's proxy listens."""
    return {"host": settings.host, "port": settings.port, "keep_alive_timeout_s": KEEP_ALIVE_S}


def proxy_environment(settings: Settings) -> None:
    """For a local Ray instance (which inherits this process's environment): the proxy's middleware that
    retries requests a dead replica dropped before answering (gpt2serve.scale.proxy)."""
    from gpt2serve.scale import proxy

    os.environ.setdefault(proxy.CALLBACK_ENV, proxy.CALLBACK)
    os.environ[proxy.BODY_LIMIT_ENV] = str(settings.max_body_bytes)


def init_ray(settings: Settings, **options: Any) -> None:
    """Join `--ray-address`'s cluster, or start a local Ray instance (`options` go to `ray.init`)."""
    if settings.ray_address is None:
        proxy_environment(settings)
    join(settings.ray_address, settings.log_level, "serve", **options)


def start(settings: Settings) -> None:
    """Join (or start) the Ray cluster, start Ray Serve's proxy and deploy the app; returns once every
    replica serves."""
    ray = import_ray("serve")
    from ray import serve

    if not ray.is_initialized():  # (a caller may have joined a cluster already)
        init_ray(settings)
    serve.start(http_options=http_options(settings))
    serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)


def stop(settings: Settings) -> None:
    import ray
    from ray import serve

    serve.delete(APP_NAME)
    if settings.ray_address is None:  # the local instance started for this server
        serve.shutdown()
    ray.shutdown()


def serve_ray(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; exit status 0, or 1 (one logged line) when Ray cannot start."""
    configure_logging(settings.log_level)
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    try:
        start(settings)
    except RayUnavailableError as exc:
        logger.error("%s", exc)
        return 1
    logger.info("serving %s on http://%s:%d with Ray Serve", settings.model, settings.host, settings.port)
    try:
        done.wait()
    finally:
        stop(settings)
    return 0
