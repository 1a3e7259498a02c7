"""The fuzz target: the real app under uvicorn on 127.0.0.1 with a tiny model of a 32-token context (so
no request the fuzzers build can run long) and small limits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.conftest import ThreadServer, make_settings, serving

CONTEXT = 128
BODY_MB = 0.25


@pytest.fixture(scope="package")
def fuzz_server(checkpoint_factory) -> Iterator[ThreadServer]:
    model = checkpoint_factory(n_layer=1, n_head=2, n_embd=32, n_positions=CONTEXT, seed=3)
    settings = make_settings(str(model), max_body_mb=BODY_MB, max_batch_size=8, request_timeout_s=30.0)
    with serving(settings) as server:
        yield server


@pytest.fixture(scope="package")
def openapi_schema(fuzz_server: ThreadServer):
    import schemathesis

    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
