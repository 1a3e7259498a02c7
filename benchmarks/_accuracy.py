"""The int8 accuracy measurement: a tiny GPT-2 rescaled to predict like a trained model, and the
teacher-forced next-token distributions of a format at every position of a few prompts.

A GPT-2 with its usual random init (std 0.02) predicts an almost uniform distribution over the 50257
tokens (entropy ~10.8 nats), so any quantization error looks harmless there. `rescale` therefore sets the
blocks' matrices to std 0.2 (attention scores and MLP activations of order 1, so every layer shapes the
output) and the token/position embeddings to std 0.6 (logits of std ~5 after the final LayerNorm): the
float32 model then has a mean next-token entropy of ~3.35 nats and a mean top-1 probability of ~0.33, the
order of a trained GPT-2's loss on web text (~3 nats).

Shared by tests/engine/test_int8_accuracy.py (one checkpoint, thresholds asserted) and
benchmarks/bench_int8_accuracy.py (many checkpoints, figures printed).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2serve.engine.model import GPT2, make_batch

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


def tiny_checkpoint(folder: Path, seed: int, n_positions: int = 128) -> Path:
    """A 2-layer, 4-head, 64-wide Hugging Face GPT-2 with transformers' init under `seed`, written to
    `folder`: the weights of the tests' `make_checkpoint` for the same shape and seed."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=n_positions, vocab_size=50257)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


def rescale(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with the blocks' matrices and the embeddings rescaled (module docstring);
    LayerNorms and biases as they are."""
    sd = {}
    for name, tensor in state_dict.items():
        if name in ("wte.weight", "wpe.weight"):
            sd[name] = tensor * (EMBED_STD / INIT_STD)
        elif name.startswith("h.") and name.endswith(".weight") and ".ln_" not in name:
            sd[name] = tensor * (BLOCK_STD / INIT_STD)
        else:
            sd[name] = tensor
    return sd


def log_probs(config, sd: dict[str, torch.Tensor], fmt: str, prompts: list[list[int]]) -> torch.Tensor:
    """(positions, V) float32 log-probabilities of the next token after every prefix of every prompt."""
    model = GPT2(config, dict(sd), fmt)
    rows = []
    for ids in prompts:
        cache = model.new_cache(1, len(ids))
        logits = model(make_batch([ids], [0], [0], "cpu"), cache, last_only=False)[0]
        rows.append(torch.log_softmax(logits.float(), dim=-1))
    return torch.cat(rows)
