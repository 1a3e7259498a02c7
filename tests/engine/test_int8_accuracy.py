"""int8 weights against float32: next-token distributions at 200 positions of varied prompts.

The tiny checkpoint is rescaled so that it predicts like a trained model (benchmarks/_accuracy.py says
how and why, and benchmarks/bench_int8_accuracy.py repeats this over several checkpoints); the test
checks that the float32 model is peaked before it compares. Both models see the same prefixes (teacher
forcing). The "int8" format is the one the engine serves: int8 matrices, with the q/k/v projection and
the output head in bfloat16, and on CPUs without VNNI the MLP's input projection too (see
`gpt2serve.engine.model.INT8_KEPT_IN_BFLOAT16`).
"""

from __future__ import annotations

import math

import pytest

from benchmarks._accuracy import PROMPTS, TOKENS_PER_PROMPT, log_probs, rescale
from gpt2serve.engine.loader import load_checkpoint
from gpt2serve.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def state(tiny_checkpoint):
    loaded = load_checkpoint(str(tiny_checkpoint))
    return loaded.config, rescale(loaded.state_dict)


def test_int8_next_token_distributions_match_float32(state):
    config, sd = state
    tokenizer = Tokenizer.bundled()
    prompts = [tokenizer.encode(text)[:TOKENS_PER_PROMPT] for text in PROMPTS]
    assert all(len(ids) == TOKENS_PER_PROMPT for ids in prompts)

    ref = log_probs(config, sd, "float32", prompts)
    q = log_probs(config, sd, "int8", prompts)
    assert ref.shape == (200, config.vocab_size)

    # The reference must be peaked, else the comparison says nothing.
    p = ref.exp()
    entropy = -(p * ref).sum(-1).mean().item()
    assert entropy < 0.5 * math.log(config.vocab_size), f"fp32 distribution too flat: {entropy:.2f} nats"
    assert p.max(-1).values.mean().item() > 0.15

    kl = (p * (ref - q)).sum(-1)  # KL(fp32 || int8) per position, nats
    agreement = (ref.argmax(-1) == q.argmax(-1)).float().mean().item()
    assert kl.mean().item() < 0.01, f"mean KL {kl.mean():.4f} nats (max {kl.max():.4f})"
    assert agreement >= 0.97, (
        f"top-1 agreement {agreement:.3f}, mean KL {kl.mean():.4f}, entropy {entropy:.2f}"
    )
