"""The slot-indexed KV cache: slot copies for beam forks and n > 1."""

from __future__ import annotations

import pytest
import torch

from gpt2serve.engine.config import ModelConfig
from gpt2serve.engine.kv_cache import KVCache


def test_copy_slots_copies_only_the_prefix_of_the_named_slots():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=100)
    cache = KVCache(cfg, n_slots=5, max_len=16, dtype=torch.float32, device=torch.device("cpu"))
    cache.k.copy_(torch.randn(cache.k.shape))
    cache.v.copy_(torch.randn(cache.v.shape))
    k, v = cache.k.clone(), cache.v.clone()
    cache.copy_slots([0, 0, 3], [1, 2, 4], 10)
    for s, d in ((0, 1), (0, 2), (3, 4)):
        assert torch.equal(cache.k[:, d, :, :10], k[:, s, :, :10])
        assert torch.equal(cache.v[:, d, :, :10], v[:, s, :, :10])
        assert torch.equal(cache.k[:, d, :, 10:], k[:, d, :, 10:])  # past the prefix: untouched
    assert torch.equal(cache.k[:, [0, 3]], k[:, [0, 3]]) and torch.equal(cache.v[:, [0, 3]], v[:, [0, 3]])
    with pytest.raises(ValueError, match="both copied"):
        cache.copy_slots([1, 2], [2, 3], 4)
    k = cache.k.clone()
    cache.copy_slots([0], [4], 12, starts=[6])  # a beam fork from where the two histories part
    assert torch.equal(cache.k[:, 4, :, 6:12], k[:, 0, :, 6:12])
    assert torch.equal(cache.k[:, 4, :, :6], k[:, 4, :, :6])  # the shared prefix: left as it was
    assert torch.equal(cache.k[:, 4, :, 12:], k[:, 4, :, 12:])
