"""SIGTERM (what SageMaker sends before SIGKILL) lets running generations finish, then the server exits 0."""

from __future__ import annotations

import threading

import httpx

PROMPT = "Once upon a time"
# Queued first; the engine admits requests in arrival order, so it runs once the stream below runs.
PLAIN_REQUEST = {"input": PROMPT, "num_return_sequences": 4, "max_length": 100, "seed": 5}
STREAM_REQUEST = {"input": PROMPT, "num_return_sequences": 2, "max_length": 100, "seed": 6, "stream": True}
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # test machines may have few, busy cores


def test_sigterm_lets_running_requests_finish_then_exits_0(process_server, tiny_checkpoint) -> None:
    server = process_server("--model", str(tiny_checkpoint), "--shutdown-grace-s", "25", env=ONE_THREAD)
    server.wait_listening()
    server.wait_ready()
    plain: dict = {}
    caller = threading.Thread(
        target=lambda: plain.update(r=httpx.post(f"{server.url}/invocations", json=PLAIN_REQUEST, timeout=60))
    )
    caller.start()
    with httpx.stream("POST", f"{server.url}/invocations", json=STREAM_REQUEST, timeout=60) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))  # generation is running now
        server.terminate()
        rest = list(lines)
        assert stream.status_code == 200
    caller.join(timeout=60)

    assert PROMPT in first
    assert "event: done" in rest, rest[-5:]
    assert plain["r"].status_code == 200, plain["r"].text
    assert len(plain["r"].json()) == 4
    assert server.proc.wait(timeout=30) == 0, server.output()
    try:
        refused = httpx.get(f"{server.url}/ping", timeout=2) is None
    except httpx.TransportError:
        refused = True
    assert refused
