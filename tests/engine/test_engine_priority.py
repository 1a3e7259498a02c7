"""The engine thread, and the kernel threads it starts, run `engine_nice` steps below the HTTP front."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.engine import Engine
from gpt2serve.engine.params import SamplingParams

pytestmark = pytest.mark.skipif(
    not hasattr(os, "setpriority"), reason="os.setpriority is POSIX-only: runs on Linux, skipped on Windows"
)


def _thread_nice() -> dict[int, int]:
    """Every thread of this process: its id -> its nice value (Linux: per thread)."""
    return {int(t): os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}


def _run_engine(path: Path, nice: int) -> tuple[dict[int, int], int]:
    before = set(_thread_nice())
    engine = Engine.load(str(path), EngineConfig(max_batch_size=4, engine_nice=nice, device="cpu"))
    engine.start()
    try:
        engine.generate_sync("Hello there", SamplingParams(max_new_tokens=4))
        started = {t: n for t, n in _thread_nice().items() if t not in before}
        return started, engine._thread.native_id
    finally:
        engine.stop()


def test_engine_threads_run_below_the_front(tiny_checkpoint: Path) -> None:
    front = os.getpriority(os.PRIO_PROCESS, 0)
    started, engine_tid = _run_engine(tiny_checkpoint, 7)
    assert started[engine_tid] == min(19, front + 7)
    assert os.getpriority(os.PRIO_PROCESS, 0) == front  # the calling (front) thread is untouched
    if torch.get_num_threads() > 1:  # the OpenMP workers the engine thread started inherit its priority
        workers = [t for t in started if t != engine_tid]
        assert workers and all(started[t] == min(19, front + 7) for t in workers)


def test_nice_zero_leaves_the_priority(tiny_checkpoint: Path) -> None:
    front = os.getpriority(os.PRIO_PROCESS, 0)
    started, engine_tid = _run_engine(tiny_checkpoint, 0)
    assert started[engine_tid] == front


def test_nice_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="engine_nice"):
        EngineConfig(engine_nice=20)
