"""The static-shape decode step against the model's own step (GPT2.step), float32 on the CPU."""

from __future__ import annotations

import pytest
import torch

from gpt2serve.engine import native
from gpt2serve.engine.device.static_step import StaticStep, bucket, powers_up_to
from gpt2serve.engine.loader import load_checkpoint
from gpt2serve.engine.model import GPT2
from tests.engine.test_linear import NO_GEMV

KERNELS = ["torch", pytest.param("gemv", marks=pytest.mark.skipif(not native.available(), reason=NO_GEMV))]


def test_buckets():
    assert powers_up_to(1, 256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert powers_up_to(1, 48) == [1, 2, 4, 8, 16, 32, 48]
    assert powers_up_to(64, 1024) == [64, 128, 256, 512, 1024]
    assert powers_up_to(1, 1) == [1]
    assert [bucket([1, 2, 4, 8], n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("fused", [True, False], ids=["decode.c", "layer-by-layer"])
def test_logits_equal_the_models_step(tiny_checkpoint, kernels, fused):
    """Rows on scattered slots (padded buckets of 1, 4 and 8 rows), contexts from 1 to 80 tokens (key
    buckets 64 and 128), decoded several steps: every logit as GPT2.step gives it."""
    loaded = load_checkpoint(str(tiny_checkpoint))
    model = GPT2(loaded.config, loaded.state_dict, "float32", "cpu", kernels)
    model.fused_decode = model.fused_decode and fused
    n_slots = 8
    ref_cache, cache = model.new_cache(n_slots, 128), model.new_cache(n_slots + 1, 128)
    step = StaticStep(model, cache)
    gen = torch.Generator().manual_seed(0)
    for slot in range(n_slots):  # every slot holds a context, so a wrong read cannot go unnoticed
        ids = torch.randint(0, 50000, (1 + 11 * slot,), generator=gen).tolist()
        for c in (ref_cache, cache):
            model.step([], [(ids, slot)], c)
    lengths = {slot: 1 + 11 * slot for slot in range(n_slots)}
    for slots in ([0], [3], [1, 2], [0, 5, 7], [6, 7], list(range(n_slots)), [7, 2, 4]):
        for _ in range(3):
            rows = [(int(torch.randint(0, 50000, (1,), generator=gen)), s, lengths[s]) for s in slots]
            expected = model.step(rows, [], ref_cache)
            got = step(rows)
            assert got.shape == expected.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
            for s in slots:
                lengths[s] += 1
    used = [(slot, lengths[slot]) for slot in range(n_slots)]
    for slot, n in used:  # the cache holds the same keys and values: the spare slot took the padding
        torch.testing.assert_close(cache.k[:, slot, :, :n], ref_cache.k[:, slot, :, :n], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v[:, slot, :, :n], ref_cache.v[:, slot, :, :n], atol=2e-5, rtol=1e-5)


def test_shapes_follow_the_highest_slot_and_longest_row(tiny_checkpoint):
    loaded = load_checkpoint(str(tiny_checkpoint))
    model = GPT2(loaded.config, loaded.state_dict)
    step = StaticStep(model, model.new_cache(33, 1024))
    assert step.row_buckets == [1, 2, 4, 8, 16, 32]
    assert step.shape([(5, 0, 0)]) == (1, 64)
    assert step.shape([(5, 0, 63), (5, 2, 64)]) == (4, 128)
    assert step.shape([(5, 31, 1023)]) == (32, 1024)
    inputs = step.inputs([(9, 2, 40), (8, 0, 3)], 4)
    assert inputs.tolist() == [[8, 0, 9, 0], [3, 0, 40, 0], [0, 32, 2, 32]]
