"""Load GPT-2 weights: a Hugging Face checkpoint directory, a hub model id, or `random:<size>`.

Every source yields a `LoadedModel` whose state dict is lazy (loading/lazy.py: each tensor read, or
generated, when the model packs it) and uses Hugging Face GPT-2 names without the `transformer.` prefix.
Each source is a module of engine/loading/: checkpoint_dir.py, hub.py (a snapshot directory, then read as
a checkpoint directory), random_weights.py; memory.py returns what loading frees to the OS.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2serve.engine.config import KNOWN_SHAPES, ModelConfig
from gpt2serve.engine.errors import ModelLoadError
from gpt2serve.engine.loading.checkpoint_dir import read_checkpoint
from gpt2serve.engine.loading.hub import hub_snapshot
from gpt2serve.engine.loading.lazy import LazyStateDict
from gpt2serve.engine.loading.random_weights import RANDOM_SEED, lazy_random_state_dict
from gpt2serve.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"


@dataclass
class LoadedModel:
    """Weights, shape and tokenizer of one model, ready for the engine."""

    name: str
    config: ModelConfig
    state_dict: MutableMapping[str, torch.Tensor]  # a LazyStateDict from load_checkpoint
    tokenizer: Tokenizer
    is_random: bool
    source: str = ""  # where the weights came from (a directory, or "random")

    @property
    def n_params(self) -> int:
        if isinstance(self.state_dict, LazyStateDict):
            return self.state_dict.numel()
        return sum(t.numel() for t in self.state_dict.values())


# The dtype a checkpoint is read in for each weight format (int8 quantizes from float32, one tensor at a
# time: reading bfloat16 instead would cost 1.5 points of top-1 agreement).
READ_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.float32,
}


def load_checkpoint(spec: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load `spec`: a checkpoint directory, a Hugging Face model id, or `random:<size>`."""
    start = time.perf_counter()
    if spec.startswith(RANDOM_PREFIX):
        loaded = _load_random(spec[len(RANDOM_PREFIX) :], dtype)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            loaded = _load_dir(path, spec, dtype)
        elif path.exists():
            raise ModelLoadError(f"{spec} is a file; pass the checkpoint directory that holds config.json")
        elif _looks_like_path(spec):
            raise ModelLoadError(f"checkpoint directory {spec} does not exist")
        else:
            loaded = _load_dir(hub_snapshot(spec), spec, dtype)
    c = loaded.config
    log.info(
        "loaded %s%s: %d layers, %d heads, width %d, context %d, %.1fM parameters, %s, from %s in %.1f s",
        loaded.name, " (random weights)" if loaded.is_random else "", c.n_layer, c.n_head, c.n_embd,
        c.n_positions, loaded.n_params / 1e6, str(dtype).removeprefix("torch."), loaded.source,
        time.perf_counter() - start,
    )  # fmt: skip
    return loaded


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def _load_dir(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    config, state = read_checkpoint(path, dtype)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer is None:
        log.warning("%s has no tokenizer.json or vocab.json + merges.txt; using the bundled tokenizer", path)
        tokenizer = Tokenizer.bundled()
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model in {path} has {config.vocab_size}"
        )
    return LoadedModel(name, config, state, tokenizer, is_random=False, source=str(path))


def _load_random(size: str, dtype: torch.dtype) -> LoadedModel:
    config = KNOWN_SHAPES.get(size)
    if config is None:
        raise ModelLoadError(
            f"unknown random model size {size!r}; choose one of {', '.join(KNOWN_SHAPES)} (e.g. random:gpt2)"
        )
    state = lazy_random_state_dict(config, dtype, seed=RANDOM_SEED)
    name = f"{RANDOM_PREFIX}{size}"
    return LoadedModel(name, config, state, Tokenizer.bundled(), is_random=True, source="random")
