"""`serve --ray` on a local Ray cluster (2 CPUs) with 2 replicas of the tiny checkpoint, through Ray
Serve's HTTP proxy: spread, the same answers as a plain server, and a replica killed mid-run."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gpt2serve.scale.replica import REPLICA_HEADER
from tests.api.conftest import make_settings, wait_for
from tests.live_server import tiny_server

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPLICAS = 2
SEEDED = [
    ("/invocations", {"input": "The ship sailed", "seed": 7, "max_new_tokens": 12}),
    ("/invocations", {"input": "Greedy words", "mode": "greedy", "max_new_tokens": 10}),
    ("/invocations", {"input": "Beams of", "mode": "beam", "num_beams": 3, "num_return_sequences": 2,
                      "max_new_tokens": 8}),
    ("/invocations", {"input": "A stream", "seed": 1, "max_new_tokens": 10, "stream": True}),
    ("/endpoints/gpt2/invocations", {"input": "Runtime path", "seed": 2, "max_new_tokens": 8}),
    ("/v1/completions", {"model": "gpt2", "prompt": ["One", "Two"], "max_tokens": 9, "seed": 5}),
    ("/v1/completions", {"model": "gpt2", "prompt": "Streamed", "max_tokens": 9, "seed": 4, "stream": True}),
]


@pytest.fixture(scope="module")
def ray_url(ray_cluster: None, tiny_checkpoint: Path) -> Iterator[str]:
    from ray import serve

    from gpt2serve.scale.serve import APP_NAME, start

    settings = make_settings(str(tiny_checkpoint), ray=True, replicas=REPLICAS, threads=1, max_batch_size=8)
    start(settings)
    try:
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        serve.delete(APP_NAME)


def answer(client: httpx.Client, path: str, body: dict) -> object:
    """The answer's JSON; for a stream, its pieces (SSE data lines); OpenAI's `id`, `created` dropped."""
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    if not body.get("stream"):
        events = [response.json()]
    else:
        events = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: ") and line != "data: [DONE]"]  # fmt: skip
    for event in events:
        if isinstance(event, dict):
            event.pop("id", None), event.pop("created", None)
    return events


def test_requests_spread_over_both_replicas_and_all_succeed(ray_url: str) -> None:
    body = {"input": "Spread", "seed": 11, "max_new_tokens": 16}

    def call(_: int) -> httpx.Response:
        return httpx.post(f"{ray_url}/invocations", json=body, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(32)))
    assert [r.status_code for r in responses] == [200] * 32
    assert len({r.json()[0] for r in responses}) == 1  # one seeded answer, whichever replica
    replicas = {r.headers[REPLICA_HEADER] for r in responses}
    assert len(replicas) == REPLICAS, replicas
    metrics = httpx.get(f"{ray_url}/metrics", timeout=30)
    replica = metrics.headers[REPLICA_HEADER]
    assert f'gpt2serve_replica_info{{replica_id="{replica}"}} 1.0' in metrics.text
    assert httpx.get(f"{ray_url}/ping", timeout=30).status_code == 200


def test_seeded_answers_equal_a_plain_servers(ray_url: str, tiny_checkpoint: Path) -> None:
    with tiny_server(tiny_checkpoint) as plain, httpx.Client(base_url=plain.url, timeout=60) as client:
        expected = [answer(client, path, body) for path, body in SEEDED]
    with httpx.Client(base_url=ray_url, timeout=60) as client:
        got = [answer(client, path, body) for path, body in SEEDED]
    for (path, body), want, have in zip(SEEDED, expected, got):
        assert have == want, (path, body)


def test_bad_request_gets_the_servers_envelope(ray_url: str) -> None:
    response = httpx.post(f"{ray_url}/invocations", json={"input": "x", "top_p": 1.5}, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "top_p"


def kill_replica(replica_id: str) -> None:
    import ray

    from gpt2serve.scale.serve import APP_NAME, DEPLOYMENT_NAME

    name = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{replica_id}"
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def test_a_killed_replica_loses_no_request_and_is_replaced(ray_url: str) -> None:
    """Clients keep requests in flight on both replicas while one is killed: every request gets the
    seeded answer (those the dead replica dropped are sent again by the proxy) or a clean 503."""
    body = {"input": "Kill test", "seed": 3, "max_new_tokens": 48, "num_return_sequences": 2}
    expected = httpx.post(f"{ray_url}/invocations", json=body, timeout=60).json()
    stop, results = threading.Event(), []

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{ray_url}/invocations", json=body)
                results.append((time.monotonic(), r.status_code, r.headers.get(REPLICA_HEADER), r.content))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len({r[2] for r in results}) == REPLICAS, timeout=30, what="both replicas answering")
        victim = results[-1][2]
        kill_replica(victim)
        killed_at = time.monotonic()
        wait_for(lambda: sum(r[0] > killed_at + 1 for r in results) >= 10, timeout=30, what="answers after")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    for _, status, _, content in results:
        if status == 503:
            assert json.loads(content)["error"]["message"], content
        else:
            assert status == 200 and json.loads(content) == expected, (status, content[:200])
    assert sum(status == 200 for _, status, _, _ in results) >= len(results) - 6
    seen = {r[2] for r in results}

    def replaced() -> bool:
        r = httpx.post(f"{ray_url}/invocations", json=body, timeout=60)
        return r.status_code == 200 and r.headers[REPLICA_HEADER] not in seen

    wait_for(replaced, timeout=90, what="a new replica answering")
