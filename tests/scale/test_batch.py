"""`batch --ray` on the local Ray cluster (2 CPUs) with 2 engine actors of the tiny checkpoint: every line
answered once, in input order, as the local batch answers it; an actor killed mid-run is replaced and
loses no line; a rerun continues a cut output."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from gpt2serve.batch import EXIT_LINES_FAILED, EXIT_STOPPED, BatchOptions, count_lines, read_lines, run_batch
from gpt2serve.scale.batch import plan_blocks, read_blocks
from tests.api.conftest import wait_for
from tests.test_batch import check_mixed, local, write_mixed

on_cluster = pytest.mark.usefixtures("ray_cluster")
LINES = 1000
ACTORS = 2


def comparable(record: dict) -> dict:
    """The record without what differs between two runs: an OpenAI answer's `id` and `created`."""
    output = record.get("output")
    if isinstance(output, dict):
        record = {**record, "output": {k: v for k, v in output.items() if k not in ("id", "created")}}
    return record


def seeded(records: list[dict]) -> dict[int, dict]:
    """The records whose text is fixed by the request: all but the bare prompts (unseeded) that answered."""
    return {i: comparable(r) for i, r in enumerate(records) if "error" in r or "id" in r}


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> tuple[Path, dict, list[dict]]:
    """The input (1,000 lines, some bad), its bad lines, and the local batch's records of it."""
    tmp = tmp_path_factory.mktemp("ray_batch")
    bad = write_mixed(tmp / "in.jsonl", LINES, bad_every=9)
    threads = torch.get_num_threads()
    try:
        assert run_batch(local(tmp, tiny_checkpoint, "local.jsonl")) == EXIT_LINES_FAILED
    finally:
        torch.set_num_threads(threads)
    return tmp, bad, check_mixed(tmp / "local.jsonl", LINES, bad)


def on_ray(tmp: Path, checkpoint: Path, output: str) -> BatchOptions:
    return BatchOptions(str(tmp / "in.jsonl"), str(tmp / output), model=str(checkpoint), threads=1,
                        max_batch_size=8, ray=True, replicas=ACTORS)  # fmt: skip


@pytest.mark.ray
@pytest.mark.slow
@on_cluster
def test_1000_lines_answer_once_in_order_as_the_local_batch(job, tiny_checkpoint):
    tmp, bad, expected = job
    assert run_batch(on_ray(tmp, tiny_checkpoint, "ray.jsonl")) == EXIT_LINES_FAILED
    records = check_mixed(tmp / "ray.jsonl", LINES, bad)
    assert [r.get("id") for r in records] == [r.get("id") for r in expected]
    assert seeded(records) == seeded(expected)
    assert len(seeded(expected)) > 0.8 * LINES


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (from /proc): the local Ray instance this test process started."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def engine_actors() -> list[int]:
    """Process ids of this cluster's engine actors (Ray names its worker processes after the actor)."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"MapBatches(EngineActor)" in f.read():
                    pids.append(pid)
        except OSError:
            continue
    return pids


@pytest.mark.ray
@pytest.mark.slow
@on_cluster
def test_a_killed_actor_is_replaced_and_loses_no_line(job, tiny_checkpoint):
    tmp, bad, expected = job
    out, status = tmp / "killed.jsonl", []
    options = on_ray(tmp, tiny_checkpoint, "killed.jsonl")
    runner = threading.Thread(target=lambda: status.append(run_batch(options)))
    runner.start()
    try:
        wait_for(lambda: out.exists() and out.read_bytes().count(b"\n") >= 150, timeout=60, what="150 lines")
        actors = engine_actors()
        assert len(actors) == ACTORS, actors
        os.kill(actors[0], signal.SIGKILL)
        assert runner.is_alive(), "the job ended before an actor was killed; make it longer"
    finally:
        runner.join(timeout=120)
    assert status == [EXIT_LINES_FAILED]
    records = check_mixed(out, LINES, bad)
    assert seeded(records) == seeded(expected)


@pytest.mark.ray
@pytest.mark.slow
@on_cluster
def test_a_rerun_continues_after_a_torn_tail(job, tiny_checkpoint):
    tmp, bad, expected = job
    kept = (tmp / "local.jsonl").read_bytes().split(b"\n")[:377]
    (tmp / "resumed.jsonl").write_bytes(b"\n".join(kept) + b'\n{"output":["a torn li')
    assert run_batch(on_ray(tmp, tiny_checkpoint, "resumed.jsonl")) == EXIT_LINES_FAILED
    records = check_mixed(tmp / "resumed.jsonl", LINES, bad)
    assert seeded(records) == seeded(expected)
    # Nothing left: a third run answers nothing and leaves the file as it is.
    before = (tmp / "resumed.jsonl").read_bytes()
    assert run_batch(on_ray(tmp, tiny_checkpoint, "resumed.jsonl")) == EXIT_LINES_FAILED
    assert (tmp / "resumed.jsonl").read_bytes() == before


@pytest.mark.parametrize(
    ("flags", "words"),
    [(["--replicas", "2"], "need --ray"), (["--ray-address", "auto"], "need --ray"),
     (["--ray", "--url", "http://127.0.0.1:1"], "does not take --url"),
     (["--ray", "--replicas", "0"], "at least 1")],
)  # fmt: skip
def test_ray_flags_that_do_not_go_together(tmp_path, capsys, flags, words):
    from gpt2serve.cli import main

    out = tmp_path / "out.jsonl"
    assert main(["batch", str(tmp_path / "in.jsonl"), "-o", str(out), *flags]) == EXIT_STOPPED
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_refused_before_joining_a_cluster(tmp_path, tiny_checkpoint, capsys):
    """An output longer than the input, and standard input (the actors cannot read it)."""
    (tmp_path / "in.jsonl").write_text('"a"\n')
    (tmp_path / "out.jsonl").write_text("{}\n{}\n")
    assert run_batch(on_ray(tmp_path, tiny_checkpoint, "out.jsonl")) == EXIT_STOPPED
    assert "more than the 1 of" in capsys.readouterr().err
    stdin = BatchOptions("-", str(tmp_path / "x.jsonl"), ray=True)
    assert run_batch(stdin) == EXIT_STOPPED
    assert "not standard input" in capsys.readouterr().err


TEXTS = [b"", b"a\n", b"a", b"a\nb\n\nc", b"a\r\nb\r\n", b"\n\n\n\n\n", b"long line\nx\n\xff\n"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [0, 1, 2, 5])
@pytest.mark.parametrize("every", [1, 2, 3])
@pytest.mark.parametrize(("as_url", "scan_bytes"), [(False, 3), (True, 1 << 22)])
def test_blocks_cover_the_lines_after_skip_once(tmp_path, monkeypatch, text, skip, every, as_url, scan_bytes):
    from gpt2serve.scale import batch

    monkeypatch.setattr(batch, "SCAN_BYTES", scan_bytes)  # 3: lines across the reads of the numbering pass
    (tmp_path / "in.jsonl").write_bytes(text)
    path = str(tmp_path / "in.jsonl")
    where = (tmp_path / "in.jsonl").as_uri() if as_url else path  # a URL: through pyarrow's filesystems
    blocks, total = plan_blocks(where, skip, every)
    assert total == count_lines(path)
    columns = {key: [b[key] for b in blocks] for key in ("first", "offset", "size")}
    assert read_blocks(where, columns) == list(read_lines(path, skip))
    assert all(b["first"] == skip + k * every for k, b in enumerate(blocks))
