"""The reproducers of hostile and unlucky requests against a live server: each is answered with a clear
400 naming its limit (or, for JSON Lines, within one deadline), and the requests running beside them
finish unharmed."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.api.conftest import ThreadServer, make_settings

SEEDED = {"input": "The cat sat on", "mode": "sample", "num_return_sequences": 1, "max_new_tokens": 60}


@pytest.fixture(scope="module")
def server(tiny_checkpoint) -> Iterator[ThreadServer]:
    settings = make_settings(str(tiny_checkpoint), max_batch_size=8, request_timeout_s=60.0,
                             max_lines_per_body=20, max_prompts_per_request=4)  # fmt: skip
    server = ThreadServer(settings).start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _error(r: httpx.Response, status: int, param: str | None, *fragments: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


@pytest.mark.parametrize(
    "poison",
    [
        {"mode": "sample", "temperature": 1e-300},
        {"mode": "sample", "temperature": 1e300},
        {"repetition_penalty": 1e-300},
    ],
)
def test_a_poisoned_request_beside_four_decoding_ones_fails_alone(server, client, poison):
    alone = [client.post("/invocations", json={**SEEDED, "seed": i}).json() for i in range(4)]
    answers: dict[int, httpx.Response] = {}

    def call(i: int) -> None:
        answers[i] = client.post("/invocations", json={**SEEDED, "seed": i})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    engine = server.state.engine
    deadline = time.monotonic() + 10
    while engine.scheduler.slots_in_use < 4 and time.monotonic() < deadline:
        time.sleep(0.001)
    r = client.post("/invocations", json={**SEEDED, **poison, "input": "poison", "seed": 9})
    for t in threads:
        t.join()
    param = "repetition_penalty" if "repetition_penalty" in poison else "temperature"
    _error(r, 400, param, "[1e-05, 100000]")
    assert [answers[i].json() for i in range(4)] == alone


def test_a_6mb_input_is_refused_before_it_is_tokenized(tiny_checkpoint):
    settings = make_settings(str(tiny_checkpoint), max_body_mb=7.0)
    server = ThreadServer(settings).start().wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            t0 = time.monotonic()
            r = client.post("/invocations", json={"input": "a" * (6 * 2**20)})
            took = time.monotonic() - t0
            _error(r, 400, "input", "characters", "more than the 127 tokens")
            assert client.get("/ping").status_code == 200
    finally:
        server.stop()
    assert took < 30  # sanity only; the speed itself is measured by benchmarks/bench_overload.py


def test_a_prompt_over_the_token_limit_names_it(client):
    _error(client.post("/invocations", json={"input": "word " * 500}), 400, "input", "tokens; at most 127")


def test_one_request_may_not_hold_more_than_its_share_of_the_slots(client):
    body = {"input": "Hi", "mode": "beam", "num_beams": 5, "num_return_sequences": 1, "max_new_tokens": 4}
    _error(client.post("/invocations", json=body), 400, "num_return_sequences", "at most 4 of its 8 KV slots")
    ok = client.post("/invocations", json={**body, "num_beams": 4})
    assert ok.status_code == 200, ok.text


def test_a_long_stop_string_is_refused(client):
    r = client.post("/invocations", json={"input": "Hi", "stop": ["s" * 300]})
    _error(r, 400, "stop", "at most 256 characters", "300")


def test_a_prompt_list_that_can_never_fit_is_400_not_503(client):
    r = client.post("/v1/completions", json={"prompt": ["hi"] * 1000, "max_tokens": 2})
    _error(r, 400, "prompt", "1000 prompts", "at most 4")


def test_json_lines_past_the_line_limit_is_refused(client):
    body = "".join(json.dumps({"input": "hi", "max_new_tokens": 1}) + "\n" for _ in range(21))
    r = client.post("/invocations", content=body, headers={"content-type": "application/jsonlines"})
    _error(r, 400, "body", "21 requests", "at most 20")


def test_json_lines_share_one_deadline(tiny_checkpoint):
    """20 lines of long generations, 8 running at a time: each line alone would fit its own 3 s
    deadline, but the body has one: it ends by then, later lines answered with the timeout."""
    settings = make_settings(str(tiny_checkpoint), max_batch_size=8, request_timeout_s=3.0)
    server = ThreadServer(settings).start()
    line = {"input": "Once", "mode": "sample", "seed": 1, "num_return_sequences": 4, "max_new_tokens": 127}
    body = "".join(json.dumps(line) + "\n" for _ in range(20))
    try:
        with httpx.Client(base_url=server.wait_ready().url, timeout=60) as client:
            t0 = time.monotonic()
            r = client.post("/invocations", content=body, headers={"content-type": "application/jsonlines"})
            took = time.monotonic() - t0
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    answers = [json.loads(x) for x in r.text.splitlines()]
    assert len(answers) == 20
    timed_out = [a for a in answers if isinstance(a, dict) and a["error"]["type"] == "timeout_error"]
    done = [a for a in answers if isinstance(a, list)]
    assert len(timed_out) + len(done) == 20
    assert took < 3.0 + 5.0, took  # one deadline for the body, not one per line
