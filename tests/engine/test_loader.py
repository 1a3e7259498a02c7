"""load_checkpoint: HF directories (safetensors, .bin, shards), unsafe pickles, the hub, random:<size>."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpt2serve.engine.config import KNOWN_SHAPES, ModelConfig
from gpt2serve.engine.errors import ModelLoadError
from gpt2serve.engine.loader import load_checkpoint
from gpt2serve.engine.loading.lazy import expected_shapes
from gpt2serve.engine.loading.random_weights import random_state_dict

REPO = Path(__file__).resolve().parents[2]
HUB_TIMEOUT = 60  # generous bound on a whole subprocess; the loader itself gives up within seconds


def _hf_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict Hugging Face transformers builds from `path`, in our naming."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(path)
    return {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}


def _assert_matches_hf(path: Path, dtype: torch.dtype = torch.float32) -> None:
    loaded = load_checkpoint(str(path), dtype)
    hf = _hf_state(path)
    assert set(loaded.state_dict) == set(expected_shapes(loaded.config))
    for name, tensor in loaded.state_dict.items():
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor, hf[name].to(dtype)), name
    assert not loaded.is_random and loaded.name == str(path)


def test_safetensors_equals_hf(tiny_checkpoint: Path) -> None:
    _assert_matches_hf(tiny_checkpoint)
    loaded = load_checkpoint(str(tiny_checkpoint))
    assert loaded.config == ModelConfig(n_layer=2, n_head=4, n_embd=64, n_positions=128)
    assert loaded.tokenizer.source.startswith(str(tiny_checkpoint))


def test_bin_equals_hf(checkpoint_factory) -> None:
    path = checkpoint_factory(fmt="bin", n_layer=1, seed=3)
    assert (path / "pytorch_model.bin").exists() and not (path / "model.safetensors").exists()
    _assert_matches_hf(path)


def test_sharded_safetensors_equals_hf(tiny_checkpoint_b: Path, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel.from_pretrained(tiny_checkpoint_b).save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _assert_matches_hf(tmp_path)


def test_dtype_conversion(tiny_checkpoint: Path) -> None:
    _assert_matches_hf(tiny_checkpoint, torch.bfloat16)


def test_checkpoint_b_shape(tiny_checkpoint_b: Path) -> None:
    loaded = load_checkpoint(str(tiny_checkpoint_b))
    assert (loaded.config.n_layer, loaded.config.n_head, loaded.config.n_embd) == (3, 2, 32)
    assert loaded.state_dict["h.2.mlp.c_fc.weight"].shape == (32, 128)  # Conv1D layout: (in, out)


class _RunsCode:
    """Unpickling this calls open(marker, "w"): exactly what weights_only loading must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", ["instance", "function"])
def test_unsafe_pickle_is_refused(tiny_checkpoint: Path, tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "code-ran"
    state = {k: v for k, v in load_file(tiny_checkpoint / "model.safetensors").items()}
    state["extra"] = _RunsCode(marker) if payload == "instance" else shutil.rmtree
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="unsafe pickle"):
        load_checkpoint(str(tmp_path))
    assert not marker.exists()


def _copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_missing_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    state = load_file(tiny_checkpoint / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]
    save_file(state, _copy_config(tiny_checkpoint, tmp_path) / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing h\.1\.mlp\.c_fc\.bias"):
        load_checkpoint(str(tmp_path))


def test_shape_mismatch_is_named(tiny_checkpoint: Path, tiny_checkpoint_b: Path, tmp_path: Path) -> None:
    _copy_config(tiny_checkpoint, tmp_path)  # says width 64 ...
    shutil.copy(tiny_checkpoint_b / "model.safetensors", tmp_path)  # ... weights are width 32
    with pytest.raises(ModelLoadError, match=r"wte\.weight has shape \(50257, 32\), expected \(50257, 64\)"):
        load_checkpoint(str(tmp_path))


def test_directory_problems(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(ModelLoadError, match="holds no weights"):
        load_checkpoint(str(_copy_config(tiny_checkpoint, tmp_path / "no_weights")))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="is a file"):
        load_checkpoint(str(tiny_checkpoint / "config.json"))
    bad = _copy_config(tiny_checkpoint, tmp_path / "corrupt")
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not read"):
        load_checkpoint(str(bad))


def test_unsupported_config_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    shutil.copy(tiny_checkpoint / "model.safetensors", tmp_path)
    with pytest.raises(ModelLoadError, match="scale_attn_by_inverse_layer_idx"):
        load_checkpoint(str(tmp_path))


def test_missing_tokenizer_falls_back_to_bundled(
    checkpoint_factory, caplog: pytest.LogCaptureFixture
) -> None:
    path = checkpoint_factory(n_layer=1, tokenizer=False)
    with caplog.at_level(logging.WARNING, logger="gpt2serve.engine.loader"):
        loaded = load_checkpoint(str(path))
    assert "bundled" in caplog.text
    assert loaded.tokenizer.encode("Hello world") == [15496, 995]


# -- random:<size> -----------------------------------------------------------------------------------


def test_random_model_shapes() -> None:
    loaded = load_checkpoint("random:distilgpt2", torch.float16)
    assert loaded.is_random and loaded.name == "random:distilgpt2"
    assert loaded.config == KNOWN_SHAPES["distilgpt2"]
    shapes = {k: tuple(v.shape) for k, v in loaded.state_dict.items()}
    assert shapes == expected_shapes(KNOWN_SHAPES["distilgpt2"])
    assert shapes["h.5.attn.c_attn.weight"] == (768, 2304)
    assert all(t.dtype == torch.float16 for t in loaded.state_dict.values())
    sd = loaded.state_dict
    assert torch.all(sd["h.0.ln_1.weight"] == 1) and torch.all(sd["ln_f.bias"] == 0)
    assert torch.all(sd["h.3.mlp.c_fc.bias"] == 0)
    assert abs(sd["wte.weight"].float().std().item() - 0.02) < 1e-3
    assert loaded.tokenizer.encode("Hello world") == [15496, 995]


def test_random_weights_are_deterministic_and_dtype_independent() -> None:
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=1000)
    a = random_state_dict(config, torch.float32, seed=0)
    b = random_state_dict(config, torch.float32, seed=0)
    half = random_state_dict(config, torch.float16, seed=0)
    other = random_state_dict(config, torch.float32, seed=1)
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert torch.equal(a[name].half(), half[name]), name
    assert not torch.equal(a["wte.weight"], other["wte.weight"])
    assert not torch.equal(a["h.0.attn.c_attn.weight"], a["h.1.attn.c_attn.weight"])


def test_random_weights_load_into_hf_model() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64))
    state = {f"transformer.{k}": v for k, v in random_state_dict(config).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith("attn.bias") for k in missing)


def test_unknown_random_size_lists_sizes() -> None:
    with pytest.raises(ModelLoadError, match="gpt2-medium") as info:
        load_checkpoint("random:gpt5")
    assert "'gpt5'" in str(info.value)


# -- the Hugging Face hub (only 127.0.0.1 is ever contacted) ---------------------------------------------


def _load_in_subprocess(spec: str, hf_home: Path, endpoint: str) -> str:
    code = (
        "import sys\nfrom gpt2serve.engine.loader import load_checkpoint\n"
        "try:\n    m = load_checkpoint(sys.argv[1])\n    print('LOADED', m.config.n_layer, m.source)\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(hf_home), "HF_ENDPOINT": endpoint, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code, spec], env=env, capture_output=True, text=True, timeout=HUB_TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_unreachable_gives_clear_error(tmp_path: Path) -> None:
    out = _load_in_subprocess("gpt2-xl", tmp_path, f"http://127.0.0.1:{_closed_port()}")
    assert out.startswith("ModelLoadError")
    assert "'gpt2-xl'" in out and "not in the local Hugging Face cache" in out
    assert "random:gpt2-xl" in out and "local checkpoint directory" in out


@pytest.mark.slow
def test_hub_that_never_answers_times_out(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        out = _load_in_subprocess("someone/my-gpt2", tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}")
    assert out.startswith("ModelLoadError") and "hub could not be reached" in out
    assert "random:<size>" in out


def test_hub_id_found_in_local_cache(tiny_checkpoint: Path, tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    out = _load_in_subprocess("tiny/gpt2", tmp_path, f"http://127.0.0.1:{_closed_port()}")
    assert out == f"LOADED 2 {repo / 'snapshots' / commit}"
