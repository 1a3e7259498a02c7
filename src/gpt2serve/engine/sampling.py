"""Choosing a sampling row's token: the reference sampler, and the one dispatcher over its fast paths.

`reference` is the definition: what Hugging Face `generate()` does to one row of processed logits when it
samples (`TemperatureLogitsWarper` -> `TopKLogitsWarper` -> `TopPLogitsWarper` with min_tokens_to_keep=1,
then softmax and `torch.multinomial` with the row's generator), matched bit for bit, ties included.

`choose` is the dispatcher: each row's token exactly as `reference` draws it (the same token, the
generator left in the same state), by the first path that can decide it:
  1. sampling_fast.draw_top_k: top-k rows from their top-k values alone (in C, all rows at once);
  2. the reference's warpers, top-p's cut from sampling_fast.top_p_cut (a partial selection: a small
     nucleus) or top_p_exact (the values sorted in C: any nucleus) where they decide, else torch.sort
     as HF does;
  3. the draw (`draw`): sampling_fast.replay_multinomial, else torch.multinomial.
A fast path that cannot be sure returns None and leaves the generator untouched. The model's head sketch
is one more, upstream: chooser.logits_read lets a step compute only the logits these paths read. The
logits processors (repetition penalty, n-gram ban, OpenAI's penalties) run before, in processors.py.

`choose_batch` is the device path (the engine's static decode step, device/): every row at once as
tensor ops, no copy to the host; greedy rows exactly as here, sampled rows drawn as device/sampling.py
says (the same kept tokens and distribution, reproducible per seed and device, not the reference's draw).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gpt2serve.engine import sampling_fast
from gpt2serve.engine.device import sampling as device_sampling
from gpt2serve.engine.device.host import to_device
from gpt2serve.engine.params import SamplingParams

NEG_INF = float("-inf")
FAST_MAX_TOP_K = sampling_fast.FAST_MAX_TOP_K


# -- the reference ----------------------------------------------------------------------------------------


def reference(
    row: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> int:
    """HF generate()'s sampling step for one (V,) row of processed logits."""
    scores = row[None]
    if temperature != 1.0:
        scores = scores / temperature
    if top_k != 0:
        scores = top_k_filter(scores, top_k)
    if top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    probs = scores.softmax(dim=-1)
    return int(torch.multinomial(probs[0], 1, generator=generator))


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """HF's TopKLogitsWarper on (B, V) scores: every score below the k-th largest becomes -inf."""
    top_k = min(max(top_k, 1), scores.shape[-1])
    return scores.masked_fill(scores < torch.topk(scores, top_k)[0][..., -1, None], NEG_INF)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF's TopPLogitsWarper on (B, V) scores: sorted ascending, the positions whose cumulative
    probability is <= 1 - top_p become -inf, the largest always kept (its unstable sort decides ties)."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = 0
    return scores.masked_fill(remove.scatter(1, sorted_indices, remove), NEG_INF)


# -- the dispatcher ---------------------------------------------------------------------------------------


def choose(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """The token of each sampling row (`logits` processed, one row per entry of `params`): what
    `reference` draws for it, by the first path that can decide it."""
    tokens = sampling_fast.draw_top_k(logits, params, generators)
    nucleus = sampling_fast.draw_top_p(logits, params, generators)
    tokens = [k if k is not None else p for k, p in zip(tokens, nucleus)]
    for i, (row, p, gen) in enumerate(zip(logits, params, generators, strict=True)):
        if tokens[i] is None:
            tokens[i] = draw(warp_row(row, p.temperature, p.top_k, p.top_p).softmax(dim=-1), gen)
    return tokens


def warp_row(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The reference's warpers on one (V,) row; filtered entries become -inf."""
    scores = row if temperature == 1 else row / temperature
    if 0 < top_k < scores.shape[-1]:
        scores = top_k_filter(scores[None], top_k)[0]
    if top_p >= 1:
        return scores
    cut = sampling_fast.top_p_cut(scores, top_p)
    if cut is not None:
        return scores.masked_fill(scores < cut, NEG_INF)
    filtered = sampling_fast.top_p_exact(scores, top_p)
    return filtered if filtered is not None else top_p_filter(scores[None], top_p)[0]


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """`torch.multinomial(probs, 1, generator=generator)` for a (V,) row, replayed where it can be.
    Probabilities move to the generator's device, so a CPU generator gives the same stream whatever
    device the model runs on; `None` draws from torch's global generator."""
    if generator is not None and probs.device != generator.device:
        probs = probs.to(generator.device)
    token = sampling_fast.replay_multinomial(probs, generator)
    return token if token is not None else int(torch.multinomial(probs, 1, generator=generator))


# -- batches of rows ----------------------------------------------------------------------------------


def warp(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """`warp_row` for each row of (B, V) logits, with that row's temperature, top-k (0: off) and top-p
    (1.0: off); pass top_p and temperature in float64, the requested values."""
    settings = zip(logits, temperature.tolist(), top_k.tolist(), top_p.tolist(), strict=True)
    return torch.stack([warp_row(row, t, int(k), p) for row, t, k, p in settings])


def sample(logits: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """(B,) token ids: softmax, then one draw per row with that row's generator (see `draw`)."""
    probs = torch.softmax(logits.float(), dim=-1)
    tokens = [draw(row, gen) for row, gen in zip(probs, generators, strict=True)]
    return torch.tensor(tokens, dtype=torch.long, device=logits.device)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B,) argmax token ids (the first of tied maxima, as HF greedy search)."""
    return logits.argmax(dim=-1)


# -- the device path --------------------------------------------------------------------------------------


def choose_batch(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """(B,) token ids of processed (B, V) logits on their device: greedy rows the argmax, sampling rows
    drawn by device/sampling.py (row i's exponentials from `generators[i]`, None: the device's default
    generator, one call for all such rows)."""
    tokens = greedy(logits)
    if not any(p.do_sample for p in params):
        return tokens
    settings = [(p.temperature, p.top_k, p.top_p, p.do_sample) for p in params]
    table = to_device(torch.tensor(settings, dtype=torch.float64).T.contiguous(), logits.device)  # (4, B)
    temperature, top_k, top_p, do_sample = table.unbind(0)
    cuts = any(p.do_sample and p.top_k for p in params), any(p.do_sample and p.top_p < 1 for p in params)
    drawn = device_sampling.sample(logits, temperature.float(), top_k.long(), top_p, generators, cuts)
    return torch.where(do_sample.bool(), drawn, tokens)
