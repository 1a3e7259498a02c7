"""engine.processors against Hugging Face transformers' logits processors as the oracle."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from gpt2serve.engine.processors import (
    apply_presence_frequency,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    banned_ngram_tokens,
)
from tests.engine.test_sampling import logits_process, make_logits


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

