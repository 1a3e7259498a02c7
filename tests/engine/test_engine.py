"""The engine's decoding modes against transformers' generate(), and its batching behaviour."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import GPT2LMHeadModel

from gpt2serve.engine import bridge
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.engine import Engine
from gpt2serve.engine.errors import InvalidParameterError
from gpt2serve.engine.params import SamplingParams
from tests.seed_modes import seed_api_params

N_PROMPTS = 20


def _prompts(n: int = N_PROMPTS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50000, (1 + (i * 5) % 30,), generator=gen).tolist() for i in range(n)]


@pytest.fixture(scope="module", params=["tiny_checkpoint", "tiny_checkpoint_b"])
def setup(request):
    path = request.getfixturevalue(request.param)
    engine = Engine.load(str(path), EngineConfig(max_batch_size=16))
    engine.start()
    yield engine, GPT2LMHeadModel.from_pretrained(path).eval()
    engine.stop()


def _run_ids(engine: Engine, prompt_ids: list[int], params: SamplingParams) -> list[list[int]]:
    """Generate from token ids (decoded to text and re-encoded: byte-level BPE may merge differently,
    so the test feeds the ids the engine will actually see)."""
    text = engine.tokenizer.decode(prompt_ids)
    result = engine.generate_sync(text, params)
    return [result.prompt_token_ids + o.token_ids for o in result.outputs], result.prompt_token_ids


def _reference(ref, ids: list[int], **kw) -> list[list[int]]:
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pad_token_id=50256,
            **kw,
        )
    return [[t for t in row.tolist() if t != 50256] for row in out]


def test_greedy_matches_reference(setup):
    engine, ref = setup
    for prompt in _prompts():
        got, ids = _run_ids(engine, prompt, SamplingParams(max_new_tokens=12))
        assert got == _reference(ref, ids, do_sample=False, max_new_tokens=12)


def test_long_prompts_match_reference(setup):
    """A prompt longer than decode.c takes runs through the torch-op forward (oneDNN's products past
    gemv.c's rows, where it has them); greedy and seeded sampling after it as HF's."""
    engine, ref = setup
    n = min(engine.model.fused_rows + 30, engine.model_config.n_positions - 10)
    if n <= engine.model.fused_rows:
        pytest.skip(  # runs where oneDNN takes float32 products past 64 rows (x86 CPU builds of torch)
            f"decode.c takes {engine.model.fused_rows} rows here, more than this checkpoint's context holds"
        )
    prompt = torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(9)).tolist()
    got, ids = _run_ids(engine, prompt, SamplingParams(max_new_tokens=8))
    assert len(ids) > engine.model.fused_rows
    assert got == _reference(ref, ids, do_sample=False, max_new_tokens=8)
    params = seed_api_params("sample-top-p", num_return_sequences=1, max_new_tokens=8, seed=5)
    got, ids = _run_ids(engine, prompt, params)
    torch.manual_seed(5)
    kw = dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    assert got == _reference(ref, ids, do_sample=True, max_new_tokens=8, **kw)


def test_greedy_with_repetition_penalty_and_ngram_ban_matches_reference(setup):
    engine, ref = setup
    for prompt in _prompts(8, seed=3):
        params = SamplingParams(max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2)
        got, ids = _run_ids(engine, prompt, params)
        assert got == _reference(
            ref, ids, do_sample=False, max_new_tokens=20, repetition_penalty=1.3, no_repeat_ngram_size=2
        )


def test_beam_matches_reference(setup):
    engine, ref = setup
    for prompt in _prompts(seed=1):
        params = seed_api_params("beam", num_return_sequences=3, max_new_tokens=10)
        got, ids = _run_ids(engine, prompt, params)
        expected = _reference(
            ref,
            ids,
            do_sample=False,
            num_beams=5,
            no_repeat_ngram_size=2,
            early_stopping=True,
            num_return_sequences=3,
            max_new_tokens=10,
        )
        assert got == expected


def test_max_length_counts_the_prompt(setup):
    engine, _ = setup
    result = engine.generate_sync("Hello world, this is", SamplingParams(max_length=9))
    assert len(result.prompt_token_ids) + len(result.outputs[0].token_ids) == 9


def test_greedy_returns_n_identical_sequences(setup):
    engine, _ = setup
    result = engine.generate_sync("Hello", SamplingParams(n=3, max_new_tokens=5))
    assert len(result.outputs) == 3 and len({o.text for o in result.outputs}) == 1


def test_seeded_sampling_is_deterministic(setup):
    engine, _ = setup
    params = seed_api_params("sample-top-p", num_return_sequences=3, max_new_tokens=15, seed=42)
    a = [o.token_ids for o in engine.generate_sync("Once upon a time", params).outputs]
    b = [o.token_ids for o in engine.generate_sync("Once upon a time", params).outputs]
    c = [o.token_ids for o in engine.generate_sync("Once upon a time", params.replace(seed=43)).outputs]
    assert a == b
    assert a != c
    assert len({tuple(x) for x in a}) == 3  # the n samples are independent


def test_unseeded_sampling_differs(setup):
    engine, _ = setup
    params = seed_api_params("sample", num_return_sequences=1, max_new_tokens=15)
    runs = {tuple(engine.generate_sync("Once upon a time", params).outputs[0].token_ids) for _ in range(3)}
    assert len(runs) > 1


def test_stop_string_cuts_text(setup):
    engine, _ = setup
    full = engine.generate_sync("The", SamplingParams(max_new_tokens=12)).outputs[0].text
    stop = full[3:5]
    cut = engine.generate_sync("The", SamplingParams(max_new_tokens=12, stop=(stop,))).outputs[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("row_limit", [None, 32])
def test_concurrent_requests_equal_single_runs_and_share_steps(setup, monkeypatch, row_limit):
    """With decode.c's row limit as it is, and at 32 rows, where the prompts that do not fit beside the
    decode rows run in groups of their own and the one longer than 32 tokens runs alone."""
    engine, _ = setup
    if row_limit is not None:
        monkeypatch.setattr(engine.model, "fused_rows", row_limit)
    requests = []
    for i in range(16):
        new = 6 + i % 7  # requests end at different steps, so others are admitted while some decode
        if i % 2:  # one prompt of ~48 tokens
            text = f"prompt number {i}" * (12 if i == 7 else 1)
            requests.append((text, SamplingParams(max_new_tokens=new)))
        else:
            requests.append(
                (f"seeded {i}", seed_api_params("sample", num_return_sequences=2, max_new_tokens=new, seed=i))
            )
    alone = [[o.token_ids for o in engine.generate_sync(p, s).outputs] for p, s in requests]
    before = engine.stats.max_step_batch

    async def together():
        return await asyncio.gather(*(bridge.generate(engine, p, s) for p, s in requests))

    engine.stats.max_step_batch = 0
    joined = engine.stats.prefills_in_step
    forwards, forward = [], engine.model.forward  # the model's own prefill: a prompt too long for decode.c
    monkeypatch.setattr(engine.model, "forward", lambda b, *a, **k: forwards.append(b) or forward(b, *a, **k))
    results = asyncio.run(together())
    assert [[o.token_ids for o in r.outputs] for r in results] == alone
    assert engine.stats.max_step_batch > 1, "decode steps were not shared between requests"
    if engine.model.fused_decode:  # prompts admitted while others decode ran in their steps
        assert engine.stats.prefills_in_step > joined
        assert bool(forwards) == (row_limit is not None), [b.tokens.shape for b in forwards]
    engine.stats.max_step_batch = max(before, engine.stats.max_step_batch)
    assert engine.scheduler.slots_in_use == 0


def test_seeded_sampling_matches_reference_sampling(setup):
    """Sequence 0 of a request seeded s draws as HF generate(do_sample=True) after torch.manual_seed(s)."""
    engine, ref = setup
    for i, prompt in enumerate(_prompts(6, seed=5)):
        mode = ["sample", "sample-top-k", "sample-top-p"][i % 3]
        params = seed_api_params(mode, num_return_sequences=1, max_new_tokens=12, seed=100 + i)
        got, ids = _run_ids(engine, prompt, params)
        torch.manual_seed(100 + i)
        expected = _reference(
            ref,
            ids,
            do_sample=True,
            max_new_tokens=12,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
        )
        assert got == expected


def test_kv_cache_budget_caps_the_slots(tiny_checkpoint):
    """Slots are full-context; a small memory budget gives fewer slots, and a request needing more is
    refused with a message naming the limit."""
    per_slot = 2 * 2 * 128 * 64 * 4  # layers x context x width x float32, keys and values
    engine = Engine.load(
        str(tiny_checkpoint), EngineConfig(
            max_batch_size=16, kv_cache_gb=3.5 * per_slot / 2**30, max_request_share=1.0
        )
    )
    engine.start()
    try:
        assert engine.scheduler.n_slots == 3 and engine.cache.n_slots == 3
        three = seed_api_params("sample", num_return_sequences=3, max_new_tokens=4)
        assert len(engine.generate_sync("Hi", three).outputs) == 3
        with pytest.raises(InvalidParameterError) as e:
            engine.generate_sync("Hi", seed_api_params("beam", num_return_sequences=3, max_new_tokens=4))
        assert "at most 3" in str(e.value)
    finally:
        engine.stop()
