"""The token chooser: which logits a step reads, and its per-request fallback."""

from __future__ import annotations

from gpt2serve.engine.chooser import logits_read
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
