"""processors.py's logits processors as batched tensor ops over a padded history, for the device path.

Each takes (B, V) logits, the rows' histories as one (B, H) long tensor padded past each row's length
(`History`), and per-row parameters as (B,) tensors; a row whose parameter is off is left bit for bit as
it was. The results equal processors.py's bit for bit (the same float operations on the same values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2serve.engine.device.host import to_device

NEG_INF = float("-inf")


@dataclass
class History:
    """The rows' token ids (B, H), padded with `vocab` (a spare column) past `lengths` (B,)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    vocab: int

    @classmethod
    def of(cls, histories: Sequence[Sequence[int]], vocab: int, device: torch.device) -> History:
        """Built on the host and copied to the device once; ids >= vocab are clamped to the spare column."""
        width = max(1, max(len(h) for h in histories))
        rows = [list(h) + [vocab] * (width - len(h)) for h in histories]
        ids = torch.tensor(rows, dtype=torch.long).clamp_(max=vocab)
        lengths = torch.tensor([len(h) for h in histories], dtype=torch.long)
        return cls(to_device(ids, device), to_device(lengths, device), vocab)

    def positions(self) -> torch.Tensor:
        return torch.arange(self.ids.shape[1], device=self.ids.device)[None, :]


def repetition_penalty(logits: torch.Tensor, history: History, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty (HF RepetitionPenaltyLogitsProcessor): each id in a row's history has its logit
    divided by the row's penalty when positive, multiplied when negative; penalty 1.0 changes nothing."""
    wide = torch.nn.functional.pad(logits, (0, 1))  # the spare column takes the padding
    picked = wide.gather(1, history.ids)
    p = penalty.to(logits.dtype)[:, None]
    picked = torch.where(picked < 0, picked * p, picked / p)
    return wide.scatter(1, history.ids, picked)[:, : history.vocab]


def ban_ngrams(
    logits: torch.Tensor, history: History, sizes: torch.Tensor, size_set: set[int]
) -> torch.Tensor:
    """HF's NoRepeatNGramLogitsProcessor: -inf on each token that would complete an n-gram of the row's
    history (its size `sizes[i]`, 0: off). `size_set`: the sizes in use, one pass each."""
    banned = torch.zeros(logits.shape[0], history.vocab + 1, dtype=torch.bool, device=logits.device)
    for n in sorted(size_set):
        if history.ids.shape[1] < n:
            continue
        windows = history.ids.unfold(1, n, 1)  # (B, W, n): window j is ids[j : j + n]
        ends = history.lengths - n  # the last window start inside the history
        tail = (ends[:, None] + 1 + torch.arange(n - 1, device=logits.device)).clamp(min=0)
        prefix = history.ids.gather(1, tail)  # (B, n - 1): the n-gram a next token would complete
        match = (windows[:, :, : n - 1] == prefix[:, None, :]).all(dim=-1)  # (B, W)
        match &= history.positions()[:, : windows.shape[1]] <= ends[:, None]
        match &= (sizes == n)[:, None]
        banned.scatter_(1, torch.where(match, windows[:, :, n - 1], history.vocab), True)
    return logits.masked_fill(banned[:, : history.vocab], NEG_INF)


def presence_frequency(
    logits: torch.Tensor,
    history: History,
    starts: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """OpenAI's penalties over each row's generated ids (history positions from `starts`, the prompt's
    length): logit -= presence * (count > 0) + frequency * count."""
    positions = history.positions()
    generated = (positions >= starts[:, None]) & (positions < history.lengths[:, None])
    ids = torch.where(generated, history.ids, history.vocab)
    counts = torch.zeros(logits.shape[0], history.vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
    counts = counts[:, : history.vocab]
    pres, freq = presence.to(logits.dtype)[:, None], frequency.to(logits.dtype)[:, None]
    return logits - (pres * (counts > 0).to(logits.dtype) + freq * counts)
