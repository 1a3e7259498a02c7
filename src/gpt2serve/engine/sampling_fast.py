"""The sampler's fast paths: each computes what sampling.reference computes for one row (the same token,
the generator left in the same state), or part of it, in less time on CPU; each returns None where it
cannot be sure (ties that torch's order would settle, a call too close for its arithmetic, a GPU tensor,
kernels not built), leaving the generator untouched, and sampling.choose then takes the next path.

- `draw_top_k`: top-k rows' whole choice from their top-k values, in C (an exact top-k, float64 over the
  survivors, only their uniforms drawn), the rows spread over the threads.
- `top_p_cut`: top-p's cut from the largest few hundred scores (torch.topk), not a sort of the row.
- `top_p_exact`: top-p from the row's values sorted in C without their indices (nucleus.c) and torch's
  softmax of them, for any width of nucleus; where equal values straddle the cut, None.
- `draw_top_p`: `top_p_exact` and the draw for several top-p rows at once, the rows on all threads.
- `replay_multinomial`: torch.multinomial's draw without its vectorized temporaries (and with C kernels,
  without drawing the uniforms of zero probabilities).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

import torch

from gpt2serve.engine import native
from gpt2serve.engine.params import SamplingParams

NEG_INF = float("-inf")
# `replay_multinomial` without the C kernels: up to this many non-zero probabilities, every exponential is
# computed as torch does; beyond, vectorized, and exactly only for the ratios within DRAW_MARGIN
# (relative) of the largest.
EXACT_DRAW_MAX_SURVIVORS = 256
DRAW_MARGIN = 1e-5  # ~80 float32 rounding steps; a one-ulp change in a logarithm moves a ratio ~3 at most
# `draw_top_k`: rows with top-k up to this take the fast path (sampling.c's MAX_TOP_K).
FAST_MAX_TOP_K = 256
# `draw_top_k` computes in float64 what torch computes in float32 over at most FAST_MAX_TOP_K nonzero
# terms (softmax, cumsum: each within ~300 rounding steps, ~2e-5); closer calls than this go to torch.
FAST_MARGIN = 1e-4
# `top_p_cut`: the partial selections tried, in turn; past ~512 of GPT-2's 50257 the C sort is cheaper.
NUCLEUS_TRIES = (64, 512)
NEAR_GAPS = (0.5, 1.0, 2.0, 4.0)  # `_nucleus_too_wide`'s distances below the largest score
# covers the roundings of exp(x - max), of the softmax's sum and of max - gap (a gap off by under 0.01 for
# scores below 1e4), with room to spare
NEAR_SLACK = 0.01
UNIT = 2.0**-24  # float32's unit roundoff
LANES = 8  # torch's softmax sums a row in at least 8 lanes (Vectorized<float>), each sequentially
ABSOLUTE = 1e-10  # float64 rounding of the masses (sums of up to 50257 terms near 1), absolute


# -- top-k ---------------------------------------------------------------------------------------------


def draw_top_k(
    rows: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int | None]:
    """The token `reference` draws for each of the (B, V) rows with top-k on (row i with params[i] and
    generators[i], left where the reference leaves it), computed from the top-k values alone in C
    (native.draw_top_k: an exact top-k, top-p and the draw's probabilities in float64 over the survivors,
    only their uniforms drawn), the rows spread over the threads.

    None for a row it does not take (no top-k or more than FAST_MAX_TOP_K, no generator of its own, no
    kernels) and where a decision (a top-p cut, the winning ratio) is within FAST_MARGIN of going the
    other way, or ties would leave it to torch's tie-breaking; that row's generator is untouched."""
    picked: list[int | None] = [None] * len(params)
    vocab = rows.shape[-1]
    taken = [
        i
        for i, (p, g) in enumerate(zip(params, generators, strict=True))
        if 0 < p.top_k <= FAST_MAX_TOP_K and p.top_k < vocab and g is not None and g.device.type == "cpu"
    ]
    if not taken:
        return picked
    states = [generators[i].get_state() for i in taken]
    thresholds = [array("f", [1 - params[i].top_p])[0] if params[i].top_p < 1 else -1.0 for i in taken]
    tokens = native.draw_top_k(
        rows.contiguous(),
        taken,
        [params[i].temperature for i in taken],
        [params[i].top_k for i in taken],
        thresholds,
        states,
        FAST_MARGIN,
    )
    for i, token, state in zip(taken, tokens or [], states):
        if token >= 0:
            generators[i].set_state(state)
            picked[i] = token
    return picked


# -- top-p ---------------------------------------------------------------------------------------------


def _cpu_row(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 1


def top_p_cut(scores: torch.Tensor, top_p: float) -> float | None:
    """The smallest score the reference's top-p keeps (it keeps exactly the scores >= it), found from the
    largest NUCLEUS_TRIES scores (torch.topk) instead of a sort of the whole row.

    The reference sorts the row ascending, takes its softmax and removes the positions whose cumulative
    probability is <= 1 - top_p. Its cumsum adds in float64 on CPU, so a position's cumulative value is
    the exact mass at and below it, rounded once to float32; its softmax divides by a float32 sum taken in
    sorted order. Here the mass comes from torch's softmax of the unsorted row, in float64: the two sums
    differ by their rounding (at most `_sum_margin`), so a cut that close to the threshold, or tied scores
    straddling it, or more kept scores than fetched, is left to the sort (None)."""
    if not _cpu_row(scores) or top_p >= 1 or _nucleus_too_wide(scores, top_p):
        return None
    probs = scores.softmax(dim=-1)  # one row: torch's single-threaded softmax
    summed = native.mass(probs)
    if summed is None:
        summed = probs.sum(dtype=torch.float64).item(), probs.max().item()
    total, peak = summed
    threshold = array("f", [1 - top_p])[0]
    margin = _sum_margin(scores.numel())
    if not math.isfinite(total):
        return None
    for k in NUCLEUS_TRIES:
        if k >= scores.numel():
            return None
        if k * peak < (total - threshold) * (1 - margin):  # the top k cannot hold the kept mass
            continue
        values, indices = torch.topk(scores, k + 1)
        mass = probs[indices].double()
        below = (total - (mass.cumsum(0) - mass)).tolist()  # the reference's cumulative, rank by rank
        # kept where even its lowest bound rounds above the threshold: a prefix (`below` decreases)
        kept = 1 + sum(1 for s in below[1:] if s * (1 - margin) - ABSOLUTE > threshold * (1 + 2 * UNIT))
        if kept > k:
            continue  # every fetched score is kept: fetch more
        if below[kept] * (1 + margin) + ABSOLUTE > threshold or values[kept - 1] == values[kept]:
            return None  # too close to call, or a tie that the sort's order would settle
        return float(values[kept - 1])
    return None


def _nucleus_too_wide(scores: torch.Tensor, top_p: float) -> bool:
    """Whether even the largest partial selection cannot hold top_p of the mass, told without a softmax:
    the c values within `gap` of the largest make the softmax's sum at least c * exp(-gap) times the
    largest probability, so the top k hold at most k / (c * exp(-gap)) of it (a random model's rows:
    thousands within 2 of the largest)."""
    near = native.near_max(scores, NEAR_GAPS)
    if near is None or not math.isfinite(near[0]):
        return False
    spread = max(c * math.exp(-gap) for gap, c in zip(NEAR_GAPS, near[1]))
    return NUCLEUS_TRIES[-1] < top_p * spread * (1 - NEAR_SLACK)


def _sum_margin(n: int) -> float:
    """A bound on the relative difference between two float32 sums of the same n positive terms in
    different orders, each over LANES lanes (each lane within its terms' count plus the lanes' tree of
    rounding steps), plus the rounding of each probability: the reference's and ours."""
    steps = -(-n // LANES) + LANES.bit_length()
    return 2 * steps * UNIT + 4 * UNIT


def top_p_exact(scores: torch.Tensor, top_p: float) -> torch.Tensor | None:
    """The reference's top-p of a 1-D CPU row (scores, the removed ones -inf), for any width of nucleus.

    HF's softmax of the sorted row divides by a float32 sum taken in sorted order, so the cut depends on
    every value's place in that order, not only on the values near it: no bound on that sum's rounding
    is tight enough to place a cut among tens of thousands of tokens of ~1e-5 each (a random model's
    rows). So the values are sorted (native.sort_values: without their indices, which only ties at the
    cut would need) and torch itself takes their softmax, bit for bit HF's; the cumulative sum, the cut
    and the mask are computed in C (native.top_p_apply). None where equal values straddle the cut, the
    row's largest value is not finite, or the kernels are not built."""
    if not _cpu_row(scores) or top_p >= 1:
        return None
    ordered = native.sort_values(scores)
    if ordered is None:
        return None
    probs = ordered[None].softmax(dim=-1)[0]  # one row: torch's single-threaded softmax
    applied = native.top_p_apply(scores, ordered, probs, array("f", [1 - top_p])[0])
    return None if applied is None else applied[0]


def draw_top_p(
    rows: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int | None]:
    """The token `reference` draws for each of the (B, V) rows with top-p and no top-k (row i with
    params[i] and generators[i], left where the reference leaves it), where at least two such rows have
    a CPU generator each of their own: `top_p_exact` and `replay_multinomial` for all of them at once, the
    C parts on all threads (a row's values sorted, its cut and mask, its draw) and torch's softmax over
    the rows together, which gives each row the bits it gives the row alone.

    None for a row it does not take, and where `top_p_exact` or the draw would give None; that row's
    generator is untouched."""
    picked: list[int | None] = [None] * len(params)
    vocab = rows.shape[-1]
    own = [g for g in generators if g is not None]
    alone = [g is not None and g.device.type == "cpu" and sum(h is g for h in own) == 1 for g in generators]
    taken = [i for i, p in enumerate(params) if p.top_p < 1 and not 0 < p.top_k < vocab and alone[i]]
    if len(taken) < 2 or rows.device.type != "cpu" or rows.dtype != torch.float32:
        return picked
    temperatures = [params[i].temperature for i in taken]  # divided as warp_row divides
    scores = torch.stack([rows[i] if t == 1 else rows[i] / t for i, t in zip(taken, temperatures)])
    ordered = native.sort_values_rows(scores)
    if ordered is None:
        return picked
    thresholds = [array("f", [1 - params[i].top_p])[0] for i in taken]
    applied = native.top_p_apply_rows(scores, ordered[0], ordered[0].softmax(dim=-1), thresholds)
    states = [generators[i].get_state() for i in taken]
    tokens = native.multinomial_rows(states, applied[0].softmax(dim=-1))
    for i, sorted_ok, cut_ok, token, state in zip(taken, ordered[1], applied[1], tokens or [], states):
        if sorted_ok and cut_ok and token >= 0:
            generators[i].set_state(state)
            picked[i] = token
    return picked


# -- the draw -------------------------------------------------------------------------------------------


def replay_multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> int | None:
    """`torch.multinomial(probs, 1, generator=generator)`'s token, the generator left in the same state,
    in less time on CPU; None (generator untouched) for what torch must answer itself: a GPU or
    non-float32 row, a row torch refuses (no positive entry, a negative, inf or NaN).

    For one sample, torch computes argmax(probs / e) with e ~ Exp(1) drawn for every entry, each from one
    float64 uniform u as -log1p(-u) (glibc's log1p), rounded to the row's dtype. Those uniforms are drawn
    here in one call, which advances the generator identically (with the C kernels only the ones where
    probs > 0, the generator advanced past the rest: native.multinomial does the whole draw, its row
    checks included; without them, torch's uniform_ and the ratios here), and the ratios are computed
    only where probs > 0 (the others are 0 and cannot win). A u of exactly 0 (p = 2^-53 per entry) would
    make torch's ratio 0/0 = NaN, which argmax picks: that draw is left to torch."""
    if not _cpu_row(probs):
        return None
    gen = generator if generator is not None else torch.default_generator
    drawn = native.multinomial(gen, probs)  # the whole draw in C, where built (see csrc/sampling.c)
    if drawn is not None:
        token, state = drawn
        gen.set_state(state)
        return token
    alive = int(torch.count_nonzero(probs))
    survivors = None if alive == probs.shape[0] else probs.nonzero()[:, 0]  # None: every entry
    p = probs if survivors is None else probs[survivors]
    if not alive:
        return None
    lo, hi = torch.aminmax(p)
    if not (lo.item() >= 0 and hi.item() < math.inf):  # NaN fails both: torch raises its error
        return None
    u = _uniforms(gen, probs.shape[0], survivors)
    return None if u is None else _winner(p, u, survivors)


def _uniforms(gen: torch.Generator, n: int, survivors: torch.Tensor | None) -> torch.Tensor | None:
    """The survivors' draws of `torch.empty(n, dtype=torch.float64).uniform_(generator=gen)`, the
    generator advanced past all n; None (generator untouched) where one of the n is exactly 0."""
    at = survivors if survivors is not None else torch.arange(n)
    drawn = native.uniform_at(gen, n, at)  # only the survivors' uniforms, where it can
    if drawn is not None:
        u, state = drawn
        gen.set_state(state)
        return u
    state = gen.get_state()
    u = torch.empty(n, dtype=torch.float64).uniform_(generator=gen)
    if u.min().item() == 0:
        gen.set_state(state)
        return None
    return u if survivors is None else u[survivors]


def _winner(p: torch.Tensor, u: torch.Tensor, survivors: torch.Tensor | None) -> int:
    """argmax(p / e): with glibc's own log1p for up to EXACT_DRAW_MAX_SURVIVORS entries, else with torch's
    vectorized log1p, whose result may differ by one unit in the last place; a winner ahead of the
    runner-up by more than DRAW_MARGIN cannot change with that, and closer entries are recomputed exactly."""
    if p.numel() <= EXACT_DRAW_MAX_SURVIVORS:
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
