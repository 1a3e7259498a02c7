"""Reproducers of issue 17's poison values, found by the fuzz tests: a temperature or penalty
that passes validation but overflows float32 makes the draw raise, and the request gets a 500. Each is a 400
naming the field now that the engine bounds them (engine/params.py)."""

from __future__ import annotations

import httpx
import pytest

from tests.reliability.verdict import server_error

CASES = [
    ("/invocations", {"input": "Hi", "mode": "sample", "temperature": 1e-300}),
    ("/invocations", {"input": "Hi", "mode": "sample", "temperature": 5e-324}),
    ("/invocations", {"input": "Hi", "mode": "sample", "temperature": 6.1e307}),
    ("/invocations", {"input": "Hi", "repetition_penalty": 5e-324}),
    ("/invocations", {"input": "Hi", "mode": "sample", "repetition_penalty": 1e308}),
    ("/v1/completions", {"prompt": "Hi", "temperature": 1e-300}),
]


@pytest.mark.parametrize("path, body", CASES, ids=[f"{p}-{b}" for p, b in CASES])
def test_unrepresentable_parameters_get_400(fuzz_server, path: str, body: dict) -> None:
    r = httpx.post(fuzz_server.url + path, json={**body, "max_new_tokens": 4} if "input" in body else body,
                   timeout=60)  # fmt: skip
    assert not server_error(r.status_code, r.text), r.text
    assert r.status_code == 400
    assert r.json()["error"]["param"] in ("temperature", "repetition_penalty"), r.text
