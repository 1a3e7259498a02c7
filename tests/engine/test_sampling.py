"""engine.sampling (the reference sampler and its dispatcher) against Hugging Face transformers' warpers
and torch.multinomial as the oracle."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
import torch

from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.sampling import choose, greedy, reference, sample, warp

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



def test_reference_is_hf_warpers_softmax_and_multinomial() -> None:
    """The reference sampler, row by row, against HF's warpers and torch.multinomial on equal generators."""
    for seed, (kind, t, k, p) in enumerate(
        itertools.product(["normal", "ties", "peaked", "banned"], TEMPERATURES, [0, 1, 5, 300], TOP_PS)
    ):
        row = make_logits(kind, 1, 300, seed=seed)[0]
        ours, theirs = generators(seed, seed)
        expected = int(torch.multinomial(torch.softmax(hf_warp(row, t, k, p), dim=-1), 1, generator=theirs))
        assert reference(row, t, k, p, ours) == expected, (kind, t, k, p)
        assert torch.equal(ours.get_state(), theirs.get_state())


@pytest.mark.parametrize("kind", ["normal", "ties", "some_ties", "peaked", "flat", "banned"])
def test_the_dispatcher_draws_the_references_token(kind: str) -> None:
    """`choose` (every fast path behind it) against `reference`, over GPT-2's vocabulary: the same tokens,
    step after step, and the generators in the same state."""
    settings = [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.0, 0, 0.5), (1.0, 50, 0.92), (1.3, 5, 1.0), (1.0, 400, 0.9)]
    params = [SamplingParams(do_sample=True, temperature=t, top_k=k, top_p=p) for t, k, p in settings]
    logits = make_logits(kind, len(params), 50257, seed=len(kind))
    ours, theirs = generators(*range(len(params))), generators(*range(len(params)))
    for _ in range(2):
        got = choose(logits, params, ours)
        expected = [reference(logits[i], *settings[i], theirs[i]) for i in range(len(params))]
        assert got == expected
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(ours, theirs))
