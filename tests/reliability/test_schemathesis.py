"""schemathesis against the server's own /openapi.json: no request built from the schema gets a 5xx."""

from __future__ import annotations

import collections
import os

import pytest
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.reliability.verdict import engine_arithmetic, server_error

SEEN = collections.Counter()
ENGINE_KNOWN = collections.Counter()
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "30"))  # per operation and mode; more for a longer campaign
OPERATIONS = [
    ("GET", "/ping"), ("GET", "/execution-parameters"), ("POST", "/invocations"),
    ("POST", "/endpoints/{endpoint_name}/invocations"),
    ("POST", "/endpoints/{endpoint_name}/invocations-response-stream"), ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
    ("GET", "/metrics"), ("GET", "/info"),
]  # fmt: skip


CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if "invocations" in p or p == "/v1/completions"
]  # the other operations take nothing a negative case could break (Unsatisfiable)


@pytest.mark.parametrize("method, path, mode", CASES)
def test_no_server_errors(openapi_schema, fuzz_server, method, path, mode) -> None:
    operation = openapi_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        response = case.call(base_url=fuzz_server.url, timeout=60)
        SEEN[(path, mode.value, response.status_code)] += 1
        text = response.content.decode("utf-8", "replace")  # the event stream is binary
        if server_error(response.status_code, text):
            known = engine_arithmetic(case.body)
            assert known, (case.body, response.status_code, text[:500])
            ENGINE_KNOWN[known] += 1

    run()


@pytest.fixture(scope="module", autouse=True)
def summary():
    """Prints what was sent and answered (run with -s to see it)."""
    yield
    print(f"\nschemathesis: {sum(SEEN.values())} requests; (path, mode, status): {dict(SEEN)}; "
          f"engine-known 5xx: {dict(ENGINE_KNOWN)}")


def test_the_schema_lists_every_operation(openapi_schema) -> None:
    listed = {(op.method.upper(), op.path) for op in (r.ok() for r in openapi_schema.get_all_operations())}
    assert listed == set(OPERATIONS)
