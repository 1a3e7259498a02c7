"""The `gpt2serve` command, run as a user runs it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from gpt2serve import __version__


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gpt2serve.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_generate_prints_the_api_json(tiny_checkpoint):
    out = _cli(
        "generate",
        "Hello world",
        "--model",
        str(tiny_checkpoint),
        "--mode",
        "greedy",
        "--max-length",
        "12",
        "--num-return-sequences",
        "2",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    texts = json.loads(out.stdout)
    assert len(texts) == 2 and all(t.startswith("Hello world") for t in texts)


def test_generate_seeded_is_repeatable(tiny_checkpoint):
    args = (
        "generate",
        "Once",
        "--model",
        str(tiny_checkpoint),
        "--seed",
        "7",
        "--max-length",
        "10",
        "--json",
    )
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == json.loads(second.stdout)


def test_generate_reports_invalid_parameters(tiny_checkpoint):
    out = _cli("generate", "Hi", "--model", str(tiny_checkpoint), "--top-p", "1.5")
    assert out.returncode == 2
    assert "`top_p` must be in (0, 1], got 1.5" in out.stderr


def test_generate_default_model_works_offline():
    out = _cli("generate", "Hi", "--mode", "greedy", "--max-length", "4", "--num-return-sequences", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Hi")


def _serve(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gpt2serve.cli", "serve", "--host", "127.0.0.1", "--device", "cpu", *flags],
        capture_output=True, text=True, timeout=60, env=full_env,
    )  # fmt: skip


def _error_lines(out: subprocess.CompletedProcess) -> list[str]:
    lines = (out.stdout + out.stderr).splitlines()
    return [line for line in lines if " ERROR " in line or line.startswith("gpt2serve: error:")]


def test_version():
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"gpt2serve {__version__}"


def test_a_model_that_cannot_load_exits_1_with_one_line(tmp_path):
    started = time.monotonic()
    out = _serve("--port", "0", "--model", str(tmp_path / "missing"))
    assert out.returncode == 1, out.stderr
    assert time.monotonic() - started < 30
    errors = _error_lines(out)
    assert len(errors) == 1 and "could not be loaded" in errors[0] and "missing" in errors[0], errors
    assert "Traceback" not in out.stderr


def test_a_port_in_use_exits_1_with_one_line(tiny_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _serve("--port", str(port), "--model", str(tiny_checkpoint))
    assert out.returncode == 1, out.stderr
    errors = _error_lines(out)
    assert errors == [errors[0]] and f"cannot listen on 127.0.0.1:{port}: Address already in use" in errors[0]
    assert "Traceback" not in out.stderr and "could not be loaded" not in out.stderr


def test_a_bad_environment_variable_gives_one_line():
    out = _serve(env={"GPT2SERVE_MAX_BATCH_SIZE": "lots"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "gpt2serve: error: environment variable GPT2SERVE_MAX_BATCH_SIZE='lots' is invalid for "
        "max_batch_size: invalid literal for int() with base 10: 'lots'"
    ]
