"""The device path's token choice against the reference: processors bit for bit, greedy exactly, sampling
by its kept set, its distribution and its reproducibility (device/sampling.py says which holds)."""

from __future__ import annotations

import pytest
import torch

from gpt2serve.engine import processors, sampling
from gpt2serve.engine.chooser import TokenChooser, choose_isolated
from gpt2serve.engine.device import processors as device_processors
from gpt2serve.engine.device.chooser import DeviceTokenChooser
from gpt2serve.engine.device.sampling import kept_probs, order_keys, race, select
from gpt2serve.engine.errors import NonFiniteLogitsError
from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.request import Request, Sequence

V = 300


def _histories(n: int, seed: int) -> list[list[int]]:
    """Histories of 0-60 tokens from a small alphabet, so n-grams repeat."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 12, (int(torch.randint(0, 60, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]  # fmt: skip


def _rows(params: list[SamplingParams], histories: list[list[int]], prompt: int = 3, seed: int = 0):
    rows = []
    for i, (p, history) in enumerate(zip(params, histories, strict=True)):
        req = Request("", history[:prompt], p, 64, lambda _: None, False, None)
        gen = torch.Generator().manual_seed(seed + i) if p.do_sample else None
        seq = Sequence(0, i, list(history), None, gen, generated=list(history[prompt:]))
        rows.append((req, seq))
    return rows


def _logits(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_processors_equal_the_reference_bit_for_bit():
    histories = _histories(24, seed=1)
    x = _logits(24, seed=2)
    history = device_processors.History.of(histories, V, x.device)
    penalties = [1.0 if i % 3 == 0 else 0.5 + 0.1 * i for i in range(24)]
    got = device_processors.repetition_penalty(x, history, torch.tensor(penalties))
    assert torch.equal(got, processors.apply_repetition_penalty(x, histories, penalties))
    sizes = [i % 5 for i in range(24)]  # 0 (off) .. 4, 1 bans the whole history
    got = device_processors.ban_ngrams(x, history, torch.tensor(sizes), set(sizes) - {0})
    assert torch.equal(got, processors.ban_repeated_ngrams(x, histories, sizes))
    assert got.isinf().any()  # the histories repeat: some tokens are banned
    generated = [h[3:] for h in histories]
    presence, frequency = [0.1 * (i % 4) for i in range(24)], [0.2 * (i % 3) for i in range(24)]
    got = device_processors.presence_frequency(
        x, history, torch.tensor([min(3, len(h)) for h in histories]),
        torch.tensor(presence), torch.tensor(frequency),
    )  # fmt: skip
    assert torch.equal(got, processors.apply_presence_frequency(x, generated, presence, frequency))


def test_greedy_rows_equal_the_reference_exactly():
    """Greedy with and without processors, beside sampling rows: the same tokens as TokenChooser."""
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(no_repeat_ngram_size=2),
        SamplingParams(presence_penalty=0.4, frequency_penalty=0.3, repetition_penalty=0.8),
        SamplingParams(do_sample=True, top_k=5, seed=1),
    ] * 4
    for seed in range(5):
        histories, x = _histories(len(params), seed), _logits(len(params), seed)
        ref = TokenChooser(_rows(params, histories)).choose(x)
        got = DeviceTokenChooser(_rows(params, histories)).choose(x)
        greedy = [i for i, p in enumerate(params) if not p.do_sample]
        assert [got[i] for i in greedy] == [ref[i] for i in greedy]


CASES = [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.9), (0.5, 40, 0.8), (1.0, 1, 1.0), (2.0, 200, 0.3)]


def _kept(x: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    rows = x.shape[0]
    return kept_probs(
        x,
        torch.full((rows,), temperature),
        torch.full((rows,), top_k),
        torch.full((rows,), top_p, dtype=torch.float64),
    )


@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_kept_set_is_the_references(temperature, top_k, top_p):
    x = _logits(16, seed=top_k)
    for row, p in zip(x, _kept(x, temperature, top_k, top_p)):
        ref = sampling.warp_row(row, temperature, top_k, top_p)
        assert torch.equal(p > 0, torch.isfinite(ref))
        share = p[p > 0] / p.sum()  # the race draws in proportion: no renormalizing needed
        torch.testing.assert_close(share, ref.softmax(-1)[p > 0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scale", [0.55, 3.0, 15.0])  # a random model's near-flat rows .. most mass on a few
def test_kept_set_over_gpt2s_vocabulary_is_the_references(scale):
    """Without a sort, over 50257 tokens: a nucleus of tens of thousands (flat rows) or of a handful."""
    x = torch.randn(4, 50257, generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    for top_k, top_p in ((0, 0.9), (0, 0.3), (50, 0.92), (0, 0.999)):
        for row, p in zip(x, _kept(x, 1.0, top_k, top_p)):
            ref = torch.isfinite(sampling.warp_row(row, 1.0, top_k, top_p))
            assert torch.equal(p > 0, ref), (scale, top_k, top_p, int(ref.sum()), int((p > 0).sum()))


def test_select_is_the_largest_threshold_that_reaches_need():
    """Against a sort: per row, the largest key whose tokens at or above it weigh at least `need`."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 500, generator=gen) * 2
    x[1, :300] = 0.25  # a long tied run
    x[2, 10:20] = float("-inf")
    keys = order_keys(x)
    assert torch.equal(keys.argsort(dim=1, stable=True), x.argsort(dim=1, stable=True))  # keys order as x
    weight = torch.randint(0, 5, x.shape, generator=gen)
    need = (weight.sum(1).float() * torch.rand(6, generator=gen)).long().clamp(min=1)
    got = select(keys, weight, need)
    for r in range(6):
        ranked = keys[r].unique(sorted=True).flip(0)
        reach = torch.stack([weight[r][keys[r] >= t].sum() for t in ranked])
        assert got[r] == ranked[int((reach >= need[r]).nonzero()[0])]


def test_tokens_tied_at_a_cut_are_kept_together():
    x = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])
    assert (_kept(x, 1.0, 2, 1.0)[0] > 0).tolist() == [True, True, True, False, False]  # as HF's top-k
    mass = torch.softmax(x[0], dim=0)
    half = float(mass[0] + mass[1] / 2)  # the top-p cut falls inside the tied pair
    assert (_kept(x, 1.0, 0, half)[0] > 0).tolist() == [True, True, True, False, False]


def test_draws_follow_the_kept_probabilities():
    """20,000 draws of one 8-token row: every frequency within 5 standard errors of its probability."""
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02, 0.0])
    n = 20_000
    torch.manual_seed(0)
    draws = race(probs.expand(n, -1).contiguous(), [None] * n)
    freq = torch.bincount(draws, minlength=8).double() / n
    assert freq[7] == 0
    sigma = (probs * (1 - probs) / n).sqrt().double()
    assert ((freq - probs.double()).abs() <= 5 * sigma + 1e-12).all(), freq


def test_a_seed_draws_the_same_tokens_whatever_runs_beside_it():
    """Same seed, same device, same logits: the same tokens, with other rows seeded, unseeded or
    greedy beside it; another seed draws something else."""
    x = _logits(6, seed=7)
    p = SamplingParams(do_sample=True, temperature=1.5, seed=42)

    def run(params, seed_offset=0):
        gens = [torch.Generator().manual_seed(s.seed + seed_offset) if s.seed is not None else None
                for s in params]  # fmt: skip
        return [sampling.choose_batch(x[: len(params)], params, gens)[0].item() for _ in range(30)]

    alone = run([p])
    assert run([p, SamplingParams(do_sample=True), SamplingParams(), p.replace(seed=3)]) == alone
    assert run([p], seed_offset=1) != alone


def test_a_row_with_nothing_to_draw_fails_alone():
    params = [
        SamplingParams(do_sample=True, seed=1),
        SamplingParams(),
        SamplingParams(do_sample=True, seed=2),
    ]
    rows = [_rows(params[i : i + 1], [[1, 2, 3]])[0] for i in range(3)]
    x = _logits(3, seed=0)
    x[1] = float("nan")
    with pytest.raises(NonFiniteLogitsError):
        DeviceTokenChooser(rows).choose(x)
    got = choose_isolated(rows, x, DeviceTokenChooser)
    assert isinstance(got[1], NonFiniteLogitsError)
    assert all(isinstance(t, int) for t in (got[0], got[2]))
