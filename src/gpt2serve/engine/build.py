"""What an engine is built from: the device and weight format its config resolves to, the model on
them, a KV cache sized to the memory budget, the scheduler over its slots, and the counters it keeps."""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from gpt2serve.engine.config import EngineConfig, resolve_dtype
from gpt2serve.engine.kv_cache import KVCache
from gpt2serve.engine.loader import READ_DTYPES, LoadedModel, load_checkpoint
from gpt2serve.engine.loading.memory import returning_freed_memory
from gpt2serve.engine.model import GPT2
from gpt2serve.engine.scheduler import Scheduler
from gpt2serve.engine.step_path import uses_static_step

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class EngineStats:
    steps: int = 0  # decode steps
    decoded_tokens: int = 0  # sequences advanced by decode steps
    max_step_batch: int = 0  # the most sequences one decode step ran
    prefills: int = 0
    prefill_tokens: int = 0
    prefills_in_step: int = 0  # of the prefills, those run inside a decode step
    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0

    def count_step(self, rows: int) -> None:
        self.steps += 1
        self.decoded_tokens += rows
        self.max_step_batch = max(self.max_step_batch, rows)

    def count_prefills(self, prompt_tokens: list[int], in_step: bool) -> None:
        """Prompts of these lengths prefilled by one forward (`in_step`: inside a decode step)."""
        self.prefills += len(prompt_tokens)
        self.prefill_tokens += sum(prompt_tokens)
        self.prefills_in_step += len(prompt_tokens) if in_step else 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def placement(config: EngineConfig) -> tuple[torch.device, str]:
    """The device and weight format `config` asks for, resolved on this machine."""
    device = resolve_device(config.device)
    return device, resolve_dtype(config.dtype, str(device))


def build_model(
    loaded: LoadedModel, config: EngineConfig, device: torch.device, dtype: str
) -> tuple[GPT2, KVCache, Scheduler]:
    """The model (its weights packed from `loaded`), its KV cache and the scheduler over the slots (the
    static step's cache has one slot more, which the scheduler never hands out: see static_step.py)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    model = GPT2(loaded.config, loaded.state_dict, dtype, device, config.cpu_kernels)
    n_slots = _slots_that_fit(model, config)
    max_tokens = config.max_total_tokens or n_slots * loaded.config.n_positions
    per_request = max(1, math.ceil(n_slots * config.max_request_share))
    cache = model.new_cache(n_slots + uses_static_step(config, device))
    return model, cache, Scheduler(n_slots, config.max_queue, max_tokens, per_request)


def lower_thread_priority(steps: int) -> None:
    """Run the calling thread `steps` nice steps lower. On Linux the priority is per thread and the
    threads it starts (the kernels' OpenMP workers) inherit it: called first thing on the engine thread,
    it lets the HTTP front preempt the model whenever the front has work."""
    if not steps or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except OSError as exc:  # not permitted here: run at the front's priority
        log.warning("could not lower the engine thread's priority: %s", exc)


def _slots_that_fit(model: GPT2, config: EngineConfig) -> int:
    """max_batch_size, or fewer where that many full-context KV slots exceed kv_cache_gb."""
    cfg = model.cfg
    per_slot = 2 * cfg.n_layer * cfg.n_positions * cfg.n_embd * model.act_dtype.itemsize
    fit = max(1, int(config.kv_cache_gb * 2**30 // per_slot))
    if fit < config.max_batch_size:
        log.warning(
            "KV cache: %d slots of %d MB fit in %.1f GB (max_batch_size %d); --kv-cache-gb for more",
            fit,
            per_slot >> 20,
            config.kv_cache_gb,
            config.max_batch_size,
        )
    return min(config.max_batch_size, fit)


def load_and_build(model: str, config: EngineConfig, build: Callable[[LoadedModel], T]) -> T:
    """`build(the checkpoint)`, the checkpoint read lazily (each tensor read when the model packs it,
    then dropped), in a short-lived thread: OpenMP keeps a worker pool per calling thread, and a pool
    left in the caller's thread makes the engine thread's workers sleep between parallel regions instead
    of spinning (10-20 % slower decode steps, measured on 2 cores)."""
    read_as = READ_DTYPES[placement(config)[1]]

    def run() -> T:
        with returning_freed_memory():
            return build(load_checkpoint(model, dtype=read_as))

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt2serve-load") as pool:
        return pool.submit(run).result()
