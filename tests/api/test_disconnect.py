"""A client that hangs up on a non-streamed request cancels its generation: the engine frees its slots
within a step or so instead of generating to the end, and the server keeps answering."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from prometheus_client import CollectorRegistry

from tests.api.conftest import ThreadServer, wait_for

# Each request asks for ~1000 tokens x 16 sequences: well over 10 s of work for this model, unless
# cancelled.
LONG = {"input": "Once upon a time", "mode": "sample", "seed": 3, "num_return_sequences": 16,
        "max_length": 1024}  # fmt: skip
LONG_V1 = {"prompt": "Once upon a time", "max_tokens": 1000, "n": 16, "seed": 3}
JSONLINES = "".join(json.dumps({**LONG, "num_return_sequences": 8}) + "\n" for _ in range(2))
CASES = [
    pytest.param("/invocations", json.dumps(LONG), "application/json", id="invocations"),
    pytest.param("/endpoints/gpt2/invocations", json.dumps(LONG), "application/json", id="endpoints"),
    pytest.param("/invocations", JSONLINES, "application/jsonlines", id="jsonlines"),
    pytest.param("/v1/completions", json.dumps(LONG_V1), "application/json", id="openai"),
]
WAIT_S = 10.0


def send_raw(url: str, path: str, body: str, content_type: str) -> socket.socket:
    """Send one HTTP/1.1 POST on a fresh connection and leave the answer unread."""
    host, port = url.removeprefix("http://").split(":")
    data = body.encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()  # fmt: skip
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(head + data)
    return sock


def count_of(registry: CollectorRegistry, labels: dict[str, str]) -> float:
    return registry.get_sample_value("gpt2serve_http_requests_total", labels) or 0.0


@pytest.mark.parametrize("path, body, content_type", CASES)
def test_hanging_up_cancels_the_generation(long_server: ThreadServer, path, body, content_type) -> None:
    engine = long_server.state.engine
    cancelled, finished = engine.stats.requests_cancelled, engine.stats.requests_finished
    # The abandoned request is counted with status 499 ("client closed request"), under its route template.
    labels = {"method": "POST", "route": path.replace("/gpt2/", "/{endpoint_name}/"), "status": "499"}
    registry = long_server.server.config.app.state.metrics.registry
    closed = count_of(registry, labels)
    sock = send_raw(long_server.url, path, body, content_type)
    try:
        wait_for(lambda: engine.scheduler.slots_in_use > 0, timeout=WAIT_S, what="the generation to start")
    finally:
        sock.close()
    wait_for(lambda: engine.scheduler.slots_in_use == 0, timeout=WAIT_S, what="the slots to be freed")
    assert engine.stats.requests_cancelled > cancelled
    assert engine.stats.requests_finished == finished  # nothing ran to its end
    assert not engine.scheduler.running and not engine.scheduler.waiting
    wait_for(lambda: count_of(registry, labels) > closed, timeout=WAIT_S, what="the 499 to be counted")
    r = httpx.post(f"{long_server.url}/invocations", json={"input": "Hi", "max_new_tokens": 3}, timeout=30)
    assert r.status_code == 200 and len(r.json()) == 3
