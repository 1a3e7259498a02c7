"""The KV cache: keys and values preallocated per layer, indexed by slot.

Every running sequence (or beam) owns one slot, with its own length; the model writes a row's key and
value at (slot, position) and attends over the slot's used length. Beam forks and `n > 1` copy slots.
"""

from __future__ import annotations

import math

import torch

from gpt2serve.engine.config import ModelConfig


class KVCache:
    """Keys and values for `n_slots` sequences of up to `max_len` tokens each."""

    def __init__(
        self, cfg: ModelConfig, n_slots: int, max_len: int, dtype: torch.dtype, device: torch.device
    ):
        shape = (cfg.n_layer, n_slots, cfg.n_head, max_len, cfg.head_dim)
        # Fresh pages from the OS are zero and stay out of RSS until written; small caches are zeroed.
        nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
        make = torch.empty if (device.type == "cpu" and nbytes > (256 << 20)) else torch.zeros
        self.k = make(shape, dtype=dtype, device=device)
        self.v = make(shape, dtype=dtype, device=device)
        self.n_slots = n_slots
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def copy_slots(
        self, src: list[int], dst: list[int], length: int, starts: list[int] | None = None
    ) -> None:
        """Copy positions `starts[i]` (default 0) up to `length` of slot `src[i]` into slot `dst[i]` (beam
        forks, n > 1); no slot may be both a source and a destination. Slot by slot: a gather over the
        slot axis of the cache would walk every slot's full context."""
        if set(src) & set(dst):
            raise ValueError(f"slots {sorted(set(src) & set(dst))} are both copied from and into")
        for s, d, start in zip(src, dst, starts or [0] * len(src), strict=True):
            for cache in (self.k, self.v):
                cache[:, d, :, start:length].copy_(cache[:, s, :, start:length])
