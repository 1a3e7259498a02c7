"""Shared fixtures: tiny random checkpoints and the `gpu` marker skip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints import make_checkpoint

GPU_SKIP_REASON = "needs a CUDA GPU; run on a GPU machine with `pytest -m gpu`"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: a folder named gpu matches
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 4-head, 64-wide GPT-2 (safetensors, with tokenizer files)."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), n_layer=2, n_head=4, n_embd=64, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second shape: 3 layers, 2 heads, 32 wide."""
    return make_checkpoint(tmp_path_factory.mktemp("tiny_ckpt_b"), n_layer=3, n_head=2, n_embd=32, seed=1)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    """`checkpoint_factory(**kwargs)` -> a fresh directory written by `make_checkpoint(dir, **kwargs)`."""

    def build(**kwargs: object) -> Path:
        return make_checkpoint(tmp_path_factory.mktemp("ckpt"), **kwargs)

    return build
