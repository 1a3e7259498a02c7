"""`gpt2serve batch`: line-for-line answers in order, error records, resuming after SIGKILL, --url mode."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from gpt2serve import batch_remote
from gpt2serve.batch import EXIT_LINES_FAILED, EXIT_OK, EXIT_STOPPED, BatchOptions, run_batch
from gpt2serve.batch_output import resume_point
from tests.api.conftest import ThreadServer, free_port
from tests.live_server import tiny_server

SRC = Path(__file__).resolve().parents[1] / "src"
# Bad lines and the words their error records must carry.
BAD_LINES = [
    ('{"input": "x", "top_p": 1.5}', "`top_p` must be in (0, 1]"),
    ("not json", "malformed JSON"),
    ("", "is empty"),
    ('["a", "b"]', "must be a JSON object"),
    ('{"input": "x", "length": 3, "mode": "greedy"}', "mixes fields"),
    ('{"prompt": "x", "suffix": "y"}', "`suffix` is not supported"),
    ('{"input": 5}', "`input`"),
]


def request(i: int, tokens: int = 4) -> dict:
    return {"id": i, "input": f"Line {i} says", "max_new_tokens": tokens, "seed": i,
            "num_return_sequences": 1}  # fmt: skip


def write_mixed(path: Path, n: int, tokens: int = 4, bad_every: int = 7) -> dict[int, str]:
    """n lines, every `bad_every`-th a bad one; the expected message of each bad line by index."""
    bad, lines = {}, []
    for i in range(n):
        if i % bad_every == 3:
            line, words = BAD_LINES[(i // bad_every) % len(BAD_LINES)]
            bad[i] = words
        elif i % 5 == 0:
            line = json.dumps({"id": i, "prompt": f"Line {i}", "max_tokens": tokens, "seed": i})
        elif i % 11 == 0:
            line = json.dumps(f"Bare {i}")  # a bare prompt: the seed API's defaults, long; kept rare
        else:
            line = json.dumps(request(i, tokens))
        lines.append(line)
    path.write_text("\n".join(lines) + "\n")
    return bad


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The engine sets torch's threads; on 2 busy cores one thread is ~10x faster for a tiny model."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def local(tmp: Path, checkpoint: Path, name: str = "out.jsonl", **kw) -> BatchOptions:
    return BatchOptions(str(tmp / "in.jsonl"), str(tmp / name), model=str(checkpoint), threads=1, **kw)


def check_mixed(out: Path, n: int, bad: dict[int, str]) -> list[dict]:
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == n
    for i, record in enumerate(records):
        if i in bad:
            assert bad[i] in record["error"]["message"], (i, record)
            assert set(record["error"]) == {"message", "type", "param", "code"}
        else:
            assert "output" in record, (i, record)
    return records


def test_500_lines_with_bad_ones_answer_in_order(tmp_path, tiny_checkpoint, one_thread):
    bad = write_mixed(tmp_path / "in.jsonl", 500, bad_every=9)
    assert run_batch(local(tmp_path, tiny_checkpoint)) == EXIT_LINES_FAILED
    records = check_mixed(tmp_path / "out.jsonl", 500, bad)
    for i, record in enumerate(records):
        if "output" in record and i % 5 and i % 11:
            assert record["id"] == i and record["output"][0].startswith(f"Line {i} says")
        if i % 5 == 0 and i not in bad:
            assert record["id"] == i and record["output"]["object"] == "text_completion"
            assert record["output"]["usage"]["completion_tokens"] == 4
        if i % 11 == 0 and i % 5 and i not in bad:
            assert "id" not in record and len(record["output"]) == 3  # the seed API's default n
    assert resume_point(str(tmp_path / "out.jsonl")).failed == len(bad)
    # Rerun: nothing left to do; the file is unchanged and the status still reports the failures.
    before = (tmp_path / "out.jsonl").read_bytes()
    assert run_batch(local(tmp_path, tiny_checkpoint)) == EXIT_LINES_FAILED
    assert (tmp_path / "out.jsonl").read_bytes() == before


def test_all_good_exits_0_and_a_longer_output_is_refused(tmp_path, tiny_checkpoint, one_thread):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(request(i)) + "\n" for i in range(3)))
    assert run_batch(local(tmp_path, tiny_checkpoint)) == EXIT_OK
    (tmp_path / "other.jsonl").write_text("{}\n" * 4)
    assert run_batch(local(tmp_path, tiny_checkpoint, "other.jsonl")) == EXIT_STOPPED


def test_resume_cuts_a_torn_tail(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"output":["a"]}\n{"error":{"message":"x"}}\n{"output":["tor')
    point = resume_point(str(out))
    assert (point.lines, point.failed) == (2, 1)
    assert out.read_bytes() == b'{"output":["a"]}\n{"error":{"message":"x"}}\n'


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpt2serve.cli", "batch", *args, "--threads", "1"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_one_run(tmp_path, tiny_checkpoint, one_thread):
    n = 600
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(request(i, 12)) + "\n" for i in range(n)))
    assert run_batch(local(tmp_path, tiny_checkpoint, "reference.jsonl", max_batch_size=8)) == EXIT_OK
    out = tmp_path / "out.jsonl"
    cmd = _cli(str(tmp_path / "in.jsonl"), "-o", str(out), "--model", str(tiny_checkpoint),
               "--max-batch-size", "8", "--concurrency", "8")  # fmt: skip
    rng, kills = random.Random(20), 0
    while kills < 6:
        before = _lines(out)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while _lines(out) == before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # killed once it has written something, at a random moment after
        time.sleep(rng.uniform(0, 0.2))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        data = out.read_bytes()
        assert _lines(out) >= before
        torn = len(data) - data.rfind(b"\n") - 1
        print(f"kill {kills}: {_lines(out)} lines, torn tail {torn} bytes")
    assert kills >= 5, "the job ended before it was killed 5 times; make it longer"
    final = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert final.returncode == EXIT_OK, final.stderr
    assert out.read_bytes() == (tmp_path / "reference.jsonl").read_bytes()


def test_stdin_to_stdout_with_plain_progress(tmp_path, tiny_checkpoint):
    lines = json.dumps(request(1)) + "\n" + '"Hi"\n{"input": "x", "mode": "bogus"}\n'
    proc = subprocess.run(_cli("-", "-o", "-", "--model", str(tiny_checkpoint)), input=lines, env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == EXIT_LINES_FAILED, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [("output" in r, r.get("id")) for r in records] == [(True, 1), (True, None), (False, None)]
    assert "3 lines (3 this run): 2 answered, 1 errors" in proc.stderr


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[ThreadServer]:
    with tiny_server(tiny_checkpoint) as s:
        yield s


def test_url_mode_answers_as_local_mode(tmp_path, tiny_checkpoint, server, one_thread):
    bad = write_mixed(tmp_path / "in.jsonl", 40, bad_every=4)
    assert run_batch(local(tmp_path, tiny_checkpoint, "local.jsonl")) == EXIT_LINES_FAILED
    remote = BatchOptions(str(tmp_path / "in.jsonl"), str(tmp_path / "remote.jsonl"), url=server.url)
    assert run_batch(remote) == EXIT_LINES_FAILED
    local_records = check_mixed(tmp_path / "local.jsonl", 40, bad)
    remote_records = check_mixed(tmp_path / "remote.jsonl", 40, bad)
    for a, b in zip(local_records, remote_records):
        if "error" in a or ("id" in a and isinstance(a["output"], list)):  # seeded seed-API lines
            assert a == b  # (OpenAI answers carry ids and times; bare prompts are not seeded)


def test_url_mode_on_a_runtime_path_unwraps_model_errors(tmp_path, server):
    (tmp_path / "in.jsonl").write_text(json.dumps(request(2)) + '\n{"input": "x", "top_p": 1.5}\n')
    url = f"{server.url}/endpoints/gpt-2/invocations"
    assert run_batch(BatchOptions(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), url=url)) == 1
    first, second = (json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines())
    assert first["id"] == 2 and first["output"][0].startswith("Line 2 says")
    assert second["error"]["param"] == "top_p"


def test_url_mode_stops_when_the_server_is_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_remote, "BACKOFF_S", 0.01)
    monkeypatch.setattr(batch_remote, "RETRIES", 2)
    (tmp_path / "in.jsonl").write_text(json.dumps(request(1)) + "\n")
    options = BatchOptions(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"),
                           url=f"http://127.0.0.1:{free_port()}")  # fmt: skip
    assert run_batch(options) == EXIT_STOPPED
    assert (tmp_path / "out.jsonl").read_bytes() == b""  # nothing written: a rerun retries the line
