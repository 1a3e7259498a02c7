"""The seed API's modes and rules (api/protocol.py), and each protocol's field names in engine errors."""

from __future__ import annotations

import pytest

from gpt2serve.api.errors import renamed
from gpt2serve.api.openai_protocol import OPENAI_NAMES, CompletionRequest
from gpt2serve.api.protocol import SEED_NAMES, V1_NAMES, Mode, SeedRequest, V1Request
from gpt2serve.engine.errors import InvalidParameterError
from gpt2serve.engine.params import SamplingParams


def _mode(mode: str, **fields) -> SamplingParams:
    return SeedRequest(input="x", mode=mode, **fields).to_params()


def test_unknown_mode_lists_the_five():
    with pytest.raises(InvalidParameterError) as e:
        _mode("top-p")
    assert e.value.param == "mode"
    for mode in Mode:
        assert mode.value in str(e.value)
    assert "'top-p'" in str(e.value)


def test_modes_map_to_hf_generate_settings():
    top_p = _mode("sample-top-p")
    assert (top_p.do_sample, top_p.top_k, top_p.top_p, top_p.temperature) == (True, 50, 0.92, 1.0)
    top_k = _mode("sample-top-k", top_k=10)
    assert (top_k.top_k, top_k.top_p, top_k.temperature) == (10, 1.0, 1.0)
    sample = _mode("sample")
    assert (sample.temperature, sample.top_k, sample.top_p) == (0.7, 50, 0.92)
    beam = _mode("beam", num_return_sequences=3)
    assert (beam.do_sample, beam.num_beams, beam.no_repeat_ngram_size) == (False, 5, 2)
    assert _mode("greedy").is_greedy


def test_seed_minus_one_is_no_seed_in_the_seed_api_only():
    assert _mode("sample", seed=-1).seed is None
    assert V1Request(input="x", seed=-1).to_params().seed is None
    with pytest.raises(InvalidParameterError) as e:
        _mode("sample", seed=-2)
    assert "or -1 for no seed" in str(e.value)
    with pytest.raises(InvalidParameterError) as e:  # OpenAI has no such rule: -1 is a bad seed there
        CompletionRequest(prompt="x", seed=-1).to_params()
    assert e.value.param == "seed" and "-1" in str(e.value) and "no seed" not in str(e.value)


@pytest.mark.parametrize(
    ("names", "param", "expected"),
    [
        (SEED_NAMES, "n", "num_return_sequences"),
        (SEED_NAMES, "prompt", "input"),
        (V1_NAMES, "top_k", "k"),
        (V1_NAMES, "max_new_tokens", "length"),
        (OPENAI_NAMES, "max_new_tokens", "max_tokens"),
        (OPENAI_NAMES, "n", "n"),
        (OPENAI_NAMES, "prompt", "prompt"),
    ],
)
def test_engine_errors_are_renamed_into_each_protocol(names, param, expected):
    error = renamed(InvalidParameterError(param, f"`{param}` is wrong beside `num_beams`"), names)
    assert error.param == expected
    assert str(error) == f"`{expected}` is wrong beside `num_beams`"


def test_other_errors_are_not_renamed():
    error = ValueError("`n` stays")
    assert renamed(error, SEED_NAMES) is error
