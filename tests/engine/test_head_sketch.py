"""The output head's int8 sketch: the logits it computes are the head's own, and no token that can be
among a row's k largest is left out."""

from __future__ import annotations

import pytest
import torch

from gpt2serve.engine import native
from gpt2serve.engine.head_sketch import MAX_CANDIDATE_SHARE, HeadSketch
from gpt2serve.engine.linear import PackedLinear
from tests.engine.test_linear import NO_GEMV

pytestmark = pytest.mark.skipif(not native.available(), reason=NO_GEMV)
V, C = 50257, 64


def _head(fmt: str, seed: int = 0, duplicate: bool = False) -> PackedLinear:
    table = torch.randn(V, C, generator=torch.Generator().manual_seed(seed)) * 0.5
    if duplicate:  # tokens 10 and 20 share their row: their logits tie exactly
        table[20] = table[10]
    return PackedLinear.lm_head(table, fmt, kernels="gemv")


def _rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, C, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [1, 2, 51, 257])
def test_candidates_hold_the_exact_top_k(fmt: str, k: int) -> None:
    head = _head(fmt)
    sketch = HeadSketch(head)
    for n, seed in ((1, 0), (3, 1), (5, 2)):
        x = _rows(n, seed)
        full, got = head(x), sketch.logits(x, k)
        finite = torch.isfinite(got)
        assert torch.equal(got[finite], full[finite])  # the head's own logits, bit for bit
        assert (finite.sum(dim=1) >= k).all() and finite.sum() < MAX_CANDIDATE_SHARE * V * n
        kth = torch.topk(full, k, dim=1).values[:, -1:]
        assert torch.equal(full >= kth, got >= kth)  # the same tokens reach the k-th value (ties too)
        assert torch.equal(torch.where(full >= kth, full, 0), torch.where(got >= kth, got, 0))
        assert torch.equal(full.argmax(dim=1), got.argmax(dim=1))


def test_ties_at_the_top_stay_ties() -> None:
    head = _head("float32", seed=3, duplicate=True)
    x = head.weight[10:11] * 4  # token 10 (and 20) on top
    got = HeadSketch(head).logits(x, 1)
    assert got[0, 10] == got[0, 20] == head(x)[0, 10] and got.argmax().item() == 10


def test_a_flat_row_falls_back_to_the_full_head() -> None:
    head = _head("float32", seed=4)
    x = torch.zeros(2, C)  # every logit 0: every token a candidate
    assert torch.equal(HeadSketch(head).logits(x, 5), head(x))


def test_slack_covers_the_sketch_error_of_every_row() -> None:
    head = _head("bfloat16", seed=5)
    sketch = HeadSketch(head)
    exact = head.weight.double()
    approx = sketch.q.double() * sketch.scale[:, None].double()
    assert ((exact - approx).norm(dim=1) <= sketch.slack.double()).all()
    assert sketch.q.dtype == torch.int8 and sketch.q.numel() == head.weight.numel()  # half of bf16's bytes


def test_native_candidates_are_the_bounds_that_reach_the_kth_lower_bound() -> None:
    gen = torch.Generator().manual_seed(6)
    sketch, slack = torch.randn(3, 1000, generator=gen), torch.rand(1000, generator=gen) * 0.1
    r = torch.tensor([1.0, 2.0, 0.5])
    bound = r[:, None] * slack
    kth = torch.topk(sketch - bound, 7, dim=1).values[:, -1:]
    expected = (sketch + bound >= kth).any(dim=0).nonzero().squeeze(1)
    assert torch.equal(native.candidates(sketch, slack, r, 7), expected)
    sketch[1, 500] = float("nan")
    assert native.candidates(sketch, slack, r, 7) is None


def test_native_candidates_add_the_second_bound() -> None:
    gen = torch.Generator().manual_seed(7)
    sketch, slack = torch.randn(2, 800, generator=gen), torch.rand(800, generator=gen) * 0.1
    wn = torch.rand(800, generator=gen)
    r, e = torch.tensor([1.0, 0.5]), torch.tensor([0.2, 0.05])
    bound = r[:, None] * slack + e[:, None] * wn
    kth = torch.topk(sketch - bound, 3, dim=1).values[:, -1:]
    expected = (sketch + bound >= kth).any(dim=0).nonzero().squeeze(1)
    assert torch.equal(native.candidates(sketch, slack, r, 3, e, wn), expected)


needs_vnni = pytest.mark.skipif(
    not native.sketch_int8_available(),
    reason="sketch.c runs on the AVX-512 build on CPUs with VNNI only (Zen 4+, Ice Lake+); it runs there",
)


@needs_vnni
def test_sketch_int8_is_the_integer_product_rounded_once() -> None:
    gen = torch.Generator().manual_seed(8)
    # rows past a chunk of 8, N past a block of 16 and a task of 48, K of 4-byte groups
    for m, k, n in ((1, 64, 7), (5, 100, 13), (9, 768, 50), (17, 36, 97)):
        x = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        xs, ws = torch.rand(m, generator=gen) + 0.1, torch.rand(n, generator=gen) + 0.1
        got = native.sketch_int8(x, xs, native.pack_sketch(w), ws, w.sum(dim=1, dtype=torch.int32))
        exact = ((x.double() - 128) @ w.double().T) * xs.double()[:, None] * ws.double()
        assert ((got.double() - exact).abs() <= 3 * 2.0**-24 * exact.abs()).all()


@needs_vnni
@pytest.mark.parametrize("rows", [4, 12, 33, 64])
def test_the_integer_sketch_gives_greedy_rows_the_heads_own_top_logit(rows: int) -> None:
    head = _head("float32", seed=9)
    sketch = HeadSketch(head)
    assert sketch.pays(rows, 1)
    x = _rows(rows, 10)
    x[:, 3] *= 30  # an outlier dimension, as GPT-2's final norm has: 8 bits of it round coarsely
    flat = x.clone()
    flat[1] = 0  # every logit 0: every token a candidate, so the full head runs
    calls = []
    real = native.sketch_int8
    try:
        native.sketch_int8 = lambda *a: calls.append(1) or real(*a)
        got, got_flat = sketch.logits(x, 1), sketch.logits(flat, 1)
    finally:
        native.sketch_int8 = real
    assert len(calls) == 2
    assert torch.equal(got_flat, head(flat))
    full = head(x)
    finite = torch.isfinite(got)
    assert not finite.all() and torch.equal(got[finite], full[finite])  # the sketch's own candidates
    assert torch.equal(got.max(dim=1).values, full.max(dim=1).values)
    assert torch.equal(got.argmax(dim=1), full.argmax(dim=1))


def test_native_candidates_by_row_are_each_rows_own() -> None:
    gen = torch.Generator().manual_seed(11)
    sketch, slack = torch.randn(5, 900, generator=gen), torch.rand(900, generator=gen) * 0.1
    wn, e = torch.rand(900, generator=gen), torch.rand(5, generator=gen)
    r = torch.rand(5, generator=gen) + 0.5
    bound = r[:, None] * slack + e[:, None] * wn
    kth = torch.topk(sketch - bound, 4, dim=1).values[:, -1:]
    expected = sketch + bound >= kth  # (rows, tokens)
    bits, pairs = native.candidates(sketch, slack, r, 4, e, wn, by_row=True)
    got = torch.stack([(bits >> row) & 1 for row in range(5)]).bool()
    assert torch.equal(got, expected) and pairs == int(expected.sum())
    union = expected.any(dim=0).nonzero().squeeze(1)
    assert torch.equal(native.candidates(sketch, slack, r, 4, e, wn), union)
    assert native.candidates(torch.randn(65, 900), slack, torch.ones(65), 4, by_row=True) is None


needs_avx512 = pytest.mark.skipif(
    native.isa() != "avx512",
    reason="native.rescore is in the AVX-512 build only; it runs on AVX-512 CPUs (Zen 4+, Skylake-X+)",
)


@needs_avx512
@pytest.mark.parametrize("k", [64, 72])  # 72: gemv's 8-wide last step
def test_native_rescore_is_gemv_bit_for_bit_where_marked(k: int) -> None:
    gen = torch.Generator().manual_seed(12)
    x, w = torch.randn(9, k, generator=gen), torch.randn(300, k, generator=gen)
    marked = torch.rand(9, 300, generator=gen) < 0.3
    bits = sum(marked[m].long() << m for m in range(9))
    got = native.rescore(x, w, bits)
    assert torch.equal(got[marked], native.gemv(x, w, None, None)[marked])
    assert bool((got[~marked] == float("-inf")).all())
    assert native.rescore(torch.randn(65, k), w, bits) is None  # past 64 rows: the caller's path


@needs_vnni
@pytest.mark.parametrize("rows", [6, 33, 64])
def test_the_integer_sketch_gives_top_k_rows_their_own_exact_top_k(rows: int) -> None:
    """Top-k rows keep their own candidates: each row's 51 largest logits are the head's, bit for bit, and
    a row's logits are exact or -inf, with fewer exact than the rows' union."""
    head = _head("float32", seed=13)
    sketch = HeadSketch(head)
    assert sketch.pays(rows, 51)
    x = _rows(rows, 14)
    x[:, 5] *= 30  # an outlier dimension
    got, full = sketch.logits(x, 51), head(x)
    finite = torch.isfinite(got)
    assert torch.equal(got[finite], full[finite])
    top_got, top_full = torch.topk(got, 51, dim=1), torch.topk(full, 51, dim=1)
    assert torch.equal(top_got.values, top_full.values) and torch.equal(top_got.indices, top_full.indices)
    assert (finite.sum(dim=1) >= 51).all() and (finite.sum(dim=1) < finite.any(dim=0).sum()).all()
