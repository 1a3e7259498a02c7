"""int8 weights against float32: next-token distributions at 200 positions of varied prompts.

A GPT-2 with its usual random init (std 0.02) predicts an almost uniform distribution over the 50257
tokens (entropy ~10.8 nats), so any quantization error looks harmless there. The tiny checkpoint is
therefore rescaled so that it predicts like a trained model: matrices of the blocks to std 0.2 (attention
scores and MLP activations of order 1, so every layer shapes the output) and the token/position
embeddings to std 0.6 (logits of std ~5 after the final LayerNorm). The float32 model then has a mean
next-token entropy of ~3.35 nats and a mean top-1 probability of ~0.33, the order of a trained GPT-2's
loss on web text (~3 nats), and the test checks that it is peaked before it compares. Both models see
the same prefixes (teacher forcing). The "int8" format is the one the engine serves: int8 matrices, with
the q/k/v projection and the output head in bfloat16, and on CPUs without VNNI the MLP's input projection
too (see `gpt2serve.engine.model.INT8_KEPT_IN_BFLOAT16`).
"""

from __future__ import annotations

import math

import pytest
import torch

from gpt2serve.engine.loader import load_checkpoint
from gpt2serve.engine.model import GPT2, make_batch
from gpt2serve.engine.tokenizer import Tokenizer

BLOCK_STD, EMBED_STD, INIT_STD = 0.2, 0.6, 0.02
TOKENS_PER_PROMPT = 25
PROMPTS = (
    "The quick brown fox jumps over the lazy dog and keeps running through the dark forest until night falls "
    "over the hills and far away.",
    "In 1905, Albert Einstein published four papers that changed physics forever, including the one on "
    "special relativity and the equivalence of mass and energy.",
    "def main():\n    args = parse_args()\n    for item in args.items:\n"
    "        print(item, file=sys.stderr)\n    return 0\n",
    "She said that the weather would be fine tomorrow, but nobody believed her after what had happened last "
    "week at the lake near the old mill.",
    "Prices rose by 3.5% in March, the fastest pace since 2008, according to figures released on Tuesday by "
    "the statistics office.",
    "Il était une fois une petite fille qui vivait dans un village près de la forêt avec sa "
    "grand-mère et son chat noir.",
    '{"id": 42, "name": "widget", "tags": ["red", "small"], "price": 9.99, "stock": {"warehouse": 17}}',
    "Water boils at 100 degrees Celsius at sea level; at higher altitudes, where the air pressure "
    "is lower, it boils sooner.",
)


@pytest.fixture(scope="module")
def state(tiny_checkpoint):
    loaded = load_checkpoint(str(tiny_checkpoint))
    sd = {}
    for name, tensor in loaded.state_dict.items():
        if name in ("wte.weight", "wpe.weight"):
            sd[name] = tensor * (EMBED_STD / INIT_STD)
        elif name.startswith("h.") and name.endswith(".weight") and ".ln_" not in name:
            sd[name] = tensor * (BLOCK_STD / INIT_STD)
        else:  # LayerNorms and biases as they are
            sd[name] = tensor
    return loaded.config, sd


def _log_probs(config, sd, fmt: str, prompts: list[list[int]]) -> torch.Tensor:
    """(positions, V) float32 log-probabilities of the next token after every prefix of every prompt."""
    model = GPT2(config, dict(sd), fmt)
    rows = []
    for ids in prompts:
        cache = model.new_cache(1, len(ids))
        logits = model(make_batch([ids], [0], [0], "cpu"), cache, last_only=False)[0]
        rows.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.cat(rows)


def test_int8_next_token_distributions_match_float32(state):
    config, sd = state
    tokenizer = Tokenizer.bundled()
    prompts = [tokenizer.encode(text)[:TOKENS_PER_PROMPT] for text in PROMPTS]
    assert all(len(ids) == TOKENS_PER_PROMPT for ids in prompts)

    ref = _log_probs(config, sd, "float32", prompts)
    q = _log_probs(config, sd, "int8", prompts)
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
