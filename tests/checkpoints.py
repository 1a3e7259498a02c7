"""Tiny random-weight Hugging Face GPT-2 checkpoints for tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

BUNDLED_TOKENIZER = Path(__file__).resolve().parents[1] / "src" / "gpt2serve" / "data" / "gpt2-tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def make_checkpoint(
    path: str | Path,
    *,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 64,
    n_positions: int = 128,
    seed: int = 0,
    fmt: str = "safetensors",
    tokenizer: bool = True,
) -> Path:
    """Write a random GPT2LMHeadModel (vocab 50257) in HF format to `path` and return `path`.

    `fmt` is "safetensors" (model.safetensors) or "bin" (pytorch_model.bin); `tokenizer` copies the
    bundled GPT-2 tokenizer files next to the weights.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, vocab_size=50257
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(path, safe_serialization=fmt == "safetensors")
    if fmt == "bin" and not (path / "pytorch_model.bin").exists():
        # Newer transformers may ignore safe_serialization=False; write the pickle ourselves.
        for f in path.glob("model*.safetensors*"):
            f.unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    if tokenizer:
        for name in TOKENIZER_FILES:
            shutil.copy(BUNDLED_TOKENIZER / name, path / name)
    return path
