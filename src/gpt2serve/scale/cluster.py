"""Joining a Ray cluster, for `serve --ray` and `batch --ray`: `--ray-address` (`auto`, a head's
host:port, else `$RAY_ADDRESS`), or a local Ray instance started by `ray.init` when none is given."""

from __future__ import annotations

from typing import Any


class RayUnavailableError(Exception):
    """ray is not installed, or the cluster cannot be reached; the message says which."""


def import_ray(library: str) -> Any:
    """`ray`, once `ray.<library>` ("serve", "data") imports; RayUnavailableError naming the extra if not."""
    try:
        import importlib

        import ray

        importlib.import_module(f"ray.{library}")
    except ImportError as exc:
        message = f"--ray needs Ray {library}: pip install 'gpt2serve[ray]' ({exc})"
        raise RayUnavailableError(message) from None
    return ray


def join(address: str | None, log_level: str, library: str, **options: Any) -> None:
    """`ray.init` on `address` (None: `$RAY_ADDRESS`, else a new local instance); `options` go to it."""
    ray = import_ray(library)
    try:
        ray.init(address=address, logging_level=log_level.upper(), **options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailableError(f"cannot reach the Ray cluster {address!r}: {exc}") from None
