"""CUDA graphs of the static decode step: one per (rows, keys) bucket, captured on first use.

A graph replays static_step.decode_step's kernels on fixed buffers: its (3, B) inputs are copied into
the graph's own before each replay and its (B, V) logits are read from the graph's output (valid until
the bucket's next replay). All graphs share one memory pool. Capture happens the first time a bucket
runs (a few steps' time); `capture_all` does every bucket up front, for a server that must not pause.
"""

from __future__ import annotations

import logging
import time

import torch

from gpt2serve.engine.device.static_step import StaticStep, StepFn

log = logging.getLogger(__name__)

WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS workspaces, lazy inits)


class CudaGraphs:
    """The runner of a StaticStep on CUDA (pass `CudaGraphs.runner_for` as its runner)."""

    def __init__(self, step: StaticStep):
        if step.model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, not {step.model.device}")
        self.step = step
        self.graphs: dict[tuple[int, int], StepFn] = {}
        self.pool = None
        self.capture_s = 0.0  # seconds spent capturing so far

    def __call__(self, rows: int, keys: int) -> StepFn:
        """The replay function of bucket (rows, keys), captured now if it is new."""
        replay = self.graphs.get((rows, keys))
        if replay is None:
            started = time.perf_counter()
            replay = self.graphs[rows, keys] = self._capture(rows, keys)
            self.capture_s += time.perf_counter() - started
            log.debug("captured the decode step for %d rows x %d keys", rows, keys)
        return replay

    def _capture(self, rows: int, keys: int) -> StepFn:
        step = self.step
        inputs = torch.zeros((3, rows), dtype=torch.long, device=step.model.device)
        inputs[2] = step.spare  # warm-up and capture runs write only the spare slot
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                step.eager(inputs, keys)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a caller timing, a sync) do not break the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = step.eager(inputs, keys)
        self.pool = graph.pool()

        def replay(new_inputs: torch.Tensor, _keys: int) -> torch.Tensor:
            inputs.copy_(new_inputs)
            graph.replay()
            return out

        return replay

    def capture_all(self) -> float:
        """Capture every bucket not captured yet; the seconds it took."""
        started = time.perf_counter()
        for rows in self.step.row_buckets:
            for keys in self.step.key_buckets:
                self(rows, keys)
        torch.cuda.synchronize()
        return time.perf_counter() - started
