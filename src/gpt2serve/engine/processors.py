"""Hugging Face's logits processors over a (B, V) batch, one row per sequence, and OpenAI's penalties.

`RepetitionPenaltyLogitsProcessor` and `NoRepeatNGramLogitsProcessor` matched bit for bit; presence and
frequency penalties as OpenAI defines them. Every function is pure: it never modifies its input (it may
return it unchanged when there is nothing to do, or write into it where asked to with `inplace`), and a
row's result depends only on that row's logits, history and parameters. The token chooser applies them
before sampling.choose.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NEG_INF = float("-inf")


def _row_index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _padded_ids(id_lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """(len(id_lists), longest) ids, padded with `pad`; ids >= pad are clamped to `pad` (a spare column)."""
    width = max(1, max(len(ids) for ids in id_lists))
    rows = [ids + [pad] * (width - len(ids)) for ids in id_lists]
    return torch.tensor(rows, dtype=torch.long, device=device).clamp_(max=pad)


def apply_repetition_penalty(
    logits: torch.Tensor, histories: Sequence[Sequence[int]], penalties: Sequence[float]
) -> torch.Tensor:
    """CTRL repetition penalty: each token id in a row's history, counted once, has its logit divided by
    the row's penalty when positive and multiplied by it when negative. Rows with penalty 1.0 are skipped."""
    rows = [i for i, p in enumerate(penalties) if p != 1.0 and len(histories[i]) > 0]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    ids = _padded_ids([list(set(histories[i])) for i in rows], vocab, logits.device)
    index = _row_index(rows, logits.device)
    sub = torch.nn.functional.pad(logits.index_select(0, index), (0, 1))  # spare column absorbs padding
    penalty = torch.tensor([penalties[i] for i in rows], dtype=logits.dtype, device=logits.device)[:, None]
    picked = sub.gather(1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    out = logits.clone()
    out[index] = sub.scatter(1, ids, picked)[:, :vocab]
    return out


def apply_presence_frequency(
    logits: torch.Tensor,
    histories: Sequence[Sequence[int]],
    presence: Sequence[float],
    frequency: Sequence[float],
) -> torch.Tensor:
    """OpenAI penalties over each row's generated ids: logit -= presence * (count > 0) + frequency * count."""
    rows = [i for i in range(len(histories)) if (presence[i] or frequency[i]) and len(histories[i]) > 0]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    ids = _padded_ids([list(histories[i]) for i in rows], vocab, logits.device)
    counts = torch.zeros((len(rows), vocab + 1), dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
    counts = counts[:, :vocab]  # drop the spare column that counted the padding
    pres = torch.tensor([presence[i] for i in rows], dtype=logits.dtype, device=logits.device)[:, None]
    freq = torch.tensor([frequency[i] for i in rows], dtype=logits.dtype, device=logits.device)[:, None]
    index = _row_index(rows, logits.device)
    out = logits.clone()
    out[index] = out[index] - (pres * (counts > 0).to(logits.dtype) + freq * counts)
    return out


def banned_ngram_tokens(history: Sequence[int], size: int) -> set[int]:
    """Tokens that would complete a `size`-gram already present in `history` (HF NoRepeatNGram rules).

    One pass per call: `list.index` scans for the prefix's first token at C speed and only the hits are
    compared in Python, so a 1024-token history costs a few microseconds. No state is kept between steps.
    """
    length = len(history)
    if size <= 0 or length < size:
        return set()
    if size == 1:
        return set(history)
    prefix = list(history[length - size + 1 :])
    first, last_start = prefix[0], length - size  # windows start at 0 .. length - size
    banned: set[int] = set()
    i = -1
    while True:
        try:
            i = history.index(first, i + 1, last_start + 1)
        except ValueError:
            return banned
        if list(history[i : i + size - 1]) == prefix:
            banned.add(history[i + size - 1])


def ban_repeated_ngrams(
    logits: torch.Tensor, histories: Sequence[Sequence[int]], sizes: Sequence[int], inplace: bool = False
) -> torch.Tensor:
    """Set to -inf every token that would repeat an n-gram of the row's history (size 0: off); in
    `logits` itself with `inplace`, else in a copy."""
    vocab = logits.shape[-1]
    rows: list[int] = []
    cols: list[int] = []
    for i, (history, size) in enumerate(zip(histories, sizes, strict=True)):
        for token in banned_ngram_tokens(history, size):
            if 0 <= token < vocab:
                rows.append(i)
                cols.append(token)
    if not rows:
        return logits
    out = logits if inplace else logits.clone()
    out[_row_index(rows, logits.device), _row_index(cols, logits.device)] = NEG_INF
    return out
