"""SIGTERM with requests that outlast the grace period: every one of them is answered with the 503
envelope (a stream: its error event), none is cut without an answer, and the server exits 0."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from tests.api.conftest import ProcessServer

LONG = {"input": "Once upon a time", "mode": "sample", "seed": 3, "num_return_sequences": 4,
        "max_new_tokens": 1000}  # fmt: skip
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def slow_checkpoint(checkpoint_factory):
    """Wide and long enough that 1000 tokens take well over the grace period."""
    return checkpoint_factory(n_layer=8, n_head=4, n_embd=256, n_positions=1024)


def _post(url: str, path: str, body: dict, out: dict, key: str) -> None:
    try:
        out[key] = httpx.post(url + path, json=body, timeout=60)
    except httpx.HTTPError as exc:
        out[key] = exc


def _stream(url: str, path: str, body: dict, out: dict, key: str, started: threading.Event) -> None:
    try:
        with httpx.stream("POST", url + path, json=body, timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                started.set()
            out[key] = lines
    except httpx.HTTPError as exc:
        out[key] = exc


@pytest.mark.slow
def test_requests_past_the_grace_get_503_answers(slow_checkpoint):
    server = ProcessServer("--model", str(slow_checkpoint), "--shutdown-grace-s", "1", env=ONE_THREAD)
    try:
        server.wait_listening()
        server.wait_ready()
        out: dict = {}
        started = threading.Event()
        callers = [threading.Thread(target=_post, args=(server.url, "/invocations", LONG, out, f"plain{i}"))
                   for i in range(3)]  # fmt: skip
        callers.append(
            threading.Thread(
                target=_post,
                args=(
                    server.url,
                    "/v1/completions",
                    {"prompt": "Hi", "max_tokens": 1000, "seed": 1},
                    out,
                    "openai",
                ),
            )
        )
        native = {**LONG, "stream": True}
        callers.append(
            threading.Thread(
                target=_stream, args=(server.url, "/invocations", native, out, "stream", started)
            ),
        )
        callers.append(threading.Thread(target=_stream, args=(
            server.url, "/v1/completions", {"prompt": "Hi", "max_tokens": 1000, "stream": True}, out,
            "openai_stream", threading.Event())))  # fmt: skip
        for t in callers:
            t.start()
        assert started.wait(30), server.output()
        server.terminate()
        for t in callers:
            t.join(timeout=60)
        assert server.proc.wait(timeout=30) == 0, server.output()
    finally:
        server.kill()

    for key in ("plain0", "plain1", "plain2", "openai"):
        r = out[key]
        assert isinstance(r, httpx.Response), (key, r)
        assert r.status_code == 503, (key, r.status_code, r.text)
        assert "shutting down" in r.json()["error"]["message"]
    native = out["stream"]
    assert isinstance(native, list), native
    assert "event: error" in native, native[-4:]
    error = json.loads(native[native.index("event: error") + 1].removeprefix("data: "))
    assert "shutting down" in error["error"]["message"]
    oai = out["openai_stream"]
    assert isinstance(oai, list), oai
    last = [line for line in oai if line.startswith("data: ")][-1]
    assert "shutting down" in json.loads(last.removeprefix("data: "))["error"]["message"]
