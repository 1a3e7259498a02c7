"""Lazy loading: tensors are read as the model packs them, so loading holds about the packed model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2serve.engine.config import KNOWN_SHAPES, ModelConfig
from gpt2serve.engine.linear import INT8_REDUCE_RANGE
from gpt2serve.engine.loader import load_checkpoint
from gpt2serve.engine.loading import checkpoint_dir
from gpt2serve.engine.loading.lazy import PREFETCH, LazyStateDict, expected_shapes
from gpt2serve.engine.loading.random_weights import lazy_random_state_dict, random_state_dict
from gpt2serve.engine.model import GPT2, kernel_family, make_batch

REPO = Path(__file__).resolve().parents[2]


def test_lazy_state_dict_reads_on_access_and_pop_keeps_nothing() -> None:
    reads: list[str] = []

    def reader(name: str, value: float):
        return lambda: reads.append(name) or torch.full((2,), value)

    sd = LazyStateDict()
    sd.add("a", (2,), reader("a", 1.0))
    sd.add("b", (2,), reader("b", 2.0))
    assert list(sd) == ["a", "b"] and len(sd) == 2 and "a" in sd and "c" not in sd
    assert sd.shape("b") == (2,) and sd.numel() == 4 and reads == []
    assert sd["a"] is sd["a"] and reads == ["a"]  # read once, then held like a dict entry
    assert torch.equal(sd.pop("b"), torch.full((2,), 2.0)) and reads == ["a", "b"]
    assert "b" not in sd and sd.pop("b", None) is None
    sd["c"] = torch.zeros(3, 4)
    assert sd.shape("c") == (3, 4) and list(sd) == ["a", "c"]
    del sd["a"]
    assert list(sd) == ["c"] and reads == ["a", "b"]
    with pytest.raises(KeyError):
        sd["a"]


def test_read_ahead_gives_the_same_tensors_and_errors() -> None:
    def fail():
        raise ValueError("unreadable")

    sd = LazyStateDict(prefetch=2)
    for i in range(6):
        sd.add(f"t{i}", (3,), lambda i=i: torch.full((3,), float(i)))
    sd.add("bad", (3,), fail)
    assert torch.equal(sd.pop("t0"), torch.zeros(3))  # starts reading t1, t2
    del sd["t1"]
    assert [sd.pop(f"t{i}")[0].item() for i in (3, 2, 5, 4)] == [3.0, 2.0, 5.0, 4.0]
    with pytest.raises(ValueError, match="unreadable"):
        sd["bad"]
    assert list(sd) == ["bad"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_random_weights_equal_eager_ones(dtype: torch.dtype) -> None:
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=1000)
    eager = random_state_dict(config, dtype, seed=3)
    lazy = lazy_random_state_dict(config, dtype, seed=3)
    assert list(lazy) == list(eager)
    for name in reversed(list(eager)):  # any order gives the same values
        tensor = lazy.pop(name)
        assert tensor.dtype == dtype and torch.equal(tensor, eager[name]), name
    assert len(lazy) == 0


def test_random_checkpoint_reads_nothing_until_built() -> None:
    loaded = load_checkpoint("random:gpt2", torch.float32)
    sd = loaded.state_dict
    assert isinstance(sd, LazyStateDict) and repr(sd) == f"LazyStateDict({len(sd)} tensors, 0 read)"
    assert loaded.n_params == KNOWN_SHAPES["gpt2"].n_params
    assert {k: sd.shape(k) for k in sd} == expected_shapes(KNOWN_SHAPES["gpt2"])


def test_checkpoint_is_read_tensor_by_tensor(tiny_checkpoint: Path, monkeypatch) -> None:
    reads: list[int] = []
    read = checkpoint_dir._read_file
    monkeypatch.setattr(
        checkpoint_dir, "_read_file", lambda file, at, *args: reads.append(at) or read(file, at, *args)
    )
    loaded = load_checkpoint(str(tiny_checkpoint))
    assert reads == [] and loaded.n_params == loaded.config.n_params  # shapes checked from the header
    sd = loaded.state_dict
    wte = sd.pop("wte.weight")
    assert 1 <= len(reads) <= 1 + PREFETCH  # wte, and what is read ahead
    assert wte.shape == (50257, 64)
    assert torch.equal(wte, load_file(tiny_checkpoint / "model.safetensors")["transformer.wte.weight"])


def test_lazy_and_eager_weights_build_the_same_model(tiny_checkpoint: Path) -> None:
    loaded = load_checkpoint(str(tiny_checkpoint))
    eager = {k: v.clone() for k, v in load_checkpoint(str(tiny_checkpoint)).state_dict.items()}
    lazy_model, eager_model = GPT2(loaded.config, loaded.state_dict), GPT2(loaded.config, eager)
    assert len(loaded.state_dict) == 0  # consumed
    batch = make_batch([[464, 2068, 7586, 21831]], [0], [0], "cpu")
    a = lazy_model(batch, lazy_model.new_cache(1, 8), last_only=False)
    b = eager_model(batch, eager_model.new_cache(1, 8), last_only=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_tensors_do_not_share_the_files_pages(checkpoint_factory, fmt: str) -> None:
    """Loaded tensors own their memory: rewriting the file afterwards changes nothing."""
    path = checkpoint_factory(n_layer=1, fmt=fmt)
    file = path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    sd = load_checkpoint(str(path)).state_dict
    wte = sd.pop("wte.weight")
    expected = wte.clone()
    with open(file, "r+b") as f:  # in place: a view of a mapping of the file would see the zeros
        size = f.seek(0, 2)
        f.seek(0)
        f.write(bytes(size))
    assert torch.equal(wte, expected)


_MEASURE = """
import json, sys
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.engine import Engine

def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

before = status("VmRSS")
engine = Engine.load("random:gpt2", EngineConfig(dtype=sys.argv[1], device="cpu", max_batch_size=1))
rss = {"before": before, "peak": status("VmHWM"), "ready": status("VmRSS"), "kv_cache": engine.cache.nbytes}
print(json.dumps(rss))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux only)")
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_load_peak_memory_is_close_to_the_packed_model(dtype: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, dtype],
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    rss = json.loads(out.strip().splitlines()[-1])
    # A one-slot cache is small enough to be zeroed, so it is resident from the start.
    peak = rss["peak"] - rss["before"] - rss["kv_cache"]
    cfg = KNOWN_SHAPES["gpt2"]
    float32_state, wte = cfg.n_params * 4, cfg.vocab_size * cfg.n_embd * 4
    if dtype == "float32":  # the weights and the output head's packed copy of wte, plus the runtime's own
        assert peak <= 1.2 * (float32_state + wte), rss
    else:  # the float32 weights are never all held at once, and quantizing them leaves no heap behind
        # With torch's kernels and no VNNI the MLP input projection stays half-width too, and fbgemm's
        # float16 packing pads 768-wide inputs to 1024 (0.94 of the float32 state on an AVX2-only Zen 3).
        # gemv.c's int8 there: 0.58 at the peak (the float32 table while the head is packed), 0.43 ready.
        torch_kernels = kernel_family("auto", cfg, torch.device("cpu")) == "torch"
        assert peak <= (1.0 if INT8_REDUCE_RANGE and torch_kernels else 0.85 if torch_kernels else 0.7) * (
            float32_state
        ), rss
