"""How an engine's steps run: the forward path and the token chooser that goes with it.

The model's own path: `GPT2.step` (every row in one pass on decode.c where it takes them, else layer by
layer) and chooser.TokenChooser. The device path (`decode_step` static, or auto on CUDA): decode rows
through device/static_step.py (replayed from CUDA graphs on CUDA, eager elsewhere), a step's prompts
beside them by the model's own step, and device/chooser.py's DeviceTokenChooser. The engine asks this
object for a step's logits, whether new prompts may join a decode step, and which chooser to use.
"""

from __future__ import annotations

import torch

from gpt2serve.engine.chooser import TokenChooser, logits_read
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.device.chooser import DeviceTokenChooser
from gpt2serve.engine.device.graphs import CudaGraphs
from gpt2serve.engine.device.static_step import StaticStep
from gpt2serve.engine.kv_cache import KVCache
from gpt2serve.engine.model import GPT2
from gpt2serve.engine.request import Request, Row


def uses_static_step(config: EngineConfig, device: torch.device) -> bool:
    """Whether decode steps run engine/device/'s static step: `decode_step` static, or auto on CUDA."""
    return config.decode_step == "static" or (config.decode_step == "auto" and device.type == "cuda")


def static_step(model: GPT2, cache: KVCache) -> StaticStep:
    """The static decode step over `cache`: replayed from CUDA graphs on CUDA, eager elsewhere."""
    step = StaticStep(model, cache)
    if model.device.type == "cuda":
        step.runner = CudaGraphs(step)
    return step


class StepPath:
    """A step's forward over `cache` and the chooser of its tokens; `static`: the device path's step."""

    def __init__(self, model: GPT2, cache: KVCache, static: StaticStep | None = None):
        self.model, self.cache, self.static = model, cache, static
        self.chooser: type[TokenChooser] = TokenChooser if static is None else DeviceTokenChooser

    @classmethod
    def of(cls, model: GPT2, cache: KVCache, config: EngineConfig, device: torch.device) -> StepPath:
        """The path `config` asks for on `device` (see `uses_static_step`)."""
        return cls(model, cache, static_step(model, cache) if uses_static_step(config, device) else None)

    def joins(self, rows: int) -> bool:
        """Whether new prompts may run inside a decode step of `rows` rows in all (prompt tokens
        included): where decode.c takes them all, and never beside a static step."""
        return self.static is None and self.model.takes_rows(rows, self.cache)

    def forward(self, rows: list[Row], prompts: list[Request]) -> torch.Tensor:
        """Logits (len(rows) + len(prompts), V) float32: each decode row's next token, then each started
        prompt's last position, as `GPT2.step` gives them, reading only the logits choosing reads
        (`chooser.logits_read`). A prompt runs in its request's first slot, then its cache is copied to
        the request's other sequences' slots."""
        top = logits_read([r.params for r, _ in rows] + [r.params for r in prompts])
        decode = [(s.history[-1], s.slot, len(s.history) - 1) for _, s in rows]
        logits = self._logits(decode, [(req.prompt_ids, req.sequences[0].slot) for req in prompts], top)
        for req in prompts:
            first, others = req.sequences[0], req.sequences[1:]
            self.cache.copy_slots([first.slot] * len(others), [s.slot for s in others], len(req.prompt_ids))
        return logits

    def _logits(
        self, rows: list[tuple[int, int, int]], prompts: list[tuple[list[int], int]], top: int | None
    ) -> torch.Tensor:
        """GPT2.step's logits: decode rows through the static step where there is one, the prompts then
        by the model's own step."""
        if self.static is None or not rows:
            return self.model.step(rows, prompts, self.cache, top=top)
        logits = self.static(rows)
        return torch.cat([logits, self.model.step([], prompts, self.cache, top=top)]) if prompts else logits
