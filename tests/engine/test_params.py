"""Every invalid parameter raises InvalidParameterError naming the field, the limit and the value."""

from __future__ import annotations

import pytest

from gpt2serve.engine.errors import InvalidParameterError
from gpt2serve.engine.params import SamplingParams

INVALID = [
    # (fields, param named, text the message must hold)
    ({"top_p": 1.5}, "top_p", "(0, 1], got 1.5"),
    ({"top_p": 0.0}, "top_p", "got 0.0"),
    ({"top_p": float("nan")}, "top_p", "nan"),
    ({"top_k": -1}, "top_k", ">= 0, got -1"),
    ({"top_k": 2.5}, "top_k", "got 2.5"),
    ({"temperature": 0}, "temperature", "[1e-05, 100000] (beyond it float32 logits overflow"),
    ({"temperature": 0}, "temperature", "got 0"),
    ({"temperature": 1e-300}, "temperature", "got 1e-300"),
    ({"temperature": 1e300}, "temperature", "got 1e+300"),
    ({"temperature": -1.0}, "temperature", "got -1.0"),
    ({"temperature": "hot"}, "temperature", "'hot'"),
    ({"num_beams": 0}, "num_beams", "[1, 16], got 0"),
    ({"num_beams": 17}, "num_beams", "got 17"),
    ({"n": 0}, "n", "[1, 16], got 0"),
    ({"n": 17}, "n", "got 17"),
    ({"num_beams": 2, "n": 3}, "n", "<= num_beams (2) in beam mode, got 3"),
    ({"max_length": 0}, "max_length", ">= 1, got 0"),
    ({"max_new_tokens": -5}, "max_new_tokens", "got -5"),
    ({"max_new_tokens": True}, "max_new_tokens", "got True"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "[1e-05, 100000]"),
    ({"repetition_penalty": 1e-300}, "repetition_penalty", "got 1e-300"),
    ({"presence_penalty": 3.0}, "presence_penalty", "[-2, 2], got 3.0"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "got -2.5"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size", ">= 0, got -1"),
    ({"seed": -1}, "seed", "[0, 9223372036854775807], got -1"),  # the seed API's -1 is its own rule
    ({"seed": -2}, "seed", "got -2"),
    ({"seed": 2**64}, "seed", str(2**64)),
    ({"stop": ("",)}, "stop", "non-empty"),
    ({"stop": tuple("abcdefghi")}, "stop", "at most 8"),
    ({"logprobs": 6}, "logprobs", "[0, 5], got 6"),
]


@pytest.mark.parametrize(("fields", "param", "text"), INVALID)
def test_invalid_parameter(fields, param, text):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**fields)
    assert e.value.param == param
    assert f"`{param}`" in str(e.value) and text in str(e.value)


@pytest.mark.parametrize(
    ("fields", "prompt_len", "param", "text"),
    [
        ({}, 0, "prompt", "must not be empty"),
        ({}, 1024, "prompt", "1024 tokens"),
        ({"max_length": 1025}, 10, "max_length", "<= 1024"),
        ({"max_length": 10}, 10, "max_length", "greater than the prompt's 10 tokens, got 10"),
    ],
)
def test_invalid_against_the_prompt(fields, prompt_len, param, text):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**fields).new_token_budget(prompt_len, 1024)
    assert e.value.param == param and text in str(e.value)


def test_budget_is_capped_by_the_context():
    assert SamplingParams(max_length=100).new_token_budget(8, 1024) == 92
    assert SamplingParams(max_new_tokens=500).new_token_budget(1000, 1024) == 24
