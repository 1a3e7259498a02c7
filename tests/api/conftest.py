"""API test servers: the real app under uvicorn on 127.0.0.1, in a thread (one for all API tests) or in a
subprocess started through the container entry point (for signals)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from gpt2serve.api.app import create_app
from gpt2serve.api.state import ServerState
from gpt2serve.settings import Settings

SRC = Path(__file__).resolve().parents[2] / "src"
START_TIMEOUT_S = 60.0
# The common server's body limit: small, so the 413 test needs no big body.
SMALL_BODY_MB = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = START_TIMEOUT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached in {timeout} s")


def ping_status(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/ping", timeout=2).status_code
    except httpx.TransportError:
        return None


@dataclass
class ThreadServer:
    """uvicorn serving `create_app(settings)` in a background thread."""

    settings: Settings
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def state(self) -> ServerState:
        """The app's server state (its engine, once loaded)."""
        return self.server.config.app.state.server

    def start(self) -> ThreadServer:
        config = uvicorn.Config(
            create_app(self.settings), host="127.0.0.1", port=self.settings.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, what="server start")
        return self

    def wait_ready(self) -> ThreadServer:
        wait_for(lambda: ping_status(self.url) == 200, what="GET /ping 200")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_settings(model: str, **changes: object) -> Settings:
    base = Settings(model=model, device="cpu", host="127.0.0.1", port=free_port(), max_batch_size=32)
    return replace(base, **changes)


@contextmanager
def serving(settings: Settings) -> Iterator[ThreadServer]:
    """The app under uvicorn in a thread, ready. Torch runs one intra-op thread meanwhile: where the few
    cores are busy with other work, two spinning threads made sampling 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = ThreadServer(settings).start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()
        torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def api_server(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    """The tiny model behind the real app, used by all API tests."""
    with serving(make_settings(str(tiny_checkpoint), max_body_mb=SMALL_BODY_MB)) as server:
        yield server


@pytest.fixture(scope="package")
def client(api_server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="package")
def long_server(checkpoint_factory) -> Iterator[ThreadServer]:
    """A tiny model with GPT-2's 1024-token context, so one request can run for a long time."""
    checkpoint = checkpoint_factory(n_layer=2, n_head=4, n_embd=64, n_positions=1024)
    with serving(make_settings(str(checkpoint))) as server:
        yield server


class ProcessServer:
    """`python -m gpt2serve.api.container serve ...` in a subprocess, as the container runs it."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
        full_env.update(env or {})
        cmd = [sys.executable, "-m", "gpt2serve.api.container", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", *flags]  # fmt: skip
        self.log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the server
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_listening(self) -> int:
        """The status of the first /ping that gets an answer."""
        answered: list[int] = []

        def check() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()}")
            status = ping_status(self.url)
            if status is not None:
                answered.append(status)
            return bool(answered)

        wait_for(check, what="server listening")
        return answered[0]

    def wait_ready(self) -> None:
        wait_for(lambda: ping_status(self.url) == 200, what="GET /ping 200")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def process_server() -> Iterator[type[ProcessServer]]:
    """Start servers with `process_server(*flags)`; any left running are killed afterwards."""
    started: list[ProcessServer] = []

    def start(*flags: str, env: dict[str, str] | None = None) -> ProcessServer:
        server = ProcessServer(*flags, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()
