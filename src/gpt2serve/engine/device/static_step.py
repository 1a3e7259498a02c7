"""A decode step of static shape: what a CUDA graph can capture, run eagerly anywhere.

Row i of a step reads KV slot i, so attention reads the cache in place (a view of the first B slots, no
gather). The step runs over a bucket of B rows (1, 2, 4, ... up to the cache's slots) covering the
highest slot decoding, and over the first L keys of each slot (64, 128, 256 ... up to the context)
covering the longest row; keys past a row's position are masked (scaled_dot_product_attention). Rows
whose slot is not decoding this step (free, or a prompt being prefilled) write their key and value into
the cache's spare last slot and their logits are dropped. Inside the step: no Python branch on a tensor
value and no copy to the host, so its shapes and its kernels depend on (B, L) alone.

`StaticStep(model, cache)` is called like `GPT2.step`'s decode half: rows (token, slot, position) in,
logits (len(rows), V) float32 out. graphs.py replays the same function from CUDA graphs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt2serve.engine.device.host import to_device
from gpt2serve.engine.kv_cache import KVCache
from gpt2serve.engine.model import GPT2

MIN_KEYS = 64  # the smallest key bucket

StepFn = Callable[[torch.Tensor, int], torch.Tensor]  # (inputs (3, B) long, keys L) -> logits (B, V)


def powers_up_to(first: int, limit: int) -> list[int]:
    """first, 2 first, 4 first ... while below `limit`, then `limit`: the sizes a step is padded to."""
    sizes, size = [], first
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def bucket(sizes: list[int], n: int) -> int:
    """The smallest of `sizes` (ascending) holding `n`."""
    return next(s for s in sizes if s >= n)


def decode_step(model: GPT2, cache: KVCache, inputs: torch.Tensor, keys: int) -> torch.Tensor:
    """Logits (B, V) float32 of one token per row. `inputs` (3, B) long: the rows' tokens, positions,
    and the slots their keys and values are written to (row i attends over slot i's first `keys`
    positions up to its own). Pure tensor code: the same kernels whatever the values."""
    tokens, positions, write_slots = inputs[0], inputs[1], inputs[2]
    B, C, nh = tokens.shape[0], model.cfg.n_embd, model.cfg.n_head
    eps, dtype = model.cfg.layer_norm_epsilon, model.act_dtype
    x = model.wte(tokens, dtype) + model.wpe[positions].to(dtype)  # (B, C)
    visible = torch.arange(keys, device=tokens.device)[None, :] <= positions[:, None]  # (B, L)
    mask = visible[:, None, None, :]  # (B, 1, 1, L): broadcast over heads and the one query
    for layer, block in enumerate(model.blocks):
        h = F.layer_norm(x, (C,), *block.ln_1, eps)
        q, k, v = block.c_attn(h).view(B, 3, nh, C // nh).unbind(1)  # (B, nh, hs) each
        k_cache, v_cache = cache.k[layer], cache.v[layer]
        k_cache[write_slots, :, positions] = k.to(k_cache.dtype)
        v_cache[write_slots, :, positions] = v.to(v_cache.dtype)
        y = F.scaled_dot_product_attention(
            q[:, :, None], k_cache[:B, :, :keys], v_cache[:B, :, :keys], attn_mask=mask
        )  # (B, nh, 1, hs)
        x = block.attn_proj(y.reshape(B, C), add=x)
        h = F.layer_norm(x, (C,), *block.ln_2, eps)
        x = block.mlp_proj(block.c_fc(h, gelu=True), add=x)
    x = F.layer_norm(x, (C,), *model.ln_f, eps)
    return model.lm_head(x).float()


class StaticStep:
    """Decode rows through `decode_step` padded to (rows, keys) buckets. `cache` must hold one slot more
    than the scheduler hands out: the last is where rows outside the step write. `runner(B, L)` gives
    the function that runs a bucket (default: `decode_step` eagerly; graphs.py: a CUDA graph replay)."""

    def __init__(self, model: GPT2, cache: KVCache, runner: Callable[[int, int], StepFn] | None = None):
        self.model, self.cache = model, cache
        self.spare = cache.n_slots - 1
        self.row_buckets = powers_up_to(1, self.spare)
        self.key_buckets = powers_up_to(min(MIN_KEYS, cache.max_len), cache.max_len)
        self.runner = runner or (lambda rows, keys: self.eager)

    def eager(self, inputs: torch.Tensor, keys: int) -> torch.Tensor:
        with torch.inference_mode():
            return decode_step(self.model, self.cache, inputs, keys)

    def shape(self, rows: list[tuple[int, int, int]]) -> tuple[int, int]:
        """The (rows, keys) bucket of a step over `rows` (token, slot, position)."""
        return bucket(self.row_buckets, max(r[1] for r in rows) + 1), bucket(
            self.key_buckets, max(r[2] for r in rows) + 1
        )

    def inputs(self, rows: list[tuple[int, int, int]], width: int) -> torch.Tensor:
        """The (3, width) inputs of `rows`, each at its slot's column; the other columns write into the
        spare slot. Built on the host and copied to the device once."""
        table = torch.zeros((3, width), dtype=torch.long)
        table[2] = self.spare
        token, slot, position = (torch.tensor(c, dtype=torch.long) for c in zip(*rows, strict=True))
        table[0, slot], table[1, slot], table[2, slot] = token, position, slot
        return to_device(table, self.model.device)

    def __call__(self, rows: list[tuple[int, int, int]]) -> torch.Tensor:
        """Logits (len(rows), V) float32 of each row's next token; rows: (token, slot, position), each
        slot below the spare one and at most once."""
        width, keys = self.shape(rows)
        logits = self.runner(width, keys)(self.inputs(rows, width), keys)
        slots = to_device(torch.tensor([r[1] for r in rows], dtype=torch.long), logits.device)
        return logits.index_select(0, slots)
