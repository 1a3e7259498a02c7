"""random:<size>: deterministic GPT-2-initialised weights of a known shape (as vLLM's `--load-format
dummy`), for offline demos, load tests and benchmarks; speed does not depend on the weights' values.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from gpt2serve.engine.config import ModelConfig
from gpt2serve.engine.loading.lazy import PREFETCH, LazyStateDict, expected_shapes

RANDOM_SEED = 0
INIT_STD = 0.02
_RANDOM_CHUNK = 1 << 22  # elements generated (in float32) per step of a random tensor


def lazy_random_state_dict(
    config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0
) -> LazyStateDict:
    """`random_state_dict`'s weights, each generated when first accessed."""
    state = LazyStateDict(prefetch=PREFETCH)
    for index, (name, shape) in enumerate(expected_shapes(config).items()):
        state.add(name, shape, partial(_random_tensor, config, name, index, shape, dtype, seed))
    return state


def random_state_dict(config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """GPT-2-initialised weights of `config`'s shape, deterministic for a seed, built directly in `dtype`.

    Weights ~ N(0, 0.02) (residual projections scaled by 1/sqrt(2 n_layer), as GPT-2 does); LayerNorm weights
    1, biases 0. Values are drawn in float32 chunk by chunk, so every dtype holds the same numbers rounded.
    """
    shapes = expected_shapes(config)

    def make(item: tuple[int, tuple[str, tuple[int, ...]]]) -> torch.Tensor:
        index, (name, shape) = item
        return _random_tensor(config, name, index, shape, dtype, seed)

    with ThreadPoolExecutor(max_workers=max(1, min(8, torch.get_num_threads()))) as pool:
        return dict(zip(shapes, pool.map(make, enumerate(shapes.items()))))


def _random_tensor(
    config: ModelConfig, name: str, index: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int
) -> torch.Tensor:
    """Tensor number `index` of `random_state_dict`: the same values whichever order they are made in."""
    tensor = torch.empty(shape, dtype=dtype)
    if name.endswith(".bias"):
        tensor.zero_()
    elif name.startswith("ln_f.") or ".ln_" in name:
        tensor.fill_(1.0)
    else:
        std = INIT_STD / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else INIT_STD
        _fill_normal(tensor.view(-1), std, torch.Generator().manual_seed(seed * 1_000_003 + index))
    return tensor


def _fill_normal(flat: torch.Tensor, std: float, generator: torch.Generator) -> None:
    buffer = torch.empty(min(_RANDOM_CHUNK, flat.numel()), dtype=torch.float32)
    for lo in range(0, flat.numel(), _RANDOM_CHUNK):
        chunk = buffer[: min(_RANDOM_CHUNK, flat.numel() - lo)]
        chunk.normal_(0.0, std, generator=generator)
        flat[lo : lo + chunk.numel()].copy_(chunk)
