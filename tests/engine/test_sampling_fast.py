"""engine.sampling_fast: each fast path gives the reference's token (sampling_fast.reference, itself checked
against Hugging Face in test_sampling_fast.py) and leaves the generator where the reference leaves it."""

from __future__ import annotations

import itertools

import pytest
import torch

from gpt2serve.engine import native, sampling_fast
from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.sampling import choose, draw, reference
from gpt2serve.engine.sampling_fast import EXACT_DRAW_MAX_SURVIVORS, NEG_INF
from tests.engine.test_linear import NO_GEMV
from tests.engine.test_sampling import TEMPERATURES, TOP_PS, generators, hf_warp, make_logits, run_warp


@pytest.mark.parametrize("survivors", [1, 2, 50, 640, EXACT_DRAW_MAX_SURVIVORS, EXACT_DRAW_MAX_SURVIVORS + 1])
def test_draw_is_torch_multinomial_token_and_generator_state(survivors: int) -> None:
    """The fast draw picks torch.multinomial's token and leaves the generator where torch leaves it."""
    for seed in range(12):
        logits = make_logits("ties" if seed % 3 == 0 else "normal", 1, 50257, seed=seed)[0]
        cut = torch.topk(logits, survivors).values[-1]
        probs = torch.softmax(logits.masked_fill(logits < cut, NEG_INF), dim=-1)
        ours, theirs = generators(seed, seed)
        for _ in range(3):
            assert draw(probs, ours) == int(torch.multinomial(probs, 1, generator=theirs))
            assert torch.equal(ours.get_state(), theirs.get_state())


def test_draw_on_the_global_generator_and_bad_rows() -> None:
    probs = torch.softmax(run_warp(make_logits("normal", 1, 3000, seed=4), [(1.0, 20, 1.0)]), dim=-1)[0]
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(77)
        ours = [draw(probs, None) for _ in range(5)]
        torch.manual_seed(77)
        theirs = [int(torch.multinomial(probs, 1)) for _ in range(5)]
    finally:
        torch.random.set_rng_state(state)
    assert ours == theirs
    for bad in (torch.zeros(10), torch.tensor([0.5, float("nan"), 0.0]), torch.tensor([0.5, -0.1, 0.0])):
        with pytest.raises(RuntimeError):
            draw(bad, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["normal", "flat", "peaked", "some_ties"])
def test_draw_over_the_whole_vocabulary_is_torch_multinomial(kind: str) -> None:
    """No top-k (the OpenAI API's sampling): every token is a candidate, the vectorized path decides."""
    for seed in range(8):
        probs = torch.softmax(make_logits(kind, 1, 50257, seed=seed)[0], dim=-1)
        ours, theirs = generators(seed, seed)
        for _ in range(3):
            assert draw(probs, ours) == int(torch.multinomial(probs, 1, generator=theirs))
            assert torch.equal(ours.get_state(), theirs.get_state())


def test_draw_recomputes_close_ratios_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C draw, and with a margin so wide that every draw looks close, the exact recomputation
    alone picks the token."""
    monkeypatch.setattr(sampling_fast, "DRAW_MARGIN", 0.9)
    monkeypatch.setattr(native, "multinomial", lambda *_: None)
    for seed in range(6):
        probs = torch.softmax(make_logits("normal", 1, 5000, seed=seed)[0] / 4, dim=-1)
        ours, theirs = generators(seed, seed)
        assert draw(probs, ours) == int(torch.multinomial(probs, 1, generator=theirs))


needs_native = pytest.mark.skipif(not native.available(), reason=NO_GEMV)


def _top_k_params(t: float, k: int, p: float) -> SamplingParams:
    return SamplingParams(do_sample=True, temperature=t, top_k=k, top_p=p)


@needs_native
@pytest.mark.parametrize("kind", ["normal", "peaked", "some_ties", "ties", "banned"])
def test_draw_top_k_is_hf_warpers_then_torch_multinomial(kind: str) -> None:
    """The top-k fast path draws HF's token (warpers, softmax, torch.multinomial with the same generator)
    and leaves the generator in the same state; where it gives up, the generator is untouched."""
    decided = total = 0
    for seed, (t, k, p) in enumerate(itertools.product(TEMPERATURES, [1, 5, 50, 256], TOP_PS)):
        row = make_logits(kind, 1, 50257, seed=seed)
        ours, theirs = generators(seed, seed)
        before = ours.get_state()
        token = sampling_fast.draw_top_k(row, [_top_k_params(t, k, p)], [ours])[0]
        probs = torch.softmax(hf_warp(row[0], t, k, p), dim=-1)
        expected = int(torch.multinomial(probs, 1, generator=theirs))
        total += 1
        if token is None:
            assert torch.equal(ours.get_state(), before)
            continue
        decided += 1
        assert token == expected, (t, k, p)
        assert torch.equal(ours.get_state(), theirs.get_state())
    if kind in ("normal", "peaked"):  # no ties: the fast path decides nearly every draw
        assert decided >= 0.9 * total, (decided, total)
    if kind == "ties":  # tied runs everywhere: it leaves them all to torch
        assert decided == 0


@needs_native
def test_draw_top_k_over_a_batch_is_each_row_alone() -> None:
    """Rows of mixed settings drawn together (on every thread) give what each draws alone: the rows it
    does not take (no top-k, no generator, a NaN) come back None with their generators untouched."""
    settings = list(itertools.product(TEMPERATURES, [0, 1, 50, 256], TOP_PS))
    rows = make_logits("normal", len(settings), 50257, seed=11)
    rows[5, 9] = float("nan")
    params = [_top_k_params(*s) for s in settings]
    together = [torch.Generator().manual_seed(i) for i in range(len(settings))]
    alone = [torch.Generator().manual_seed(i) for i in range(len(settings))]
    together[3] = None
    tokens = sampling_fast.draw_top_k(rows, params, together)
    assert tokens[3] is None and tokens[5] is None
    assert all(tokens[i] is None for i, p in enumerate(params) if p.top_k == 0)
    assert sum(t is not None for t in tokens) >= 0.6 * len(settings)
    for i, token in enumerate(tokens):
        expected = None if i == 3 else sampling_fast.draw_top_k(rows[i : i + 1], [params[i]], [alone[i]])[0]
        assert token == expected, i
        if together[i] is not None:
            assert torch.equal(together[i].get_state(), alone[i].get_state()), i


@needs_native
def test_draw_top_k_gives_up_rather_than_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    row = make_logits("normal", 1, 50257, seed=3)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()

    def draw(t: float, k: int, p: float, g: torch.Generator | None, x: torch.Tensor = row) -> int | None:
        return sampling_fast.draw_top_k(x, [_top_k_params(t, k, p)], [g])[0]

    assert draw(1.0, 50, 1.0, None) is None  # the global generator: torch's path
    assert draw(1.0, 0, 0.9, gen) is None  # no top-k
    assert draw(1.0, sampling_fast.FAST_MAX_TOP_K + 1, 1.0, gen) is None
    with_nan = row.clone().index_fill_(1, torch.tensor([7]), float("nan"))
    assert draw(1.0, 50, 1.0, gen, with_nan) is None
    monkeypatch.setattr(sampling_fast, "FAST_MARGIN", 10.0)  # every decision now looks too close to call
    assert draw(1.0, 50, 0.92, gen) is None
    assert draw(1.0, 50, 1.0, gen) is None
    assert torch.equal(gen.get_state(), state)


@needs_native
def test_native_topk_is_torch_topk_or_declines() -> None:
    for n, k in ((50257, 51), (5 * 50257, 10), (9, 9), (17, 1)):
        x = torch.randn(n, generator=torch.Generator().manual_seed(n))
        values, indices = native.topk(x, k)
        expected = torch.topk(x, k)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    x = torch.randn(1000)
    x[[3, 500]] = 50.0
    assert native.topk(x, 5) is None  # a tie inside the top-k
    x[500] = 40.0
    x[600] = 40.0
    assert native.topk(x, 2) is None  # a tie at the cut
    assert native.topk(x, 4) is None
    x[600] = float("nan")
    assert native.topk(x, 3) is None


@needs_native
def test_native_row_max_is_torch_amax_and_argmax() -> None:
    """Each row's largest value and its first index, as torch.amax and torch.argmax give them: ties (the
    first wins), -0.0 beside 0.0, -inf rows, +inf, a length no vector width divides; NaN rows give NaN."""
    rows = make_logits("some_ties", 6, 50257, seed=3)
    rows[1] = rows[1].round()  # many equal maxima
    rows[2] = float("-inf")
    rows[3, 777] = float("inf")
    rows[4] = 0.0
    rows[4, 5], rows[4, 2] = -0.0, -1.0
    rows[5, -1] = rows[5].max() + 1  # the largest in the tail past the last 8
    for x in (rows, rows[:, :13], rows[:1]):
        values, indices = native.row_max(x)
        assert torch.equal(values, x.amax(dim=-1)) and torch.equal(indices, x.argmax(dim=-1))
    rows[0, 9] = float("nan")
    values, indices = native.row_max(rows)
    assert values[0].isnan() and torch.equal(values[1:], rows[1:].amax(dim=-1))
    assert torch.equal(indices[1:], rows[1:].argmax(dim=-1))


@needs_native
def test_native_topk_over_rows_adds_each_rows_bias_first() -> None:
    """Beam search's top-k of log-probabilities plus each beam's score, without building the sums."""
    gen = torch.Generator().manual_seed(5)
    for rows, cols, k in ((5, 50257, 10), (3, 7, 15), (2, 1, 2)):
        x = torch.log_softmax(torch.randn(rows, cols, generator=gen) * 3, dim=-1)
        x[0, :3] = float("-inf")  # banned tokens
        bias = torch.randn(rows, generator=gen) * 4
        values, indices = native.topk(x, k, bias)
        expected = torch.topk((x + bias[:, None]).reshape(-1), k)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    x = torch.zeros(2, 4)
    assert native.topk(x, 3, torch.tensor([0.0, 1.0])) is None  # equal sums: torch's tie-breaking
    x[1, 2] = float("nan")
    assert native.topk(x, 1, torch.tensor([1.0, 0.0])) is None
    with pytest.raises(ValueError, match="row_bias"):
        native.topk(x, 1, torch.zeros(3))


@needs_native
@pytest.mark.parametrize("start", [0, 1, 623, 624, 1000])
def test_native_uniform_at_replays_torch_uniform(start: int) -> None:
    """The chosen draws of `uniform_(n)` and the generator state after it, from states at every phase of
    the generator's 624-word refill, without touching the generator passed in."""
    gen = torch.Generator().manual_seed(start)
    torch.empty(start, dtype=torch.float64).uniform_(generator=gen)
    for n in (1, 2, 311, 312, 313, 50257):
        at = torch.unique(torch.randint(0, n, (min(n, 40),), generator=torch.Generator().manual_seed(n)))
        state = gen.get_state()
        draws, after = native.uniform_at(gen, n, at)
        assert torch.equal(gen.get_state(), state)
        expected = torch.empty(n, dtype=torch.float64).uniform_(generator=gen)
        assert torch.equal(draws, expected[at]) and torch.equal(after, gen.get_state())


@needs_native
def test_a_zero_uniform_is_left_to_torch() -> None:
    """A generator whose next draw is exactly 0 (crafted: the next two words of its state are 0): the C
    replay declines, and draw() still returns torch.multinomial's token (its special case for 0)."""
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    state[8:12] = torch.tensor([3], dtype=torch.int32).view(torch.uint8)  # `left`: no refill for 2 words
    state[16:24] = 0  # `next`: word 0
    state[24:40] = 0  # words 0 and 1
    gen.set_state(state)
    assert torch.empty(1, dtype=torch.float64).uniform_(generator=gen).item() == 0.0
    gen.set_state(state)
    assert native.uniform_at(gen, 10, torch.tensor([0, 4])) is None
    probs = torch.softmax(make_logits("normal", 1, 10, seed=1)[0], dim=-1)
    theirs = torch.Generator()
    theirs.set_state(state)
    assert draw(probs, gen) == int(torch.multinomial(probs, 1, generator=theirs))
    assert torch.equal(gen.get_state(), theirs.get_state())


@needs_native
@pytest.mark.parametrize("kind", ["normal", "flat", "peaked", "banned"])
def test_native_multinomial_is_torch_multinomial(kind: str) -> None:
    """The whole-row draw in C: torch's token and the generator state torch leaves, the generator passed
    in untouched; zeros (filtered tokens) never drawn."""
    for seed in range(10):
        probs = torch.softmax(make_logits(kind, 1, 50257, seed=seed)[0], dim=-1)
        ours, theirs = generators(seed, seed)
        before = ours.get_state()
        token, state = native.multinomial(ours, probs)
        assert torch.equal(ours.get_state(), before)
        assert token == int(torch.multinomial(probs, 1, generator=theirs))
        assert torch.equal(state, theirs.get_state()) and probs[token] > 0


def peaked_rows(n: int, seed: int) -> torch.Tensor:
    """Rows shaped like a trained model's: a few hundred plausible tokens, the rest far below."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, 50257, generator=g) * 2 - 8
    for i in range(n):
        head = torch.randperm(50257, generator=g)[: 20 + 40 * i]
        rows[i, head] += torch.rand(head.numel(), generator=g) * 12
    return rows


@pytest.mark.parametrize("kind", ["trained", "normal", "peaked", "some_ties", "ties", "banned"])
def test_top_p_cut_keeps_what_hf_keeps(kind: str) -> None:
    """The partial selection's cut keeps exactly HF's top-p set wherever it decides; it decides nearly
    every row whose nucleus is small (its tokens' probabilities well above the margin of its sums), and
    leaves tied runs at the cut to the sort."""
    rows = peaked_rows(6, seed=1) if kind == "trained" else make_logits(kind, 6, 50257, seed=2)
    decided = small = 0
    for row, p in itertools.product(rows, [1e-6, 0.5, 0.9, 0.95, 0.999]):
        expected = hf_warp(row, 1.0, 0, p)
        small += int(torch.isfinite(expected).sum()) <= 100
        cut = sampling_fast.top_p_cut(row, p)
        if cut is not None:
            decided += 1
            assert torch.equal(row.masked_fill(row < cut, NEG_INF), expected), (kind, p)
    if kind in ("trained", "peaked"):
        assert small >= 15 and decided >= 0.9 * small, (decided, small)
    if kind == "ties":
        assert decided <= len(rows)  # only p = 1e-6, where the largest alone stays (never removed)


def test_top_p_cut_declines_close_calls_and_ties() -> None:
    row = torch.full((1000,), -30.0)
    row[:4] = torch.tensor([3.0, 2.0, 2.0, 1.0])  # tokens 1 and 2 tie
    mass = torch.softmax(row, dim=0)
    assert sampling_fast.top_p_cut(row, float(mass[0] + mass[1] / 2)) is None  # the cut splits the tie
    assert sampling_fast.top_p_cut(row, float(mass[0])) is None  # the threshold at a cumulative value
    assert sampling_fast.top_p_cut(row, float(mass[0] / 2)) == 3.0
    assert sampling_fast.top_p_cut(row.double(), 0.5) is None  # not a float32 CPU row


def random_model_rows(n: int, seed: int) -> torch.Tensor:
    """Rows shaped like a random-weight GPT-2's: near-flat, so top-p 0.9 keeps ~38,000 tokens of ~2e-5."""
    return torch.randn(n, 50257, generator=torch.Generator().manual_seed(seed)) * 0.55


@needs_native
def test_native_sort_values_is_torch_sort_values() -> None:
    """torch.sort's values (-0.0 and 0.0 compare equal: either order), with the passes whose digit never
    changes skipped; a row whose largest value is not finite declined."""
    g = torch.Generator().manual_seed(3)
    narrow = 1.0 + torch.randint(0, 200, (5000,), generator=g).float() * 2**-23  # only the low byte varies
    rows = [torch.randn(50257, generator=g) * 3, narrow, torch.tensor([2.5])]
    rows += [make_logits("banned", 1, 3000)[0]]
    rows += [torch.tensor([2.0, -0.0, float("-inf"), 2.0, 0.0, -1e-40, 1e-45, -3.0])]
    rows += [torch.randn(n, generator=g) for n in (2, 3, 5, 6, 7, 9)]  # rows the sort's 4 parts do not divide
    for row in rows:
        assert torch.equal(native.sort_values(row), torch.sort(row).values)
    for bad in (float("nan"), float("inf")):
        assert native.sort_values(torch.tensor([0.0, bad, 1.0])) is None
    assert native.sort_values(torch.full((7,), float("-inf"))) is None
    assert native.sort_values(-torch.tensor([0.0, float("nan")])) is None  # a NaN with its sign bit set


TOP_P_EDGES = [1e-6, 0.1, 0.5, 0.9, 0.95, 0.999, 1 - 1e-7]


@needs_native
@pytest.mark.parametrize(
    "kind", ["random_model", "trained", "normal", "peaked", "flat", "some_ties", "banned"]
)
def test_top_p_exact_keeps_what_hf_keeps(kind: str) -> None:
    """The sorted-values path keeps exactly HF's top-p set, wide nucleus or narrow, and decides every row
    where no tied run straddles the cut; where one does, it declines."""
    if kind in ("random_model", "trained"):
        rows = random_model_rows(4, seed=5) if kind == "random_model" else peaked_rows(4, seed=5)
    else:
        rows = make_logits(kind, 4, 50257, seed=5)
    decided = 0
    for row, p in itertools.product(rows, TOP_P_EDGES):
        expected = hf_warp(row, 1.0, 0, p)
        filtered = sampling_fast.top_p_exact(row, p)
        if filtered is not None:
            decided += 1
            assert torch.equal(filtered, expected), (kind, p)
    total = len(rows) * len(TOP_P_EDGES)
    if kind in ("random_model", "trained", "normal", "peaked", "banned"):
        assert decided == total, (decided, total)
    if kind == "flat":  # every value equal: only "keep them all" leaves no tie at the cut
        assert decided == len(rows)


@needs_native
def test_a_nucleus_too_wide_for_the_partial_selection_is_told_without_a_softmax() -> None:
    """The counts near the largest score are torch's; a random model's row skips the partial selection,
    a trained-like row (few plausible tokens) does not."""
    row = random_model_rows(1, seed=2)[0]
    top, counts = native.near_max(row, sampling_fast.NEAR_GAPS)
    assert top == float(row.max())
    assert counts == [int((row >= row.max() - gap).sum()) for gap in sampling_fast.NEAR_GAPS]
    assert sampling_fast._nucleus_too_wide(row, 0.9)
    assert not sampling_fast._nucleus_too_wide(row, 0.01)  # 1% of the mass: within the largest 512
    assert not any(sampling_fast._nucleus_too_wide(r, 0.9) for r in peaked_rows(4, seed=2))


@needs_native
def test_top_p_exact_declines_a_straddling_tie_and_odd_rows() -> None:
    row = torch.full((1000,), -30.0)
    row[:4] = torch.tensor([3.0, 2.0, 2.0, 1.0])  # tokens 1 and 2 tie
    mass = torch.softmax(row, dim=0)
    assert sampling_fast.top_p_exact(row, float(mass[0] + mass[1] / 2)) is None  # the cut splits the tie
    both = float(mass[0] + mass[1] * 2 + mass[3] / 2)  # the cut below the tied pair: both kept
    assert torch.equal(sampling_fast.top_p_exact(row, both), hf_warp(row, 1.0, 0, both))
    assert sampling_fast.top_p_exact(row.double(), 0.5) is None  # not a float32 CPU row
    assert sampling_fast.top_p_exact(row, 1.0) is None  # top-p off
    assert sampling_fast.top_p_exact(row.index_fill(0, torch.tensor([5]), float("nan")), 0.5) is None


@needs_native
@pytest.mark.parametrize("kind", ["random_model", "trained", "some_ties"])
def test_pure_top_p_rows_draw_the_references_tokens(kind: str) -> None:
    """top_p without top_k, through the dispatcher (partial selection, sorted values, or torch's sort,
    then the C draw), over many seeded rows: the reference's token and generator state at every draw."""
    rows = {"random_model": random_model_rows, "trained": peaked_rows}.get(kind)
    rows = rows(6, seed=8) if rows else make_logits(kind, 6, 50257, seed=8)
    for i, (row, p, t) in enumerate(itertools.product(rows, [0.3, 0.9, 0.999], [1.0, 0.7])):
        ours, theirs = generators(i, i)
        for _ in range(2):
            params = SamplingParams(do_sample=True, temperature=t, top_k=0, top_p=p)
            assert choose(row[None], [params], [ours]) == [reference(row, t, 0, p, theirs)], (kind, p, t)
            assert torch.equal(ours.get_state(), theirs.get_state())


@needs_native
@pytest.mark.parametrize("kind", ["random_model", "trained", "some_ties"])
def test_top_p_rows_drawn_together_draw_the_references_tokens(kind: str) -> None:
    """Pure top-p rows drawn together (draw_top_p, on every thread; torch's softmax over the rows at
    once): each row the reference's token and generator state, over two draws. The rows it does not take
    come back None with their generators untouched: top-k on, no generator, a generator two rows share,
    a NaN row."""
    rows = {"random_model": random_model_rows, "trained": peaked_rows}.get(kind)
    rows = rows(6, seed=9) if rows else make_logits(kind, 6, 50257, seed=9)
    settings = list(itertools.product(range(6), [0.3, 0.9, 0.999], [1.0, 0.7]))
    x = torch.stack([rows[r] for r, _, _ in settings])
    x[4, 17] = float("nan")
    params = [SamplingParams(do_sample=True, temperature=t, top_p=p) for _, p, t in settings]
    params[1] = params[1].replace(top_k=40)
    ours = [generators(i, i)[0] for i in range(len(settings))]
    theirs = [generators(i, i)[1] for i in range(len(settings))]
    ours[2], ours[6] = None, ours[5]
    for _ in range(2):
        tokens = sampling_fast.draw_top_p(x, params, ours)
        declined = {i for i, t in enumerate(tokens) if t is None}
        assert {1, 2, 4, 5, 6} <= declined and (kind == "some_ties" or len(declined) == 5), declined
        for i, token in enumerate(tokens):
            if token is None:
                continue
            _, p, t = settings[i]
            assert token == reference(x[i], t, 0, p, theirs[i]), (kind, i)
            assert torch.equal(ours[i].get_state(), theirs[i].get_state()), (kind, i)
    assert sampling_fast.draw_top_p(x[:1], params[:1], ours[:1]) == [None]  # one row: the per-row path


@needs_native
def test_top_p_over_rows_keeps_what_each_row_keeps_alone() -> None:
    """The rows' forms of the sort and the cut (on every thread) give each row's one-row results bit for
    bit, and torch's softmax over the rows at once gives each row the bits it gives the row alone."""
    ties = make_logits("some_ties", 2, 50257, seed=4)
    x = torch.cat([random_model_rows(3, seed=4), peaked_rows(3, seed=4), ties])
    x[1, 3] = float("inf")
    ordered, sorted_ok = native.sort_values_rows(x)
    assert sorted_ok == [i != 1 for i in range(len(x))]
    probs = ordered.softmax(dim=-1)
    thresholds = [0.1, 0.5, 0.01, 0.1, 0.5, 0.001, 0.1, 0.7]
    masked, decided = native.top_p_apply_rows(x, ordered, probs, thresholds)
    for i, row in enumerate(x):
        if not sorted_ok[i]:
            continue
        assert torch.equal(ordered[i], native.sort_values(row))
        assert torch.equal(probs[i], ordered[i].softmax(dim=-1))
        alone = native.top_p_apply(row, ordered[i], probs[i], thresholds[i])
        assert decided[i] == (alone is not None), i
        assert alone is None or torch.equal(masked[i], alone[0]), i
    assert sum(decided) >= 5  # of 7 sorted rows: the tied rows may straddle their cuts


@needs_native
def test_native_multinomial_refuses_what_torch_refuses() -> None:
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    nan, inf = float("nan"), float("inf")
    for bad in (torch.zeros(10), torch.tensor([0.5, nan]), torch.tensor([0.5, -0.1]), torch.tensor([inf, 1])):
        assert native.multinomial(gen, bad) is None
        with pytest.raises(RuntimeError):
            draw(bad, gen)
    assert torch.equal(gen.get_state(), state)


@needs_native
@pytest.mark.parametrize("kind", ["normal", "peaked", "banned"])
def test_replay_multinomial_decides_and_is_torch_multinomial(kind: str) -> None:
    """The replay itself (not torch's draw behind it) decides every ordinary row, with torch's token."""
    for seed in range(6):
        probs = torch.softmax(make_logits(kind, 1, 50257, seed=seed)[0], dim=-1)
        ours, theirs = generators(seed, seed)
        token = sampling_fast.replay_multinomial(probs, ours)
        assert token is not None and token == int(torch.multinomial(probs, 1, generator=theirs))
        assert torch.equal(ours.get_state(), theirs.get_state())
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    for refused in (torch.zeros(10), torch.tensor([0.5, float("nan")]), torch.ones(4, dtype=torch.float64)):
        assert sampling_fast.replay_multinomial(refused, gen) is None
    assert torch.equal(gen.get_state(), state)


@needs_native
def test_the_head_sketchs_logits_draw_the_references_tokens() -> None:
    """Top-k rows on the head sketch's logits (exact only where a row's top k + 1 can be, -inf elsewhere)
    choose what the reference chooses on the full head's logits."""
    from gpt2serve.engine.chooser import logits_read
    from gpt2serve.engine.head_sketch import HeadSketch
    from gpt2serve.engine.linear import PackedLinear
    from gpt2serve.engine.sampling import choose, reference

    head = PackedLinear.lm_head(torch.randn(50257, 64, generator=torch.Generator().manual_seed(0)) * 0.5,
                                "float32", kernels="gemv")  # fmt: skip
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 3
    settings = ((1, 1.0), (5, 1.0), (50, 0.9), (50, 0.5))
    params = [SamplingParams(do_sample=True, top_k=k, top_p=p) for k, p in settings]
    sketched, full = HeadSketch(head).logits(x, logits_read(params)), head(x)
    assert bool(torch.isinf(sketched).any())  # the sketch left most tokens out
    ours, theirs = generators(*range(4)), generators(*range(4))
    for _ in range(3):
        expected = [reference(full[i], 1.0, p.top_k, p.top_p, theirs[i]) for i, p in enumerate(params)]
        assert choose(sketched, params, ours) == expected
