"""Sampling a batch of rows with tensor ops only: the device path of sampling.py's dispatcher.

Each row has its own temperature, top-k (0: off) and top-p (1.0: off), all applied in HF's order
(temperature -> top-k -> top-p, the largest always kept) on the row sorted once, descending. The draw is
the exponential race: token = argmax(p_i / q_i) with q_i ~ Exp(1) independent, which picks i with
probability p_i / sum(p), with no cumulative sum to search and no copy to the host.

What it guarantees, and what it does not (the way vLLM documents its GPU sampler):
  - the kept set is HF's: the same tokens survive top-k and top-p as in `sampling.reference`, up to
    float rounding of the cumulative sum at the top-p boundary;
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


def kept_probs(
    scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, order), both (B, V): each row's probabilities after temperature, top-k and top-p, in
    descending order of its scores (`order`: the token ids), zero past the cut. `temperature` and
    `top_p` float (B,), `top_k` long (B,)."""
    vocab = scores.shape[-1]
    ranked, order = (scores / temperature[:, None]).sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=scores.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab).clamp(min=1, max=vocab)[:, None]
    ranked = ranked.masked_fill(ranked < ranked.gather(1, k - 1), NEG_INF)  # ties with the k-th kept, as HF
    probs = ranked.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the probability of the tokens ranked above
    # HF's top-p keeps a token while the probability ranked above it is below top_p; the top one always
    cut = (before >= top_p[:, None]) & (top_p[:, None] < 1) & (rank > 0)
    return probs.masked_fill(cut, 0.0), order


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
) -> torch.Tensor:
    """(B,) token ids drawn from processed (B, V) scores (see `kept_probs` and `race`)."""
    probs, order = kept_probs(scores, temperature, top_k, top_p)
    return order.gather(1, race(probs, generators)[:, None])[:, 0]
