"""Slow clients (`gpt2serve.api.connections` and the body deadline of the middleware): connections that
dribble their headers or their body are answered 408 and closed within the timeouts while a normal
request still succeeds; one connection over `--max-connections` is answered 503 and closed."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

TIMEOUT_S = 1.5
SLACK_S = 2.5  # a busy 2-core machine may be late by this much
CAP = 150
HEADER_DRIBBLERS = 60
BODY_DRIBBLERS = 60
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
REQUEST = {"input": "Hello", "mode": "greedy", "max_new_tokens": 3, "num_return_sequences": 1}
PARTIAL_HEADERS = b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
BODY_HEADERS = b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
               b"Content-Length: 10000\r\n\r\n{\"input\": \""  # fmt: skip


@pytest.fixture(scope="module")
def guarded_server(tiny_checkpoint):
    from tests.api.conftest import ProcessServer

    flags = ["--header-timeout-s", str(TIMEOUT_S), "--body-timeout-s", str(TIMEOUT_S),
             "--max-connections", str(CAP)]  # fmt: skip
    server = ProcessServer("--model", str(tiny_checkpoint), *flags, env=ONE_THREAD)
    try:
        server.wait_listening()
        server.wait_ready()
        yield server
    finally:
        server.kill()


class Dribbler:
    """A raw connection that sends `head`, then one more byte (`drip`) every `every` seconds."""

    def __init__(self, sock: socket.socket, head: bytes, drip: bytes):
        self.sock = sock
        self.sock.sendall(head)
        self.sock.setblocking(False)
        self.drip, self.received, self.closed_after = drip, b"", None
        self.started = time.monotonic()

    def step(self) -> None:
        if self.closed_after is not None:
            return
        try:
            self.sock.send(self.drip)
            while chunk := self.sock.recv(65536):
                self.received += chunk
            self._close()  # recv() returned b"": the server closed the connection
        except BlockingIOError:
            pass
        except OSError:  # reset or broken pipe: closed by the server
            self._close()

    def _close(self) -> None:
        self.closed_after = time.monotonic() - self.started
        self.sock.close()


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port))


def _dribble(dribblers: list[Dribbler], until: float) -> None:
    while time.monotonic() < until and any(d.closed_after is None for d in dribblers):
        for d in dribblers:
            d.step()
        time.sleep(0.2)


def _error(received: bytes) -> tuple[int, dict]:
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


@pytest.mark.slow
def test_dribbling_clients_are_closed_while_a_normal_request_succeeds(guarded_server) -> None:
    port = guarded_server.port
    kept_alive = _connect(port)  # one request done, then dribbles the next
    kept_alive.sendall(b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert kept_alive.recv(65536).startswith(b"HTTP/1.1 200")
    headers = [Dribbler(_connect(port), PARTIAL_HEADERS, b"X") for _ in range(HEADER_DRIBBLERS)]
    bodies = [Dribbler(_connect(port), BODY_HEADERS, b"a") for _ in range(BODY_DRIBBLERS)]
    kept = Dribbler(kept_alive, PARTIAL_HEADERS, b"X")
    normal: dict = {}
    url = f"{guarded_server.url}/invocations"
    caller = threading.Thread(target=lambda: normal.update(r=httpx.post(url, json=REQUEST, timeout=30)))
    caller.start()
    everyone = [*headers, *bodies, kept]
    _dribble(everyone, time.monotonic() + TIMEOUT_S + SLACK_S + 5)
    caller.join(timeout=30)

    assert normal["r"].status_code == 200, normal["r"].text
    deadline = TIMEOUT_S + SLACK_S
    late = [d.closed_after for d in everyone if d.closed_after is None or d.closed_after > deadline]
    assert not late, f"{len(late)} of {len(everyone)} connections were not closed in time: {late[:5]}"
    assert min(d.closed_after for d in everyone) >= TIMEOUT_S - 0.1  # none closed before its timeout
    for d in [*headers, kept]:
        status, error = _error(d.received)
        assert status == 408 and "headers did not arrive within 1.5 s" in error["message"]
    for d in bodies:
        status, error = _error(d.received)
        assert status == 408 and "body did not arrive within 1.5 s" in error["message"], error


@pytest.mark.slow
def test_a_connection_over_the_cap_is_refused_with_503(guarded_server) -> None:
    held = [_connect(guarded_server.port) for _ in range(CAP)]
    try:
        time.sleep(0.3)  # the server accepts them
        with _connect(guarded_server.port) as extra:
            extra.settimeout(5)
            received = b""
            while chunk := extra.recv(65536):
                received += chunk
        status, error = _error(received)
        assert status == 503 and f"limit of {CAP} open connections" in error["message"]
        assert b"retry-after: 2" in received.lower()
    finally:
        for s in held:
            s.close()
    # Once they are closed, requests are served again.
    wait_until = time.monotonic() + 10
    while time.monotonic() < wait_until:
        r = httpx.post(f"{guarded_server.url}/invocations", json=REQUEST, timeout=30)
        if r.status_code == 200:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
