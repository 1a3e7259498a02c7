"""BeamGroup against Hugging Face `generate(num_beams=...)`, token for token and score for score.

A tiny random GPT-2 is made "peaky" (embeddings scaled up) so that log-probabilities differ clearly,
and its EOS embedding is scaled further so that many hypotheses end on EOS. BeamGroup is driven by a
plain loop: a full forward pass over every beam's sequence, log_softmax, then the same logits processors
HF applies, in the same order.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList  # noqa: E402
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor  # noqa: E402

from gpt2serve.engine.beam import BeamGroup  # noqa: E402

EOS = 50256


class RoundScores(LogitsProcessor):
    """Rounds log-probabilities to halves: many exact ties, to test topk tie-breaking."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return torch.round(scores * 2) / 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny matmuls are far faster on one thread, above all on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=128)
    lm = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        lm.transformer.wte.weight.mul_(20.0)  # tied lm_head: sharp distributions
        lm.transformer.wte.weight[EOS].mul_(3.0)  # EOS often very likely (or very unlikely)
    return lm


def _case(i: int) -> tuple[list[int], int, int]:
    """Prompt, max_length and num_return of case `i`: varied lengths, 1..5 returned sequences."""
    gen = torch.Generator().manual_seed(1000 + i)
    prompt_len = 1 + (i * 7) % 20
    prompt = torch.randint(0, EOS, (prompt_len,), generator=gen).tolist()
    max_new = 1 + (i * 5) % 18
    return prompt, prompt_len + max_new, 1 + i % 5


def _processors(ngram: int, extra: list[LogitsProcessor]) -> list[LogitsProcessor]:
    return ([NoRepeatNGramLogitsProcessor(ngram)] if ngram else []) + extra


def _run_group(lm, prompt, *, num_beams=5, num_return=3, max_length, ngram=2, extra=(), one_row=False, **kw):
    """Drive a BeamGroup with full (uncached) forward passes; returns (token lists, scores, steps)."""
    group = BeamGroup(num_beams, num_return, max_length - len(prompt), EOS, len(prompt), **kw)
    processors = _processors(ngram, list(extra))
    histories = [list(prompt) for _ in range(num_beams)]
    steps = 0
    while not group.done:
        rows = histories[:1] if one_row and steps == 0 else histories
        ids = torch.tensor(rows)
        with torch.no_grad():
            logits = lm(input_ids=ids, logits_to_keep=1).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for proc in processors:
            logprobs = proc(ids, logprobs)
        sources, tokens = group.step(logprobs)
        histories = [histories[s] + [t] for s, t in zip(sources, tokens, strict=True)]
        steps += 1
        assert steps <= max_length
    results = group.finalize()
    return [r[0] for r in results], [r[1] for r in results], steps


def _run_hf(lm, prompt, *, num_beams=5, num_return=3, max_length, ngram=2, extra=(), use_cache=False, **kw):
    """HF's beam search; returns (sequences with prompt and padding, sequences_scores)."""
    with torch.no_grad():
        out = lm.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            num_beams=num_beams,
            num_return_sequences=num_return,
            no_repeat_ngram_size=ngram,
            max_length=max_length,
            pad_token_id=EOS,
            logits_processor=LogitsProcessorList(list(extra)),
            use_cache=use_cache,
            output_scores=True,
            return_dict_in_generate=True,
            **kw,
        )
    return out.sequences.tolist(), out.sequences_scores.tolist()


def _assert_same(lm, prompt, *, exact_scores=True, use_cache=False, **kw) -> None:
    hf_seqs, hf_scores = _run_hf(lm, prompt, use_cache=use_cache, **kw)
    tokens, scores, _ = _run_group(lm, prompt, **kw)
    width = len(hf_seqs[0])
    padded = [prompt + t + [EOS] * (width - len(prompt) - len(t)) for t in tokens]
    assert padded == hf_seqs
    tol = 1e-6 if exact_scores else 1e-4
    assert scores == pytest.approx(hf_scores, abs=tol)


@pytest.mark.parametrize("i", range(24))
def test_matches_hf_beam_search(model, i):
    prompt, max_length, num_return = _case(i)
    _assert_same(
        model, prompt, num_beams=5, num_return=num_return, max_length=max_length, early_stopping=True
    )


def test_cases_cover_eos_and_length_endings(model):
    eos_ended = length_ended = stopped_early = 0
    for i in range(24):
        prompt, max_length, num_return = _case(i)
        tokens, _, steps = _run_group(model, prompt, num_return=num_return, max_length=max_length)
        eos_ended += sum(1 for t in tokens if t[-1] == EOS)
        length_ended += sum(1 for t in tokens if len(prompt) + len(t) == max_length and t[-1] != EOS)
        stopped_early += steps < max_length - len(prompt)
    assert eos_ended >= 5 and length_ended >= 5 and stopped_early >= 2


@pytest.mark.parametrize(
    "num_beams, num_return, ngram, length_penalty, early_stopping",
    [
        (2, 2, 2, 1.0, True),
        (3, 1, 3, 1.0, True),
        (4, 4, 0, 1.0, True),
        (5, 2, 2, 1.0, False),
        (4, 3, 2, 2.0, False),
        (4, 2, 2, 0.5, "never"),
        (3, 3, 2, -1.0, True),
    ],
)
def test_other_settings_match_hf(model, num_beams, num_return, ngram, length_penalty, early_stopping):
    for i in (3, 13):
        prompt, max_length, _ = _case(i)
        _assert_same(
            model,
            prompt,
            num_beams=num_beams,
            num_return=num_return,
            max_length=max_length + 4,
            ngram=ngram,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )


@pytest.mark.parametrize("i", [0, 5, 10, 17])
def test_ties_break_like_hf(model, i):
    prompt, max_length, num_return = _case(i)
    _assert_same(model, prompt, num_return=num_return, max_length=max_length + 3, extra=[RoundScores()])


@pytest.mark.parametrize("i", [2, 9, 16])
def test_cached_hf_agrees(model, i):
    prompt, max_length, num_return = _case(i)
    _assert_same(
        model, prompt, num_return=num_return, max_length=max_length, use_cache=True, exact_scores=False
    )


def test_first_step_accepts_one_row(model):
    prompt, max_length, _ = _case(6)
    full = _run_group(model, prompt, max_length=max_length)
    assert _run_group(model, prompt, max_length=max_length, one_row=True) == full


def test_rejects_bad_use():
    with pytest.raises(ValueError):
        BeamGroup(3, 4, 5, EOS, 2)
    with pytest.raises(ValueError):
        BeamGroup(3, 1, 0, EOS, 2)
    group = BeamGroup(3, 2, 1, EOS, 2)
    with pytest.raises(ValueError):
        group.step(torch.zeros(2, 10))
    group.step(torch.log_softmax(torch.arange(10.0), dim=-1)[None, :])  # the length limit: every beam ends
    assert group.done and group.num_generated == 1
    assert [t for t, _ in group.finalize()] == [[9], [8]]
    with pytest.raises(RuntimeError):
        group.step(torch.zeros(3, 10))
