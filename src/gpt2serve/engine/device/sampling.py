"""Sampling a batch of rows with tensor ops only: the device path of sampling.py's dispatcher.

Each row has its own temperature, top-k (0: off) and top-p (1.0: off), all applied in HF's order
(temperature -> top-k -> top-p, the largest always kept), without sorting the vocabulary: each cut is a
threshold found by a radix selection (`select`: four passes of 8 bits over the values' 32-bit order
keys, each an integer histogram of the rows' candidates), a fixed number of tensor ops whatever the
data, no host sync. Top-k's threshold is the k-th largest score (a count); top-p's the smallest
probability whose tokens, with every larger one, hold top_p of the mass (the mass in fixed point, so the
sums are integers and the same in any order, on any device). The draw is the exponential race: token =
argmax(p_i / q_i) with q_i ~ Exp(1) independent, which picks i with probability p_i / sum(p), with no
cumulative sum to search and no copy to the host.

What it guarantees, and what it does not (the way vLLM documents its GPU sampler):
  - the kept set is HF's: the same tokens survive top-k and top-p as in `sampling.reference`, up to
    float rounding of the cumulative sum at the top-p boundary, and except that tokens tied at a cut
    are all kept or all removed together (HF's unstable sort may keep some of them);
  - tokens are drawn with the kept probabilities;
  - the same seed on the same device, over the same logits, draws the same tokens;
  - it does NOT draw what the reference draws for a seed: `torch.multinomial` consumes its generator
    differently, so a seeded request gets another (equally distributed) text on this path than on the
    CPU path. On a GPU the logits themselves may differ in the last bits with the step's batch bucket
    (other matrix kernels), which can change a draw too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gpt2serve.engine.device.host import to_device

NEG_INF = float("-inf")
TINY = torch.finfo(torch.float32).tiny  # exponential_ may return 0: the race's divisor never is


DIGIT_BITS = 8
SHIFTS = (24, 16, 8, 0)  # a 32-bit key in four digits, the highest first
MASS_ONE = 2**40  # top-p's fixed-point unit of probability: each token's mass within 2^-41
SIGN = -(2**31)  # int32's sign bit


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys whose signed order is the order of the float32 values of x (-0.0 just below 0.0;
    no NaN): the bits, the others than the sign flipped for negative values."""
    bits = x.float().contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def select(keys: torch.Tensor, weight: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """(B,) per row the largest key t such that the tokens with keys >= t weigh at least need (keys
    (B, V) from order_keys, weight (B, V) >= 0 integers, need (B,) in [1, the row's total weight]); it
    is a key of the row. Radix selection over the keys' bits as unsigned (sign bit flipped): each pass
    histograms one 8-bit digit of the keys that share the digits chosen so far, and picks the highest
    digit at which the weight from the top reaches need."""
    rows, bits = keys.shape[0], keys ^ SIGN
    prefix = torch.zeros(rows, dtype=torch.int32, device=keys.device)
    above = torch.zeros(rows, dtype=weight.dtype, device=keys.device)  # the weight above the running
    for shift in SHIFTS:
        high = shift + DIGIT_BITS
        same = (bits >> high) == (prefix >> high)[:, None] if high < 32 else None
        digit = ((bits >> shift) & (2**DIGIT_BITS - 1)).long()
        hist = torch.zeros(rows, 2**DIGIT_BITS, dtype=weight.dtype, device=keys.device)
        hist.scatter_add_(1, digit, weight if same is None else weight * same)
        reach = above[:, None] + hist.flip(1).cumsum(1, dtype=weight.dtype).flip(1)  # at and above
        chosen = (reach >= need[:, None]).sum(1, dtype=torch.int32) - 1  # the highest digit that holds
        above = torch.cat([reach, above[:, None]], dim=1).gather(1, chosen[:, None].long() + 1)[:, 0]
        prefix = prefix | (chosen << shift)
    return prefix ^ SIGN


def kept_probs(
    scores: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    cuts: tuple[bool, bool] = (True, True),
) -> torch.Tensor:
    """(B, V) each row's probabilities after temperature, top-k and top-p, zero where cut, in the
    vocabulary's order. `temperature` and `top_p` float (B,), `top_k` long (B,); `cuts`: whether any
    row uses top-k, top-p (known on the host: False skips that selection, which would keep every
    token)."""
    vocab = scores.shape[-1]
    scaled = scores / temperature[:, None]
    if cuts[0]:
        keys = order_keys(scaled)
        k = torch.where(top_k > 0, top_k, vocab).clamp(min=1, max=vocab).int()
        kth = select(keys, torch.ones_like(keys), k)
        scaled = scaled.masked_fill(keys < kth[:, None], NEG_INF)  # ties with the k-th kept, as HF
    probs = scaled.softmax(dim=-1)
    if not cuts[1]:
        return probs
    # HF's top-p keeps a token while the probability ranked above it is below top_p; the top one always
    mass = (probs.double() * MASS_ONE).round().long()
    total = mass.sum(1)
    need = (top_p.double() * total).ceil().long().clamp(min=1).minimum(total)
    keys = order_keys(probs)
    cut = (keys < select(keys, mass, need)[:, None]) & (top_p < 1)[:, None]
    return probs.masked_fill(cut, 0.0)


def race(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """(B,) column of each row's draw from (B, V) probabilities: row i's exponentials come from
    `generators[i]`, the rows without one from torch's default generator of the device, in one call."""
    q = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == len(generators):
        q.exponential_()
    else:
        for i, g in enumerate(generators):
            if g is not None:
                q[i].exponential_(generator=g)
        if unseeded:
            index = to_device(torch.tensor(unseeded), probs.device)
            q.index_copy_(0, index, torch.empty_like(probs[: len(unseeded)]).exponential_())
    return (probs / q.clamp_(min=TINY)).argmax(dim=-1)


def sample(
    scores: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    cuts: tuple[bool, bool] = (True, True),
) -> torch.Tensor:
    """(B,) token ids drawn from processed (B, V) scores (see `kept_probs` and `race`)."""
    return race(kept_probs(scores, temperature, top_k, top_p, cuts), generators)
