"""Logits processing and token selection over a (B, V) batch, one row per sequence.

Every function is pure: it never modifies its input (it may return it unchanged when there is nothing to
do) and a row's result depends only on that row's logits, history and parameters, never on the other rows.
The semantics are those of Hugging Face `generate()`: `RepetitionPenaltyLogitsProcessor`,
`NoRepeatNGramLogitsProcessor`, then `TemperatureLogitsWarper` -> `TopKLogitsWarper` -> `TopPLogitsWarper`
(min_tokens_to_keep=1), matched bit for bit, ties included. Presence/frequency penalties follow OpenAI.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

import torch

from gpt2serve.engine import native
from gpt2serve.engine.params import SamplingParams

NEG_INF = float("-inf")
# `draw`: up to this many non-zero probabilities, every exponential is computed as torch does; beyond,
# vectorized, and exactly only for the ratios within DRAW_MARGIN (relative) of the largest.
EXACT_DRAW_MAX_SURVIVORS = 256
DRAW_MARGIN = 1e-5  # ~80 float32 rounding steps; a one-ulp change in a logarithm moves a ratio ~3 at most
# `draw_top_k`: rows with top-k up to this take the fast path (its per-survivor arithmetic is Python).
FAST_MAX_TOP_K = 256
# `draw_top_k` computes in float64 what torch computes in float32 over at most FAST_MAX_TOP_K nonzero
# terms (softmax, cumsum: each within ~300 rounding steps, ~2e-5); closer calls than this go to torch.
FAST_MARGIN = 1e-4


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


def _top_p_exact(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """HF's TopPLogitsWarper verbatim (its unstable sort decides which of several tied tokens survive),
    with rows sorted in C where the order among equal values cannot matter (`_top_p_sorted`)."""
    ordered = native.sort_rows(scores)
    out, rest = scores.clone(), []
    for i in range(scores.shape[0]):
        row = _top_p_sorted(scores[i], *(t[i] for t in ordered), threshold[i : i + 1]) if ordered else None
        if row is None:
            rest.append(i)
        else:
            out[i] = row
    if rest:
        index = torch.tensor(rest, dtype=torch.long, device=scores.device)
        out[index] = _top_p_torch(scores.index_select(0, index), threshold[index])
    return out


def _top_p_torch(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= threshold[:, None]
    remove[:, -1] = False
    remove = remove.scatter(1, sorted_indices, remove)
    return scores.masked_fill(remove, NEG_INF)


def _top_p_sorted(
    row: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, sorted_ok: bool, threshold: torch.Tensor
) -> torch.Tensor | None:
    """HF's top-p for one row given native.sort_rows' order: the sorted values are torch.sort's, so
    softmax and cumsum see the same floats; only where tied values straddle the cut would torch's order
    among them matter, and there (or for a row the C sort declined) it returns None."""
    if not sorted_ok:
        return None
    cumulative = values[None].softmax(dim=-1).cumsum(dim=-1)[0]
    remove = cumulative <= threshold
    remove[-1] = False
    cut = int(remove.sum())  # the removed positions are a prefix (cumsum is monotone)
    if cut and bool(values[cut - 1] == values[cut]):
        return None
    return row.index_fill(0, indices[:cut], NEG_INF)


def _top_p_cut_after_top_k(
    top_values: torch.Tensor, survivors: torch.Tensor, threshold: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p over the top-k survivors without a full sort.

    HF sorts the top-k-filtered row ascending: (vocab - survivors) -inf entries, then the survivors. That
    row is rebuilt from `top_values` (descending, more than `survivors` wide), so softmax and cumsum see
    identical floats. Returns the smallest kept value per row, and whether tied values straddle the cut
    (then only HF's own sort order decides which of them survive: the caller takes the exact path)."""
    n, width = top_values.shape
    position = torch.arange(width, device=top_values.device)
    tail = top_values.masked_fill(position[None, :] >= survivors[:, None], NEG_INF).flip(1)
    ascending = torch.full((n, vocab), NEG_INF, dtype=top_values.dtype, device=top_values.device)
    ascending[:, vocab - width :] = tail
    probs = ascending.softmax(dim=-1)
    if probs.device.type == "cpu":  # a sequential scan: leading zeros change nothing, so scan the tail only
        cumulative = probs[:, vocab - width :].cumsum(dim=-1)
    else:  # a parallel scan's rounding may depend on where the values sit
        cumulative = probs.cumsum(dim=-1)[:, vocab - width :]
    remove = cumulative <= threshold[:, None]
    remove[:, -1] = False
    first_kept = remove.sum(dim=1, keepdim=True)  # the removed positions are a prefix (cumsum is monotone)
    cut = tail.gather(1, first_kept)[:, 0]
    before = tail.gather(1, (first_kept - 1).clamp(min=0))[:, 0]
    return cut, (first_kept[:, 0] > 0) & (before == cut)


def _cut_for_top_k_rows(
    scores: torch.Tensor, k_rows: torch.Tensor, k: torch.Tensor, threshold: torch.Tensor, p_on: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows with top-k on: the smallest kept value (top-k, then top-p where it is on and the fast path
    applies) and which of these rows still need the exact top-p path."""
    sub = scores if k_rows.numel() == scores.shape[0] else scores.index_select(0, k_rows)
    rows_k = k[k_rows]
    width = min(int(rows_k.max()) + 1, scores.shape[-1])  # one extra value shows whether ties run past k
    top_values = torch.topk(sub, width).values
    cut = top_values.gather(1, (rows_k - 1)[:, None])[:, 0]
    both = p_on[k_rows]
    if not bool(both.any()):
        return cut, both
    survivors = (top_values >= cut[:, None]).sum(dim=1)
    fits = survivors < width  # else tied survivors may lie beyond the fetched values
    p_cut, straddle = _top_p_cut_after_top_k(top_values, survivors, threshold[k_rows], scores.shape[-1])
    fast = both & fits & ~straddle
    return torch.where(fast, p_cut, cut), both & ~fast


def warp(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Temperature -> top-k (0: off) -> top-p (1.0: off), per row; filtered entries become -inf.

    Pass `top_p` (and `temperature`) as float64 tensors of the requested values: HF compares against
    `1 - top_p` computed in double precision, and so does this function.
    """
    device = logits.device
    temperature = temperature.to(device=device, dtype=logits.dtype)
    scores = logits if bool((temperature == 1).all()) else logits / temperature[:, None]
    vocab = scores.shape[-1]
    k = top_k.to(device=device, dtype=torch.long)
    top_p = top_p.to(device=device, dtype=torch.float64)
    k_on = (k > 0) & (k < vocab)
    p_on = top_p < 1
    if not bool(k_on.any()) and not bool(p_on.any()):
        return scores
    threshold = (1 - top_p).to(scores.dtype)
    cut = torch.full((scores.shape[0],), NEG_INF, dtype=scores.dtype, device=device)  # keep scores >= cut
    exact = p_on & ~k_on
    k_rows = k_on.nonzero()[:, 0]
    if k_rows.numel():
        cut[k_rows], exact[k_rows] = _cut_for_top_k_rows(scores, k_rows, k, threshold, p_on)
    out = scores.masked_fill(scores < cut[:, None], NEG_INF)
    exact_rows = exact.nonzero()[:, 0]
    if exact_rows.numel():
        out[exact_rows] = _top_p_exact(out.index_select(0, exact_rows), threshold[exact_rows])
    return out


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """(B,) argmax token ids (the first of tied maxima, as HF greedy search)."""
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """(B,) token ids: softmax, then one multinomial draw per row with that row's generator.

    A row's draw depends only on its probabilities and its generator. Probabilities move to the
    generator's device, so a CPU generator gives the same stream whatever device the model runs on.
    `None` draws from torch's global generator."""
    probs = torch.softmax(logits.float(), dim=-1)
    tokens = torch.empty(probs.shape[0], dtype=torch.long)
    for i, gen in enumerate(generators):
        row = probs[i]
        if gen is not None and row.device != gen.device:
            row = row.to(gen.device)
        tokens[i] = draw(row, gen)
    return tokens.to(logits.device)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """`torch.multinomial(probs, 1, generator=generator)`: the same token, the generator left in the same
    state, in less time on CPU (per row over GPT-2's vocabulary: 0.4 ms after top-k, 0.45-0.85 ms without,
    against ~1 ms).

    For one sample, torch computes argmax(probs / e) with e ~ Exp(1) drawn for every entry, each from one
    float64 uniform u as -log1p(-u) (glibc's log1p), rounded to the row's dtype. Those uniforms are drawn
    here in one call, which advances the generator identically (with the C kernels only the ones where
    probs > 0, native.uniform_at advancing the generator past the rest), and the ratios are computed only
    where probs > 0 (the others are 0 and cannot win): with glibc's own log1p for up to
    EXACT_DRAW_MAX_SURVIVORS entries, else with torch's vectorized log1p, whose result may differ by one
    unit in the last place; a winner ahead of the runner-up by more than DRAW_MARGIN cannot change with
    that, and entries closer than that are recomputed with glibc's log1p. A u of exactly 0 (p = 2^-53 per
    entry) would make torch's ratio 0/0 = NaN, which argmax picks: then torch's own draw is replayed."""
    if probs.device.type != "cpu" or probs.dtype != torch.float32 or probs.dim() != 1:
        return int(torch.multinomial(probs, 1, generator=generator))
    alive = int(torch.count_nonzero(probs))
    survivors = None if alive == probs.shape[0] else probs.nonzero()[:, 0]  # None: every entry
    p = probs if survivors is None else probs[survivors]
    lo, hi = torch.aminmax(p)
    if not (alive and lo.item() >= 0 and hi.item() < math.inf):  # NaN fails both: torch raises its error
        return int(torch.multinomial(probs, 1, generator=generator))
    gen = generator if generator is not None else torch.default_generator
    if alive > EXACT_DRAW_MAX_SURVIVORS and (drawn := native.multinomial(gen, probs)) is not None:
        token, state = drawn  # the whole draw in C (every ratio exact; see csrc/sampling.c)
        gen.set_state(state)
        return token
    at = survivors if survivors is not None else torch.arange(probs.shape[0])
    drawn = native.uniform_at(gen, probs.shape[0], at)  # only the survivors' uniforms, where it can
    if drawn is not None:
        u, state = drawn
        gen.set_state(state)
    else:
        state = gen.get_state()
        u = torch.empty(probs.shape[0], dtype=torch.float64).uniform_(generator=gen)
        if u.min().item() == 0:
            gen.set_state(state)
            return int(torch.multinomial(probs, 1, generator=gen))
        if survivors is not None:
            u = u[survivors]
    if alive <= EXACT_DRAW_MAX_SURVIVORS:
        return _token(survivors, int(_exact_ratios(p, u).argmax()))
    ratios = p / (-torch.log1p(-u)).to(p.dtype)
    first = int(ratios.argmax())
    best = ratios[first].item()
    ratios[first] = 0
    if best > ratios.max().item() * (1 + DRAW_MARGIN):
        return _token(survivors, first)
    ratios[first] = best
    close = (ratios >= best * (1 - DRAW_MARGIN)).nonzero()[:, 0]  # in vocabulary order: argmax's tie rule
    return _token(survivors, int(close[_exact_ratios(p[close], u[close]).argmax()]))


def _token(survivors: torch.Tensor | None, i: int) -> int:
    return i if survivors is None else int(survivors[i])


def _exact_ratios(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """p / e with e computed as torch.multinomial computes it, in float64 with glibc's log1p."""
    e = torch.tensor([-1.0 * math.log1p(-x) for x in u.tolist()], dtype=torch.float64)
    return p / e.to(p.dtype)


def draw_top_k(
    row: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> int | None:
    """The token `sample(warp(row[None], ...), [generator])` draws for a row with top-k on, computed from
    the top-k values alone: an exact top-k (native.topk), top-p and the draw's probabilities in float64
    over the survivors, and only the survivors' uniforms drawn (native.uniform_at).

    The same token, and the generator left in the same state, as torch's path: where a decision (a top-p
    cut, the winning ratio) is within FAST_MARGIN of going the other way, or ties would leave it to
    torch's tie-breaking, it returns None with the generator untouched, and the caller takes that path."""
    vocab = row.shape[-1]
    if not 0 < top_k <= FAST_MAX_TOP_K or top_k >= vocab or generator is None:
        return None
    top = native.topk(row, top_k + 1)
    if top is None:
        return None
    values, indices = top
    if temperature != 1:  # warp's float32 division; it may merge neighbours into ties
        values = values / torch.tensor(temperature, dtype=values.dtype)
        if bool((values[1:] == values[:-1]).any()):
            return None
    kept = values[:top_k].tolist()  # descending and distinct: exactly top-k's survivors
    if not (math.isfinite(kept[0]) and math.isfinite(kept[-1])):
        return None
    peak = kept[0]
    weights = [math.exp(v - peak) for v in kept]
    if top_p < 1:
        n = _top_p_kept(weights, array("f", [1 - top_p])[0])  # warp's float32 threshold
        if n is None:
            return None
        weights = weights[:n]
    total = math.fsum(weights)
    ids = indices[: len(weights)].tolist()
    order = sorted(range(len(ids)), key=ids.__getitem__)  # vocabulary order: argmax's tie rule
    drawn = native.uniform_at(generator, vocab, torch.tensor([ids[i] for i in order]))
    if drawn is None:
        return None
    u, state = drawn
    e = array("f", [-math.log1p(-x) for x in u.tolist()])  # as torch rounds them: float32
    ratios = [weights[i] / total / x for i, x in zip(order, e)]
    best = max(range(len(ratios)), key=ratios.__getitem__)
    runner_up = max((r for j, r in enumerate(ratios) if j != best), default=0.0)
    if not ratios[best] > runner_up * (1 + FAST_MARGIN):
        return None
    generator.set_state(state)
    return ids[order[best]]


def _top_p_kept(weights: list[float], threshold: float) -> int | None:
    """How many of the top-k survivors (their softmax weights, largest first) top-p keeps, as
    `_top_p_exact` decides it (ascending cumulative probabilities <= threshold removed, the largest kept);
    None where a cumulative probability is within FAST_MARGIN of the threshold."""
    total = math.fsum(weights)
    removed, cumulative = 0, 0.0
    for w in reversed(weights[1:]):  # ascending, the largest (never removed) left out
        cumulative += w / total
        if abs(cumulative - threshold) <= FAST_MARGIN * threshold:
            return None
        if cumulative > threshold:
            break
        removed += 1
    return len(weights) - removed


def choose(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int]:
    """The token of each sampling row (`logits` processed, one row per entry of `params`), each as
    `sample(warp(...))` draws it: `draw_top_k` where it can decide, else `warp` and `sample`."""
    picked = [0] * len(params)
    slow = []
    for i, (p, gen) in enumerate(zip(params, generators, strict=True)):
        token = draw_top_k(logits[i], p.temperature, p.top_k, p.top_p, gen)
        if token is None:
            slow.append(i)
        else:
            picked[i] = token
    if slow:
        dev = logits.device
        warped = warp(
            logits[slow],
            torch.tensor([params[i].temperature for i in slow], dtype=torch.float64, device=dev),
            torch.tensor([params[i].top_k for i in slow], device=dev),
            torch.tensor([params[i].top_p for i in slow], dtype=torch.float64, device=dev),
        )
        for i, token in zip(slow, sample(warped, [generators[i] for i in slow]).tolist()):
            picked[i] = token
    return picked
