"""The token chooser: which logits a step reads, and its per-request fallback."""

from __future__ import annotations

import pytest
import torch

from gpt2serve.engine.chooser import check_finite, finite_rows, logits_read
from gpt2serve.engine.errors import NonFiniteLogitsError
from gpt2serve.engine.params import SamplingParams


def test_only_greedy_and_top_k_steps_read_just_the_top_logits():
    """Which steps may take the head sketch's logits (exact only where a row's top k can be)."""
    greedy, top_k = SamplingParams(max_new_tokens=4), SamplingParams(do_sample=True, top_k=50, top_p=0.9)
    assert logits_read([greedy]) == 1
    assert logits_read([greedy, top_k]) == 51
    for other in (
        SamplingParams(do_sample=True),  # no top-k: every token may be drawn
        SamplingParams(num_beams=3),  # beam scores need the whole log-softmax
        SamplingParams(logprobs=2),
        SamplingParams(repetition_penalty=1.2),
        SamplingParams(no_repeat_ngram_size=2),
        SamplingParams(presence_penalty=0.5),
        SamplingParams(do_sample=True, top_k=1000),
    ):
        assert logits_read([greedy, other]) is None, other


def test_the_host_finiteness_check_is_the_float32_one():
    """check_finite (host, from the rows' maxima as Python floats) refuses exactly the rows finite_rows
    (float32 tensors) refuses: NaN, infinities, and a quotient that overflows float32 only."""
    largest = torch.tensor([3e38, 3e38, 1.0, float("nan"), float("-inf"), 1e30, float("inf")])
    temperatures = [1.0, 0.5, 1e-30, 1.0, 1.0, 1e-9, 2.0]
    expected = finite_rows(largest, temperatures).tolist()
    assert expected == [True, False, True, False, False, False, False]
    for value, t, ok in zip(largest, temperatures, expected):
        if ok:
            check_finite(value[None], [t])
        else:
            with pytest.raises(NonFiniteLogitsError):
                check_finite(value[None], [t])
