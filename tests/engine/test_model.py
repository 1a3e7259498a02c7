"""The model's cached forward against transformers' GPT2LMHeadModel."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2serve.engine import native
from gpt2serve.engine.linear import GEMV_MAX_ROWS, PackedLinear
from gpt2serve.engine.loader import load_checkpoint
from gpt2serve.engine.model import GPT2, make_batch
from tests.engine.test_linear import NO_GEMV


@pytest.fixture(params=["tiny_checkpoint", "tiny_checkpoint_b"])
def pair(request):
    path = request.getfixturevalue(request.param)
    loaded = load_checkpoint(str(path))
    return GPT2(loaded.config, loaded.state_dict), GPT2LMHeadModel.from_pretrained(path).eval()


def test_incremental_decode_matches_reference_logits(pair):
    ours, ref = pair
    gen = torch.Generator().manual_seed(0)
    cache = ours.new_cache(n_slots=4)
    for i in range(20):  # prompts of varied length, each decoded a few tokens past its prompt
        n_prompt = 1 + (i * 7) % 40
        ids = torch.randint(0, 50257, (n_prompt + 4,), generator=gen)
        with torch.no_grad():
            expected = ref(ids[None]).logits[0]  # (T, V)
        slot = i % 4
        got = ours(make_batch([ids[:n_prompt].tolist()], [slot], [0], "cpu"), cache)[0]
        assert torch.allclose(got, expected[n_prompt - 1], atol=1e-4, rtol=0)
        for t in range(n_prompt, n_prompt + 4):
            got = ours(make_batch([[int(ids[t])]], [slot], [t], "cpu"), cache)[0]
            assert torch.allclose(got, expected[t], atol=1e-4, rtol=0)


def test_long_prompts_match_reference_logits(pair):
    """Prompts past decode.c's rows run layer by layer, their products past gemv.c's rows on oneDNN."""
    ours, ref = pair
    gen = torch.Generator().manual_seed(3)
    cache = ours.new_cache(n_slots=1)
    for n_prompt in (ours.fused_rows + 1, 120):
        ids = torch.randint(0, 50257, (n_prompt + 2,), generator=gen)
        with torch.no_grad():
            expected = ref(ids[None]).logits[0]
        got = ours(make_batch([ids[:n_prompt].tolist()], [0], [0], "cpu"), cache, last_only=False)[0]
        assert torch.allclose(got, expected[:n_prompt], atol=1e-4, rtol=0)
        for t in range(n_prompt, n_prompt + 2):
            got = ours(make_batch([[int(ids[t])]], [0], [t], "cpu"), cache)[0]
            assert torch.allclose(got, expected[t], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "slots",
    [[0, 1, 2], [4, 0, 2], [1, 7, 3]],
    ids=["consecutive", "span-with-gaps", "sparse-gathered"],
)
def test_mixed_batch_of_slots_at_different_positions(pair, slots):
    """One decode step over slots of different lengths equals each slot decoded alone, whether attention
    reads the slots' span of the cache (slots close together) or gathers them (slots far apart)."""
    ours, ref = pair
    gen = torch.Generator().manual_seed(1)
    lengths = [3, 17, 9]
    seqs = [torch.randint(0, 50257, (n + 1,), generator=gen) for n in lengths]
    cache = ours.new_cache(n_slots=8)
    for other in range(8):  # every slot holds something, so a wrong read cannot go unnoticed
        ours(make_batch([[other + 5] * 20], [other], [0], "cpu"), cache)
    for slot, s in zip(slots, seqs):
        ours(make_batch([s[:-1].tolist()], [slot], [0], "cpu"), cache)
    batch = make_batch([[int(s[-1])] for s in seqs], slots, lengths, "cpu")
    got = ours(batch, cache)
    for row, s in enumerate(seqs):
        with torch.no_grad():
            expected = ref(s[None]).logits[0, -1]
        assert torch.allclose(got[row], expected, atol=1e-4, rtol=0)


def test_full_sequence_logits(pair):
    ours, ref = pair
    ids = torch.arange(100, 130)
    cache = ours.new_cache(n_slots=1)
    got = ours(make_batch([ids.tolist()], [0], [0], "cpu"), cache, last_only=False)[0]
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


def test_prefill_in_chunks_and_on_consecutive_slots(pair):
    """A prompt fed in two chunks, and two slots decoded together at one position, match the reference."""
    ours, ref = pair
    ids = torch.arange(200, 240)
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    cache = ours.new_cache(n_slots=3)
    ours(make_batch([ids[:25].tolist()], [1], [0], "cpu"), cache)
    got = ours(make_batch([ids[25:39].tolist()], [1], [25], "cpu"), cache, last_only=False)[0]
    assert torch.allclose(got, expected[25:39], atol=1e-4, rtol=0)
    cache.copy_slots([1], [2], 39)
    got = ours(make_batch([[int(ids[39])]] * 2, [1, 2], [39, 39], "cpu"), cache)
    assert torch.allclose(got, expected[39].expand(2, -1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kernels", ["torch", "gemv"])
def test_decode_row_is_bit_identical_whatever_runs_beside_it(tiny_checkpoint, kernels):
    """A decode row's logits do not depend on the other rows of the step: neighbours with longer contexts
    (another key-length group), at the same position, on consecutive or scattered slots. This is what
    makes a request's text the same alone or under load."""
    if kernels == "gemv" and not native.available():
        pytest.skip(NO_GEMV)
    loaded = load_checkpoint(str(tiny_checkpoint))
    model = GPT2(loaded.config, loaded.state_dict, "float32", "cpu", kernels)
    cache = model.new_cache(8, 128)
    for slot, length in ((0, 10), (1, 90), (2, 10), (6, 70)):
        model(make_batch([list(range(100 + slot, 100 + slot + length))], [slot], [0], "cpu"), cache)
    alone = model(make_batch([[7]], [0], [10], "cpu"), cache)[0]
    neighbours = (
        ([0, 1], [10, 90]),  # consecutive slots, a longer neighbour
        ([0, 2], [10, 10]),  # same position, scattered slots
        ([0, 6], [10, 70]),
        ([0, 1, 2, 6], [10, 90, 10, 70]),
    )
    for slots, starts in neighbours:
        tokens = [[7]] + [[8 + i] for i in range(len(slots) - 1)]
        together = model(make_batch(tokens, slots, starts, "cpu"), cache)[0]
        assert torch.equal(together, alone), (slots, starts)


@pytest.fixture(scope="module")
def wide_heads(checkpoint_factory):
    """GPT-2's head width (64), which decode.c's attention reads 8 floats at a time."""
    return checkpoint_factory(n_layer=2, n_head=2, n_embd=128, seed=3)


@pytest.mark.skipif(not native.available(), reason=NO_GEMV)
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 11])
def test_fused_decode_matches_the_layer_by_layer_forward(wide_heads, fmt, rows):
    """decode.c's whole-step decode equals the model's torch-op forward over the same weights: the logits,
    and the keys and values it writes into the cache, for rows on scattered slots at varied positions."""
    loaded = load_checkpoint(str(wide_heads))
    model = GPT2(loaded.config, loaded.state_dict, fmt, "cpu", "gemv")
    assert model.fused_decode
    gen = torch.Generator().manual_seed(rows)
    slots = torch.randperm(16, generator=gen)[:rows].tolist()
    lengths = torch.randint(1, 120, (rows,), generator=gen).tolist()
    cache = model.new_cache(16, 128)
    for slot, n in zip(slots, lengths):
        model(make_batch([torch.randint(0, 50257, (n,), generator=gen).tolist()], [slot], [0], "cpu"), cache)
    batch = [[int(t)] for t in torch.randint(0, 50257, (rows,), generator=gen)], slots, lengths
    before = cache.k.clone(), cache.v.clone()
    fused = model(make_batch(*batch, "cpu"), cache)
    written = cache.k.clone(), cache.v.clone()
    cache.k.copy_(before[0])
    cache.v.copy_(before[1])
    model.fused_decode = False
    unfused = model(make_batch(*batch, "cpu"), cache)
    assert torch.allclose(fused, unfused, atol=2e-5, rtol=1e-5), (fused - unfused).abs().max()
    assert torch.allclose(written[0], cache.k, atol=1e-6) and torch.allclose(written[1], cache.v, atol=1e-6)


@pytest.mark.skipif(not native.available(), reason=NO_GEMV)
def test_fused_decode_matches_the_reference_with_gpt2_head_width(wide_heads):
    loaded = load_checkpoint(str(wide_heads))
    ours = GPT2(loaded.config, loaded.state_dict, cpu_kernels="gemv")
    ref = GPT2LMHeadModel.from_pretrained(wide_heads).eval()
    ids = torch.randint(0, 50257, (110,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    cache = ours.new_cache(2, 128)
    ours(make_batch([ids[:90].tolist()], [1], [0], "cpu"), cache)
    for t in range(90, 110):  # key lengths 91 .. 110: whole and partial 8-key blocks
        got = ours(make_batch([[int(ids[t])]], [1], [t], "cpu"), cache)[0]
        assert torch.allclose(got, expected[t], atol=1e-4, rtol=0)


@pytest.mark.skipif(not native.available(), reason=NO_GEMV)
def test_fused_decode_refuses_what_it_cannot_take(wide_heads):
    loaded = load_checkpoint(str(wide_heads))
    model = GPT2(loaded.config, loaded.state_dict, cpu_kernels="gemv")
    layers, cache = model.decode_layers, model.new_cache(2, 16)
    x, slot = torch.zeros(1, 128), torch.tensor([0])
    with pytest.raises(ValueError, match="refused"):
        native.decode(layers, x, slot, torch.tensor([16]), cache.k, cache.v)  # past the cache
    with pytest.raises(ValueError, match="refused"):
        native.decode(layers, x, torch.tensor([2]), torch.tensor([0]), cache.k, cache.v)  # no such slot
    with pytest.raises(ValueError, match="int64"):
        native.decode(layers, x, slot.int(), torch.tensor([0]), cache.k, cache.v)
    with pytest.raises(ValueError, match="contiguous"):
        native.decode(layers, x.double(), slot, torch.tensor([0]), cache.k, cache.v)


@pytest.mark.skipif(not native.available(), reason=NO_GEMV)
@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_fused_prefill_matches_the_layer_by_layer_forward(wide_heads, fmt):
    """Prompts (up to `fused_rows` tokens in all) run on decode.c as rows of one slot at consecutive
    positions: every position's logits and the cache it writes equal the torch-op forward's, for a fresh
    prompt, a continued one, and two prompts side by side, short and long (the torch-op forward then
    keeps every product on gemv.c too: oneDNN's would round bfloat16 activations)."""
    loaded = load_checkpoint(str(wide_heads))
    model = GPT2(loaded.config, loaded.state_dict, fmt, "cpu", "gemv")
    for layer in model.modules():
        if isinstance(layer, PackedLinear):
            layer.max_gemv_rows = GEMV_MAX_ROWS
    gen = torch.Generator().manual_seed(7)
    cases = [([3], [0], 20), ([5], [40], 12), ([1, 6], [0, 9], 16), ([2], [0], 100), ([4, 7], [0, 20], 60)]
    # (slots, starts, tokens per row)
    for slots, starts, n in cases:
        cache = model.new_cache(8, 128)
        for slot, start in zip(slots, starts):
            if start:
                model(
                    make_batch(
                        [torch.randint(0, 50257, (start,), generator=gen).tolist()], [slot], [0], "cpu"
                    ),
                    cache,
                )
        tokens = [torch.randint(0, 50257, (n,), generator=gen).tolist() for _ in slots]
        before = cache.k.clone(), cache.v.clone()
        model.fused_decode = True
        fused = model(make_batch(tokens, slots, starts, "cpu"), cache, last_only=False)
        written = cache.k.clone(), cache.v.clone()
        cache.k.copy_(before[0])
        cache.v.copy_(before[1])
        model.fused_decode = False
        unfused = model(make_batch(tokens, slots, starts, "cpu"), cache, last_only=False)
        assert torch.allclose(fused, unfused, atol=2e-5, rtol=1e-5), (slots, (fused - unfused).abs().max())
        assert torch.allclose(written[0], cache.k, atol=1e-5) and torch.allclose(
            written[1], cache.v, atol=1e-5
        )


@pytest.mark.skipif(not native.available(), reason=NO_GEMV)
@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
def test_token_embedding_reads_the_output_heads_rows(tiny_checkpoint, fmt):
    """On gemv.c the embedding table is not stored twice: float32 looks up the head's own tensor, half
    width its rounded rows, int8 its rows plus a one-byte correction (within 1/508 of the row's step)."""
    loaded = load_checkpoint(str(tiny_checkpoint))
    wte = loaded.state_dict["wte.weight"].clone()
    model = GPT2(loaded.config, loaded.state_dict, fmt, "cpu", "gemv")
    head, embedding = model.lm_head.weight, model.wte
    assert embedding.table is head
    tokens = torch.tensor([[0, 50256, 464], [13, 13, 2068]])
    rows = embedding(tokens, torch.float32)
    assert rows.shape == (2, 3, wte.shape[1]) and rows.dtype == torch.float32
    if fmt == "float32":
        assert torch.equal(rows, wte[tokens])
    elif fmt == "bfloat16":
        assert torch.equal(rows, wte[tokens].bfloat16().float())
    else:
        step = model.lm_head.scale[tokens].unsqueeze(-1)
        assert ((rows - wte[tokens]).abs() <= step / 508 + 1e-7).all()
        assert not ((head[tokens].float() * step - wte[tokens]).abs() <= step / 508).all()  # the correction
        held = [t for t in (embedding.table, embedding.residual) if t is not None]
        assert all(t.dtype == torch.int8 for t in held)


@pytest.mark.skipif(not native.available(), reason=NO_GEMV)
@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_prompts_and_decode_rows_in_one_forward_equal_separate_ones(wide_heads, fmt):
    """`forward_rows` runs decode rows and new prompts together: every row's logits and the cache it
    writes are bit-identical to running the decode step and each prompt's prefill apart."""
    loaded = load_checkpoint(str(wide_heads))
    model = GPT2(loaded.config, loaded.state_dict, fmt, "cpu", "gemv")
    gen = torch.Generator().manual_seed(11)
    ids = lambda n: torch.randint(0, 50257, (n,), generator=gen).tolist()  # noqa: E731
    cache = model.new_cache(8, 128)
    for slot, n in ((0, 5), (5, 17)):  # running sequences
        model(make_batch([ids(n)], [slot], [0], "cpu"), cache)
    steps, prompts = [ids(1), ids(1)], [ids(6), ids(13)]  # next tokens at 5 / 17; prompts in slots 2, 3
    assert model.takes_rows(2 + 6 + 13, cache) and not model.takes_rows(model.fused_rows + 1, cache)
    before = cache.k.clone(), cache.v.clone()
    tokens = steps[0] + steps[1] + prompts[0] + prompts[1]
    slots, positions = [0, 5] + [2] * 6 + [3] * 13, [5, 17, *range(6), *range(13)]
    joint = model.forward_rows(tokens, slots, positions, [0, 1, 7, 20], cache)
    written = cache.k.clone(), cache.v.clone()
    cache.k.copy_(before[0])
    cache.v.copy_(before[1])
    apart = [
        model(make_batch(steps, [0, 5], [5, 17], "cpu"), cache),
        model(make_batch([prompts[0]], [2], [0], "cpu"), cache),
        model(make_batch([prompts[1]], [3], [0], "cpu"), cache),
    ]
    assert torch.equal(joint, torch.cat(apart))
    assert torch.equal(written[0], cache.k) and torch.equal(written[1], cache.v)
