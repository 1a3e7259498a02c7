"""The `gpt2serve` command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys


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
