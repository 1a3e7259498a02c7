"""EngineConfig: the one place a weight format is resolved for a device."""

from __future__ import annotations

import pytest

from gpt2serve.engine.config import EngineConfig, resolve_dtype


def test_resolve_dtype() -> None:
    assert resolve_dtype(None, "cpu") == "float32"
    assert resolve_dtype(None, "cuda:0") == "float16"
    assert resolve_dtype("auto", "cuda") == "float16"
    assert resolve_dtype("bf16", "cpu") == "bfloat16"
    assert resolve_dtype("float16", "cpu") == "float16"
    assert resolve_dtype("int8", "cpu") == "int8"
    assert resolve_dtype("torch.float32", "cuda") == "float32"
    with pytest.raises(ValueError, match="float32"):
        resolve_dtype("int4", "cpu")


def test_a_dtype_no_device_takes_is_refused_before_loading() -> None:
    with pytest.raises(ValueError, match="int4"):
        EngineConfig(dtype="int4")


def test_the_server_settings_build_the_engine_config_with_its_defaults(monkeypatch) -> None:
    from gpt2serve.settings import Settings

    monkeypatch.delenv("SAGEMAKER_BATCH", raising=False)
    assert Settings(model="random:gpt2").engine_config() == EngineConfig()
    given = Settings(model="random:gpt2", max_batch_size=3, dtype="int8", device="cpu").engine_config()
    assert (given.max_batch_size, given.dtype, given.device) == (3, "int8", "cpu")


def test_the_decode_step_is_static_on_cuda_unless_asked_otherwise() -> None:
    import torch

    from gpt2serve.engine.step_path import uses_static_step
    from gpt2serve.settings import Settings

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not uses_static_step(EngineConfig(), cpu) and uses_static_step(EngineConfig(), cuda)
    assert uses_static_step(EngineConfig(decode_step="static"), cpu)
    assert not uses_static_step(EngineConfig(decode_step="eager"), cuda)
    with pytest.raises(ValueError, match="decode_step must be auto, eager, static; got 'graph'"):
        EngineConfig(decode_step="graph")
    assert Settings(model="random:gpt2", decode_step="static").engine_config().decode_step == "static"
