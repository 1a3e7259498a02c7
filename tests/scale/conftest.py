"""The Ray tests' cluster: one local Ray instance with 2 CPUs for the package, started by the tests.

Skipped where ray is not installed (`pip install -e '.[ray]'`); `pytest -m "not ray"` skips them anyway.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from gpt2serve.settings import Settings

CLUSTER_CPUS = 2


@pytest.fixture(scope="package")
def ray_cluster() -> Iterator[None]:
    pytest.importorskip("ray", reason="the Ray tests need ray: pip install -e '.[ray]'")
    import ray
    from ray import serve

    from gpt2serve.scale.serve import init_ray

    saved = dict(os.environ)
    init_ray(Settings(model="unused", log_level="warning"), num_cpus=CLUSTER_CPUS, include_dashboard=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
