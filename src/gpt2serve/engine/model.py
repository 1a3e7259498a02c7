"""GPT-2 forward pass over a KV cache indexed by slot (kv_cache.py).

Every running sequence owns one slot of the cache, with its own length. One forward call runs any mix of
slots at any positions, which is what continuous batching needs: a decode step feeds one new token for
each active slot; a prefill feeds a whole prompt into one slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from gpt2serve.engine import native
from gpt2serve.engine.config import ModelConfig
from gpt2serve.engine.head_sketch import HeadSketch
from gpt2serve.engine.kv_cache import KVCache
from gpt2serve.engine.linear import (
    DENSE_CHUNK,
    INT8_REDUCE_RANGE,
    MKLDNN_MIN_ROWS,
    PackedLinear,
    gemv_max_rows,
    use_gemv,
)

# decode.c attends row by row: past ~128 prompt tokens a prompt ran faster through the layer-by-layer
# forward (scaled_dot_product_attention) even where both multiply on gemv.c (int8 on a Zen 5: 0.81-0.94x
# the time at 256-512 tokens, benchmarks/bench_prefill.py).
FUSED_MAX_ROWS = 128

# Decode attention reads keys up to the row's position rounded up to this (see DecodeGroup).
KEY_BUCKET = 64


@dataclass
class Batch:
    """What one forward call runs: `tokens[i]` goes into `slots[i]` starting at `starts[i]`."""

    tokens: torch.Tensor  # (B, T) long
    slots: torch.Tensor  # (B,) long
    starts: torch.Tensor  # (B,) long: positions of tokens[:, 0]
    max_len: int  # max(starts) + T: the cache length attention reads
    slot_range: tuple[int, int] | None = None  # (first, end) when the slots are first, first+1, ...
    start: int | None = None  # the position every row starts at, when they share one
    cache_len: int = 1 << 30  # positions a cache slot holds (set by the model): bounds decode key lengths

    @cached_property
    def causal_mask(self) -> torch.Tensor:
        """(B, 1, T, L) bool: query t of row b sees cache positions <= starts[b] + t."""
        T, device = self.tokens.shape[1], self.tokens.device
        pos = self.starts[:, None] + torch.arange(T, device=device)  # (B, T)
        cols = torch.arange(self.max_len, device=device)
        return (cols[None, None, :] <= pos[:, :, None])[:, None]

    @cached_property
    def decode_groups(self) -> list[DecodeGroup]:
        """One-token rows grouped by the key length their attention reads (see DecodeGroup)."""
        starts = self.starts.tolist()
        lengths = [min(-(-(p + 1) // KEY_BUCKET) * KEY_BUCKET, self.cache_len) for p in starts]
        slots, device = self.slots.tolist(), self.starts.device
        groups = []
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            first, group_slots = slots[rows[0]], [slots[i] for i in rows]
            index = torch.tensor(rows, dtype=torch.long, device=device)
            cols = torch.arange(length, device=device)
            past = cols[None, :] > self.starts[index][:, None]  # (G, L): keys past each row's position
            bias = torch.zeros(past.shape, device=device).masked_fill_(past, float("-inf"))
            consecutive = group_slots == list(range(first, first + len(rows)))
            span = (first, first + len(rows)) if consecutive else None
            groups.append(DecodeGroup(index, self.slots[index], span, length, bias[:, None, None, :]))
        return groups


@dataclass
class DecodeGroup:
    """Decode rows whose attention reads the same number of keys: each row's position rounded up to a
    multiple of KEY_BUCKET, the keys past the position masked. With `_attend_group`'s plain matrix
    products, a row's result then depends on its own keys only, never on what else runs in the step
    (torch's fused attention is not batch-invariant on CPU for 64+ keys)."""

    rows: torch.Tensor  # (G,) indices into the batch
    slots: torch.Tensor  # (G,) their slots
    span: tuple[int, int] | None  # (first, end) when the slots are consecutive: the cache is read in place
    length: int  # keys read
    bias: torch.Tensor  # (G, 1, 1, length) float: -inf on the keys a row must not see, else 0


# With int8, the q/k/v projection (its rounding error is amplified by the attention softmax) stays in
# bfloat16. With torch's kernels, whose int8 products quantize the activations too, so does the output
# head (it decides the top token), and the MLP's input projection where those activations have 7 bits
# (no VNNI). This keeps int8's next-token choices within 97% of float32's (test_int8_accuracy.py:
# 99.0% with gemv.c's weight-only int8, whose activations stay float32).
INT8_KEPT_IN_BFLOAT16 = {
    "gemv": ("attn.c_attn",),
    "torch": ("attn.c_attn", "lm_head") + (("mlp.c_fc",) if INT8_REDUCE_RANGE else ()),
}


def layer_format(fmt: str, name: str, kernels: str = "torch") -> str:
    """The weight format of one matrix (`name` as in the checkpoint, without the block prefix) for the
    kernel family ("gemv" or "torch") that runs it."""
    return "bfloat16" if fmt == "int8" and name in INT8_KEPT_IN_BFLOAT16[kernels] else fmt


def kernel_family(cpu_kernels: str, cfg: ModelConfig, device: torch.device) -> str:
    """ "gemv" where gemv.c runs this model's matrices (see linear.use_gemv), else "torch"."""
    return "gemv" if device.type == "cpu" and use_gemv(cpu_kernels, cfg.n_embd) else "torch"


def _norm(sd: dict[str, torch.Tensor], name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    return sd.pop(name + ".weight").float().to(device), sd.pop(name + ".bias").float().to(device)


class Block(torch.nn.Module):
    def __init__(
        self, cfg: ModelConfig, sd: dict[str, torch.Tensor], prefix: str, fmt: str, device, kernels: str
    ):
        super().__init__()
        self.n_head, self.eps = cfg.n_head, cfg.layer_norm_epsilon
        self.ln_1 = _norm(sd, prefix + "ln_1", device)
        self.ln_2 = _norm(sd, prefix + "ln_2", device)

        def lin(name: str) -> PackedLinear:
            w, b = sd.pop(f"{prefix}{name}.weight"), sd.pop(f"{prefix}{name}.bias")
            return PackedLinear(w, b, layer_format(fmt, name, kernels), device, kernels=kernels)

        self.c_attn, self.attn_proj = lin("attn.c_attn"), lin("attn.c_proj")
        self.c_fc, self.mlp_proj = lin("mlp.c_fc"), lin("mlp.c_proj")

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, batch: Batch) -> torch.Tensor:
        """x: (N, C), the batch's B * T token rows in order, then any padding rows (copies of row 0)."""
        B, T = batch.tokens.shape
        C, nh, n = x.shape[1], self.n_head, B * T
        h = F.layer_norm(x, (C,), *self.ln_1, self.eps)
        q, k, v = self.c_attn(h)[:n].view(B, T, 3, nh, C // nh).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        y = _attend(q, k, v, cache.k[layer], cache.v[layer], batch)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(n, C)
        x = self.attn_proj(_pad_rows(y, x.shape[0]), add=x)
        h = F.layer_norm(x, (C,), *self.ln_2, self.eps)
        return self.mlp_proj(self.c_fc(h, gelu=True), add=x)


def _pad_rows(y: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, C) -> (max(n, rows), C): copies of the first row appended."""
    extra = rows - y.shape[0]
    return torch.cat([y, y[:1].expand(extra, -1)]) if extra > 0 else y


def _attend(q, k, v, k_cache, v_cache, batch: Batch) -> torch.Tensor:
    """Write this call's keys/values into their slots, then attend over each slot's used length."""
    T = q.shape[2]
    if batch.slot_range is not None and batch.start is not None:  # consecutive slots, one position: views
        first, end = batch.slot_range
        k_cache[first:end, :, batch.start : batch.start + T] = k
        v_cache[first:end, :, batch.start : batch.start + T] = v
    else:
        pos = batch.starts[:, None] + torch.arange(T, device=q.device)  # (B, T)
        k_cache[batch.slots[:, None], :, pos] = k.transpose(1, 2)  # cache[slot, :, pos] is (nh, hs)
        v_cache[batch.slots[:, None], :, pos] = v.transpose(1, 2)
    if T == 1:
        return _attend_decode(q, k_cache, v_cache, batch)
    if batch.slot_range is not None and batch.start is not None:
        first, end = batch.slot_range
        keys, vals = k_cache[first:end, :, : batch.start + T], v_cache[first:end, :, : batch.start + T]
        if batch.start == 0:
            return F.scaled_dot_product_attention(q, keys, vals, is_causal=True)
        return F.scaled_dot_product_attention(q, keys, vals, attn_mask=batch.causal_mask)
    keys = k_cache[:, :, : batch.max_len].index_select(0, batch.slots)  # (B, nh, L, hs)
    vals = v_cache[:, :, : batch.max_len].index_select(0, batch.slots)
    return F.scaled_dot_product_attention(q, keys, vals, attn_mask=batch.causal_mask)


def _attend_decode(q, k_cache, v_cache, batch: Batch) -> torch.Tensor:
    """One query per row (q: (B, nh, 1, hs)), attention per DecodeGroup."""
    groups = batch.decode_groups
    if len(groups) == 1:
        return _attend_group(q, k_cache, v_cache, groups[0])
    out = torch.empty_like(q)
    for g in groups:
        out.index_copy_(0, g.rows, _attend_group(q.index_select(0, g.rows), k_cache, v_cache, g))
    return out


def _attend_group(q, k_cache, v_cache, g: DecodeGroup) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v with plain matrix products (each row's sums independent of the others);
    keys read in place where the group's slots are consecutive, gathered otherwise."""
    if g.span is not None:
        first, end = g.span
        keys, vals = k_cache[first:end, :, : g.length], v_cache[first:end, :, : g.length]
    else:
        keys = k_cache[:, :, : g.length].index_select(0, g.slots)  # (G, nh, L, hs)
        vals = v_cache[:, :, : g.length].index_select(0, g.slots)
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), keys.transpose(-1, -2))  # (G, nh, 1, L)
    return torch.matmul(torch.softmax(scores + g.bias, dim=-1), vals)


class TokenEmbedding:
    """The token embedding table, read from the tied output head where gemv.c holds it as a plain (V, C)
    matrix, so the table is not stored twice: float32 (the same tensor) and half-width rows as they are;
    int8 rows plus one more int8 byte per weight, their rounding error in steps of 1/RESIDUAL_STEPS of the
    row's (error at most 1/508 of a step: ~16-bit precision, 2 bytes a weight instead of float32's 4).
    Elsewhere the loaded table is kept. Looked-up rows come in the activations' dtype."""

    RESIDUAL_STEPS = 254

    def __init__(self, wte: torch.Tensor, head: PackedLinear):
        self.table, self.scale, self.residual = wte, None, None
        if head.kernel == "gemv":
            self.table, self.scale = head.weight, head.scale
            if self.scale is not None:
                self.residual = torch.empty_like(head.weight)
                for start in range(0, len(wte), DENSE_CHUNK):  # small float32 temporaries
                    rows = slice(start, start + DENSE_CHUNK)
                    error = wte[rows].float() / self.scale[rows, None] - head.weight[rows]  # in [-1/2, 1/2]
                    self.residual[rows] = torch.round(error * self.RESIDUAL_STEPS).clamp(-127, 127)

    def __call__(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        rows = self.table[tokens].to(dtype)
        if self.scale is None:
            return rows
        rows += self.residual[tokens].to(dtype) / self.RESIDUAL_STEPS
        return rows * self.scale[tokens].unsqueeze(-1).to(dtype)


class GPT2(torch.nn.Module):
    """GPT-2 language model; weights come from a state dict with GPT-2's checkpoint names.

    The state dict is consumed: each tensor is removed from it once packed, so the loaded weights and
    their packed copies are not all held at once. Pass `dict(sd)` to keep yours."""

    def __init__(
        self,
        cfg: ModelConfig,
        sd: dict[str, torch.Tensor],
        fmt: str = "float32",
        device="cpu",
        cpu_kernels: str = "auto",
    ):
        super().__init__()
        self.cfg = cfg
        self.device = torch.device(device)
        self.act_dtype = (
            torch.float32
            if fmt in ("float32", "int8") or self.device.type == "cpu"
            else {"bfloat16": torch.bfloat16, "float16": torch.float16}[fmt]
        )
        self.kernels = family = kernel_family(cpu_kernels, cfg, self.device)
        # The head first: the loaded table is freed before the blocks load (a lower peak while loading).
        wte = sd.pop("wte.weight").to(self.device)  # (V, C)
        head_fmt = layer_format(fmt, "lm_head", family)
        self.lm_head = PackedLinear.lm_head(wte, head_fmt, self.device, kernels=family)
        self.wte = TokenEmbedding(wte, self.lm_head)
        del wte
        gemv_head = self.lm_head.kernel == "gemv" and self.lm_head.scale is None  # float32 or half width
        self.head_sketch = HeadSketch(self.lm_head) if gemv_head else None
        self.wpe = sd.pop("wpe.weight").to(self.device)  # (P, C), looked-up rows cast to act_dtype
        self.blocks = torch.nn.ModuleList(
            Block(cfg, sd, f"h.{i}.", fmt, self.device, family) for i in range(cfg.n_layer)
        )
        self.ln_f = _norm(sd, "ln_f", self.device)
        self.min_rows = MKLDNN_MIN_ROWS if self.lm_head.kernel == "mkldnn_packed" else 1
        self.decode_layers = self._decode_layers()
        self.fused_decode = self.decode_layers is not None  # tests turn it off to compare the two paths
        self.fused_rows = min(gemv_max_rows(fmt), FUSED_MAX_ROWS)  # the most rows decode.c takes

    def _decode_layers(self) -> native.DecodeLayers | None:
        """decode.c's view of the layers, where every matrix runs on gemv.c and the widths suit it."""
        mats = [(b.c_attn, b.attn_proj, b.c_fc, b.mlp_proj) for b in self.blocks]
        fits = self.cfg.n_embd % 8 == 0 and self.cfg.head_dim % 8 == 0 and self.act_dtype == torch.float32
        if not fits or any(m.kernel != "gemv" or m.out_features % 8 for ms in mats for m in ms):
            return None
        names = ("attn", "proj", "fc", "out")
        layers = [
            {"ln_1": b.ln_1, "ln_2": b.ln_2, **{k: (m.weight, m.scale, m.bias) for k, m in zip(names, ms)}}
            for b, ms in zip(self.blocks, mats)
        ]
        return native.DecodeLayers(layers, self.cfg.n_head, self.cfg.layer_norm_epsilon)

    def new_cache(self, n_slots: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.cfg, n_slots, max_len or self.cfg.n_positions, self.act_dtype, self.device)

    def takes_rows(self, n: int, cache: KVCache) -> bool:
        """Whether `forward_rows` runs `n` rows: on decode.c, up to `fused_rows`, float32 cache."""
        return self.fused_decode and n <= self.fused_rows and cache.k.dtype == torch.float32

    def _head(self, x: torch.Tensor, top: int | None) -> torch.Tensor:
        """Logits of the (N, C) final-norm outputs; with `top`, only what each row's `top` largest can
        be is exact, the rest may be -inf (see head_sketch.py)."""
        sketch = self.head_sketch
        if top is not None and sketch is not None and x.dim() == 2 and sketch.pays(x.shape[0], top):
            return sketch.logits(x, top)
        return self.lm_head(x)

    @torch.inference_mode()
    def forward_rows(
        self,
        tokens: list[int],
        slots: list[int],
        positions: list[int],
        picks: list[int] | None,
        cache: KVCache,
        top: int | None = None,
    ) -> torch.Tensor:
        """One token per row at any (slot, position): decode rows and whole prompts (rows of one slot at
        consecutive positions) in one pass over the weights. Every row's key and value is written before
        any row attends, and each row's result is what it would be alone. Logits (len(picks), V) float32
        of the rows `picks` (None: every row; `top`: as in `forward`). Only where
        `takes_rows(len(tokens), cache)`."""
        C = self.cfg.n_embd
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=self.device)  # noqa: E731
        tokens_t, slots_t, pos_t = as_tensor(tokens), as_tensor(slots), as_tensor(positions)
        x = self.wte(tokens_t, self.act_dtype) + self.wpe[pos_t].to(self.act_dtype)
        x = native.decode(self.decode_layers, x, slots_t, pos_t, cache.k, cache.v)
        x = x if picks is None else x[as_tensor(picks)]
        x = F.layer_norm(x, (C,), *self.ln_f, self.cfg.layer_norm_epsilon)
        return self._head(x, top).float()

    @torch.inference_mode()
    def forward(
        self, batch: Batch, cache: KVCache, last_only: bool = True, top: int | None = None
    ) -> torch.Tensor:
        """Logits (B, V) float32 of each row's last token (or (B, T, V) with last_only=False). With `top`
        (for greedy and top-k choices) only the logits that can be among a row's `top` largest are sure
        to be computed; the others may be -inf."""
        B, T = batch.tokens.shape
        C = self.cfg.n_embd
        batch.cache_len = cache.max_len
        pos = batch.starts[:, None] + torch.arange(T, device=self.device)  # (B, T)
        x = self.wte(batch.tokens, self.act_dtype) + self.wpe[pos].to(self.act_dtype)  # (B, T, C)
        if self.takes_rows(B * T, cache):
            # on the C kernels: every layer in one call, one row per token (see csrc/decode.c)
            slots = batch.slots if T == 1 else batch.slots.repeat_interleave(T)
            x = native.decode(self.decode_layers, x.view(B * T, C), slots, pos.view(-1), cache.k, cache.v)
        else:
            # Rows run through the layers as one (N, C) matrix, padded once (with copies of row 0, so
            # every row-wise result stays the same) up to the rows the CPU kernels stream fastest for.
            x = _pad_rows(x.view(B * T, C), self.min_rows)
            for i, block in enumerate(self.blocks):
                x = block(x, i, cache, batch)
        if T > 1 or not last_only:
            x = x[: B * T].view(B, T, C)
            x = x[:, -1] if last_only else x
        x = F.layer_norm(x, (C,), *self.ln_f, self.cfg.layer_norm_epsilon)
        return self._head(x, top)[:B].float()

    def step(
        self,
        rows: list[tuple[int, int, int]],
        prompts: list[tuple[list[int], int]],
        cache: KVCache,
        top: int | None = None,
    ) -> torch.Tensor:
        """One engine step: logits (len(rows) + len(prompts), V) float32 of each decode row's next token
        (row: token, slot, position) and then of each prompt's last position (prompt: ids, the slot it
        fills from position 0); `top` as in `forward`. The path is this method's choice: everything in
        one pass on decode.c where it takes the rows, else the layer-by-layer forward for the decode
        rows and for each prompt."""
        tokens, slots, positions = ([r[i] for r in rows] for i in range(3))
        if self.takes_rows(len(rows) + sum(len(ids) for ids, _ in prompts), cache):
            picks = list(range(len(rows))) if prompts else None
            for ids, slot in prompts:
                tokens += ids
                slots += [slot] * len(ids)
                positions += range(len(ids))
                picks.append(len(tokens) - 1)  # the prompt's last position
            return self.forward_rows(tokens, slots, positions, picks, cache, top)
        batches = [make_batch([[t] for t in tokens], slots, positions, self.device)] if rows else []
        batches += [make_batch([ids], [slot], [0], self.device) for ids, slot in prompts]
        parts = [self(batch, cache, top=top) for batch in batches]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def make_batch(tokens: list[list[int]], slots: list[int], starts: list[int], device) -> Batch:
    """A forward batch from Python lists; every row must hold the same number of tokens."""
    T = len(tokens[0])
    consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
    return Batch(
        tokens=torch.tensor(tokens, dtype=torch.long, device=device),
        slots=torch.tensor(slots, dtype=torch.long, device=device),
        starts=torch.tensor(starts, dtype=torch.long, device=device),
        max_len=max(starts) + T,
        slot_range=(slots[0], slots[0] + len(slots)) if consecutive else None,
        start=starts[0] if all(s == starts[0] for s in starts) else None,
    )
