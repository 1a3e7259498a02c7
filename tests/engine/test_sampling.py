"""engine.sampling against Hugging Face transformers' logits processors and warpers as the oracle."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch

from gpt2serve.engine import native, sampling
from gpt2serve.engine.sampling import (
    EXACT_DRAW_MAX_SURVIVORS,
    NEG_INF,
    apply_presence_frequency,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    banned_ngram_tokens,
    draw,
    greedy,
    sample,
    warp,
)
from tests.engine.test_linear import NO_GEMV

logits_process = pytest.importorskip("transformers.generation.logits_process")

TEMPERATURES = [1.0, 0.7, 1.3]
TOP_PS = [1e-6, 0.01, 0.5, 0.92, 0.999999, 1.0]
NO_IDS = torch.zeros((1, 1), dtype=torch.long)  # the warpers ignore input_ids


def hf_warp(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What HF generate() does to one row's scores (a warper is only added when its setting is on)."""
    scores = row[None].clone()
    if temperature != 1.0:
        scores = logits_process.TemperatureLogitsWarper(temperature)(NO_IDS, scores)
    if top_k != 0:
        scores = logits_process.TopKLogitsWarper(top_k)(NO_IDS, scores)
    if top_p < 1.0:
        scores = logits_process.TopPLogitsWarper(top_p)(NO_IDS, scores)
    return scores[0]


def run_warp(logits: torch.Tensor, params: list[tuple[float, int, float]]) -> torch.Tensor:
    temperature = torch.tensor([t for t, _, _ in params], dtype=torch.float64)
    top_k = torch.tensor([k for _, k, _ in params], dtype=torch.long)
    top_p = torch.tensor([p for _, _, p in params], dtype=torch.float64)
    return warp(logits, temperature, top_k, top_p)


def make_logits(kind: str, rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(rows, vocab, generator=g) * 3
    if kind == "ties":  # a dozen distinct values: tied runs straddle every cut
        return torch.randint(-6, 6, (rows, vocab), generator=g).float() / 2
    if kind == "some_ties":
        return torch.randint(-60, 60, (rows, vocab), generator=g).float() / 7
    if kind == "peaked":  # most probabilities underflow to 0
        return torch.randn(rows, vocab, generator=g) * 15
    if kind == "flat":
        return torch.zeros(rows, vocab)
    x = torch.randn(rows, vocab, generator=g)  # "banned": many -inf, as after the n-gram ban
    return x.masked_fill(x < 0.3, float("-inf"))


@pytest.mark.parametrize("kind", ["normal", "ties", "some_ties", "peaked", "flat", "banned"])
def test_warp_matches_hf_for_every_setting(kind: str) -> None:
    vocab = 200
    logits = make_logits(kind, 2, vocab)
    for n, (k, p) in enumerate(itertools.product([0, 1, 5, 50, vocab, vocab + 7], TOP_PS)):
        t = TEMPERATURES[n % len(TEMPERATURES)]
        out = run_warp(logits, [(t, k, p)] * 2)
        for i in range(2):
            assert torch.equal(out[i], hf_warp(logits[i], t, k, p)), (kind, t, k, p, i)


def test_mixed_batch_equals_each_row_alone() -> None:
    rng = random.Random(1)
    kinds = ["normal", "ties", "some_ties", "peaked", "banned"]
    logits = torch.cat([make_logits(kind, 8, 400, seed=s) for s, kind in enumerate(kinds)])
    params = [(rng.choice(TEMPERATURES), rng.choice([0, 1, 5, 50, 401]), rng.choice(TOP_PS)) for _ in logits]
    out = run_warp(logits, params)
    for i, (t, k, p) in enumerate(params):
        alone = run_warp(logits[i : i + 1], [(t, k, p)])[0]
        assert torch.equal(out[i], alone), (i, t, k, p)
        assert torch.equal(out[i], hf_warp(logits[i], t, k, p)), (i, t, k, p)


def test_warp_gpt2_vocab_default_sampling() -> None:
    logits = make_logits("normal", 2, 50257)
    logits[1, :4000] = 2.5  # a tied run across the top-k / top-p boundaries
    for t, k, p in [(0.7, 50, 0.92), (1.0, 50, 0.95), (1.0, 0, 0.92), (0.7, 4100, 0.5)]:
        out = run_warp(logits, [(t, k, p)] * 2)
        for i in range(2):
            assert torch.equal(out[i], hf_warp(logits[i], t, k, p)), (t, k, p, i)


def test_warp_leaves_input_alone_and_keeps_a_token() -> None:
    logits = make_logits("ties", 4, 100)
    before = logits.clone()
    assert torch.equal(run_warp(logits, [(1.0, 0, 1.0)] * 4), before)
    out = run_warp(logits, [(0.5, 1, 1e-6)] * 4)
    assert torch.equal(logits, before)
    assert bool((torch.isfinite(out).sum(dim=1) >= 1).all())


def random_histories(rng: random.Random, count: int, alphabet: int, max_len: int) -> list[list[int]]:
    return [[rng.randrange(alphabet) for _ in range(rng.randrange(max_len + 1))] for _ in range(count)]


def test_repetition_penalty_matches_hf() -> None:
    rng = random.Random(2)
    vocab = 120
    histories = random_histories(rng, 24, vocab, 60) + [[], [3, 3, 3], [5, vocab + 4, 5]]
    penalties = [rng.choice([1.0, 1.2, 0.7, 3.0]) for _ in histories]
    logits = make_logits("normal", len(histories), vocab, seed=2)
    logits[0, :] = 0.0  # zero logits stay zero
    before = logits.clone()
    out = apply_repetition_penalty(logits, histories, penalties)
    assert torch.equal(logits, before)
    for i, (history, penalty) in enumerate(zip(histories, penalties, strict=True)):
        expected = logits[i]
        if history:
            processor = logits_process.RepetitionPenaltyLogitsProcessor(penalty)
            expected = processor(torch.tensor([history]), logits[i : i + 1].clone())[0]
        assert torch.equal(out[i], expected), (i, penalty)


def test_presence_and_frequency_penalties() -> None:
    rng = random.Random(3)
    vocab = 50
    histories = random_histories(rng, 10, vocab, 30) + [[]]
    presence = [rng.choice([0.0, 0.5, -1.0, 2.0]) for _ in histories]
    frequency = [rng.choice([0.0, 0.3, -0.5, 1.0]) for _ in histories]
    logits = make_logits("normal", len(histories), vocab, seed=3)
    out = apply_presence_frequency(logits, histories, presence, frequency)
    for i, history in enumerate(histories):
        counts = Counter(history)
        for token in range(vocab):
            c = counts[token]
            expected = logits[i, token] - (presence[i] * (c > 0) + frequency[i] * c)
            assert float(out[i, token]) == pytest.approx(float(expected), abs=1e-5)


def brute_force_banned(history: list[int], size: int) -> set[int]:
    if size <= 0 or len(history) < size:
        return set()
    prefix = history[len(history) - size + 1 :]
    windows = [history[i : i + size] for i in range(len(history) - size + 1)]
    return {w[-1] for w in windows if w[:-1] == prefix}


def test_ngram_ban_matches_hf() -> None:
    rng = random.Random(4)
    vocab = 40
    histories = random_histories(rng, 40, 5, 50) + [[], [7], [7, 7], [1, 2, 1, 2, 1], [9, 9, 9, 9]]
    sizes = [rng.choice([0, 1, 2, 3, 4]) for _ in histories]
    logits = make_logits("normal", len(histories), vocab, seed=4)
    out = ban_repeated_ngrams(logits, histories, sizes)
    for i, (history, size) in enumerate(zip(histories, sizes, strict=True)):
        assert banned_ngram_tokens(history, size) == brute_force_banned(history, size)
        expected = logits[i]
        if size > 0:
            processor = logits_process.NoRepeatNGramLogitsProcessor(size)
            ids = torch.tensor([history], dtype=torch.long).reshape(1, len(history))
            expected = processor(ids, logits[i : i + 1].clone())[0]
        assert torch.equal(out[i], expected), (i, size, history)
    inplace = logits.clone()
    assert ban_repeated_ngrams(inplace, histories, sizes, inplace=True) is inplace
    assert torch.equal(inplace, out) and not torch.equal(logits, out)


def test_ngram_ban_long_history_and_out_of_vocab_ids() -> None:
    history = [5, 6] * 600 + [5]
    assert banned_ngram_tokens(history, 2) == {6}
    assert banned_ngram_tokens(history, 3) == {6}
    assert banned_ngram_tokens([1, 99, 2, 1], 2) == {99}
    out = ban_repeated_ngrams(torch.zeros(1, 10), [[1, 99, 2, 1]], [2])  # 99 is past the vocab: ignored
    assert torch.equal(out, torch.zeros(1, 10))


def test_greedy_takes_first_maximum() -> None:
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [3.0, -1.0, 3.0, 3.0]])
    assert greedy(logits).tolist() == [1, 0]


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_sample_depends_only_on_the_row_and_its_generator() -> None:
    logits = make_logits("normal", 3, 1000, seed=5)
    first = sample(logits, generators(3, 7, 9))[1].item()
    gens_one, gens_two = generators(11, 7), generators(7, 3, 4)
    draws_one = [sample(logits[[0, 1]], gens_one)[1].item() for _ in range(20)]
    draws_two = [sample(logits[[1, 2, 0]], gens_two)[0].item() for _ in range(20)]
    assert draws_one == draws_two
    assert draws_one[0] == first
    assert len(set(draws_one)) > 1


def test_sample_matches_hf_single_sequence_stream() -> None:
    """HF samples with torch.multinomial(probs, 1) on the global generator after torch.manual_seed."""
    steps = [make_logits("normal", 1, 2000, seed=s) for s in range(5)]
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(1234)
        expected = [torch.multinomial(torch.softmax(x, dim=-1), 1)[0, 0].item() for x in steps]
    finally:
        torch.random.set_rng_state(state)
    (gen,) = generators(1234)
    assert [sample(x, [gen])[0].item() for x in steps] == expected


def test_sample_never_draws_filtered_tokens_and_follows_probabilities() -> None:
    logits = make_logits("normal", 1, 500, seed=6)
    warped = run_warp(logits, [(1.0, 5, 1.0)])
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    (gen,) = generators(0)
    draws = [sample(warped, [gen])[0].item() for _ in range(200)]
    assert set(draws) <= allowed
    two = torch.log(torch.tensor([[0.8, 0.2]]))
    counts = Counter(sample(two, [gen])[0].item() for _ in range(400))
    assert 0.7 < counts[0] / 400 < 0.9


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
    """With a margin so wide that every draw looks close, the exact recomputation alone picks the token."""
    monkeypatch.setattr(sampling, "DRAW_MARGIN", 0.9)
    for seed in range(6):
        probs = torch.softmax(make_logits("normal", 1, 5000, seed=seed)[0] / 4, dim=-1)
        ours, theirs = generators(seed, seed)
        assert draw(probs, ours) == int(torch.multinomial(probs, 1, generator=theirs))


needs_native = pytest.mark.skipif(not native.available(), reason=NO_GEMV)


@needs_native
@pytest.mark.parametrize("kind", ["normal", "peaked", "some_ties", "ties", "banned"])
def test_draw_top_k_is_hf_warpers_then_torch_multinomial(kind: str) -> None:
    """The top-k fast path draws HF's token (warpers, softmax, torch.multinomial with the same generator)
    and leaves the generator in the same state; where it gives up, the generator is untouched."""
    decided = total = 0
    for seed, (t, k, p) in enumerate(itertools.product(TEMPERATURES, [1, 5, 50, 256], TOP_PS)):
        row = make_logits(kind, 1, 50257, seed=seed)[0]
        ours, theirs = generators(seed, seed)
        before = ours.get_state()
        token = sampling.draw_top_k(row, t, k, p, ours)
        expected = int(torch.multinomial(torch.softmax(hf_warp(row, t, k, p), dim=-1), 1, generator=theirs))
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
def test_draw_top_k_gives_up_rather_than_guess(monkeypatch: pytest.MonkeyPatch) -> None:
    row = make_logits("normal", 1, 50257, seed=3)[0]
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert sampling.draw_top_k(row, 1.0, 50, 1.0, None) is None  # the global generator: torch's path
    assert sampling.draw_top_k(row, 1.0, 0, 0.9, gen) is None  # no top-k
    assert sampling.draw_top_k(row, 1.0, sampling.FAST_MAX_TOP_K + 1, 1.0, gen) is None
    with_nan = row.clone().index_fill_(0, torch.tensor([7]), float("nan"))
    assert sampling.draw_top_k(with_nan, 1.0, 50, 1.0, gen) is None
    monkeypatch.setattr(sampling, "FAST_MARGIN", 10.0)  # every decision now looks too close to call
    assert sampling.draw_top_k(row, 1.0, 50, 0.92, gen) is None
    assert sampling.draw_top_k(row, 1.0, 50, 1.0, gen) is None
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


@needs_native
def test_native_sort_is_torch_sort() -> None:
    """torch.sort's values (and, for distinct values, its indices); equal values in index order; a row
    with a NaN declined. Top-p with this order equals HF's where no tied run straddles the cut."""
    distinct = torch.randperm(50257, generator=torch.Generator().manual_seed(0)).float() * 0.01 - 250
    x = torch.randn(50257, generator=torch.Generator().manual_seed(0)) * 3  # a few equal pairs
    values, indices, ok = native.sort_rows(
        torch.stack([distinct, x, x.clone().index_fill_(0, torch.tensor([9]), float("nan"))])
    )
    expected = torch.sort(distinct)
    assert ok == [True, True, False]
    assert torch.equal(values[0], expected.values) and torch.equal(indices[0], expected.indices)
    assert torch.equal(values[1], torch.sort(x).values)
    tied = torch.tensor([[2.0, -0.0, float("-inf"), 2.0, 0.0, float("inf"), -1e-40, 2.0]])
    values, indices, _ = native.sort_rows(tied)
    assert torch.equal(values, torch.sort(tied).values) and indices[0].tolist() == [2, 6, 1, 4, 0, 3, 7, 5]
    for p in (0.5, 0.9, 0.999):
        threshold = torch.tensor([1 - p], dtype=torch.float32)
        values, indices, ok = native.sort_rows(x[None])
        assert torch.equal(
            sampling._top_p_sorted(x, values[0], indices[0], ok[0], threshold), hf_warp(x, 1.0, 0, p)
        )
    straddle = torch.tensor([0.0, 0.0, 5.0])  # the cut runs through the two equal values
    values, indices, ok = native.sort_rows(straddle[None])
    assert sampling._top_p_sorted(straddle, values[0], indices[0], ok[0], torch.tensor([0.01])) is None
