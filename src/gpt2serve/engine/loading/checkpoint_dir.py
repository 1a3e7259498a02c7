"""A Hugging Face GPT-2 checkpoint directory: config.json and the weights (model.safetensors, sharded
model-*.safetensors, or pytorch_model.bin, read with torch.load(weights_only=True)), as a LazyStateDict
checked against the config. The output head is tied to `wte`, so `lm_head.weight` and the `attn.bias` /
`attn.masked_bias` buffers are dropped.
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from gpt2serve.engine.config import ModelConfig
from gpt2serve.engine.errors import ModelLoadError
from gpt2serve.engine.loading.lazy import PREFETCH, LazyStateDict, expected_shapes

log = logging.getLogger(__name__)

SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
WEIGHT_FILES = ("model.safetensors", SAFE_INDEX, "pytorch_model.bin", BIN_INDEX)


def read_checkpoint(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, LazyStateDict]:
    """The directory's config and its weights (read lazily, in `dtype`), checked against each other."""
    config = read_config(path)
    state = read_weights(path, dtype)
    check_state(state, config, path)
    return config, state


def read_config(path: Path) -> ModelConfig:
    file = path / "config.json"
    if not file.is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face checkpoint: it has no config.json")
    try:
        raw = json.loads(file.read_text())
        config = ModelConfig.from_dict(raw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read {file}: {e}") from None
    unsupported = []
    if raw.get("n_inner") not in (None, 4 * config.n_embd):
        unsupported.append(f"n_inner={raw['n_inner']} (only 4 * n_embd)")
    if raw.get("scale_attn_by_inverse_layer_idx"):
        unsupported.append("scale_attn_by_inverse_layer_idx=true")
    if raw.get("scale_attn_weights") is False:
        unsupported.append("scale_attn_weights=false")
    if config.n_embd % config.n_head:
        unsupported.append(f"n_embd {config.n_embd} not divisible by n_head {config.n_head}")
    if unsupported:
        raise ModelLoadError(f"{file} describes an unsupported GPT-2 variant: {', '.join(unsupported)}")
    return config


def weight_files(path: Path) -> list[Path]:
    """The files that hold the weights, first matching format wins; [] when none."""
    for name in WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if not name.endswith(".index.json"):
            return [file]
        try:
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"could not read the shard index {file}: {e!r}") from None
        if any(Path(s).name != s for s in shards):
            raise ModelLoadError(f"{file} names shard files outside its directory")
        return [path / s for s in shards]
    return []


def read_weights(path: Path, dtype: torch.dtype) -> LazyStateDict:
    """The checkpoint's tensors as a LazyStateDict: only headers are read here."""
    files = weight_files(path)
    if not files:
        raise ModelLoadError(f"{path} holds no weights: looked for {', '.join(WEIGHT_FILES)}")
    state = LazyStateDict(prefetch=PREFETCH)
    head: Callable[[], torch.Tensor] | None = None
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"weight shard {file} is missing")
        index = _index_safetensors if file.suffix == ".safetensors" else _index_pickle
        for key, shape, read in index(file, dtype):
            name = key.removeprefix("transformer.")
            if name == "lm_head.weight":
                head = read
            elif not name.endswith((".attn.bias", ".attn.masked_bias")):
                state.add(name, shape, read)
    if head is not None and "wte.weight" in state and not _same(head(), state["wte.weight"]):
        log.warning("%s: lm_head.weight differs from wte.weight; gpt2serve ties the head to wte", path)
    return state


TensorIndex = list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]  # (key, shape, read)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _index_safetensors(file: Path, dtype: torch.dtype) -> TensorIndex:
    """Readers of each tensor in `file`, converted to `dtype`. Plain file reads fill memory of the
    tensor's own, so the file's pages never count as the process's memory (as a mapping's would)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:  # validates the header
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
        raise ModelLoadError(f"could not read {file}: {e}") from None
    index: TensorIndex = []
    for key, shape in shapes.items():
        source_dtype = _SAFETENSORS_DTYPES.get(header[key]["dtype"])
        if source_dtype is None or sys.byteorder != "little":
            read = partial(_get_safetensor, file, key, dtype)
        else:
            start, end = header[key]["data_offsets"]
            read = partial(_read_file, file, 8 + size + start, end - start, source_dtype, shape, dtype)
        index.append((key, shape, read))
    return index


def _read_file(
    file: Path, offset: int, nbytes: int, stored: torch.dtype, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    data = torch.empty(nbytes, dtype=torch.uint8)
    buffer, done = memoryview(data.numpy()), 0
    try:
        with open(file, "rb", buffering=0) as f:
            f.seek(offset)
            while done < nbytes:
                n = f.readinto(buffer[done:])
                if not n:
                    raise EOFError("the file ends early")
                done += n
    except (OSError, EOFError) as e:
        raise ModelLoadError(f"could not read {file}: {e}") from None
    return _convert(data.view(stored).reshape(shape), dtype)


def _get_safetensor(file: Path, key: str, dtype: torch.dtype) -> torch.Tensor:
    from safetensors import safe_open

    # Opened per tensor: the tensor is a view of a mapping of the whole file, and the file's pages stay
    # resident while that mapping lives; per tensor, only this tensor's pages do.
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return _copy_out(f.get_tensor(key), dtype)
    except Exception as e:
        raise ModelLoadError(f"could not read {key} from {file}: {e}") from None


def _index_pickle(file: Path, dtype: torch.dtype) -> TensorIndex:
    obj = _torch_load(file)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    return [(k, tuple(t.shape), partial(_copy_out, t, dtype)) for k, t in obj.items()]


def _torch_load(file: Path) -> object:
    """torch.load(weights_only=True), memory-mapped where the file's format allows it."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # the legacy (non-zip) format cannot be mapped
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = [line.strip() for line in str(e).splitlines() if "Unsupported" in line]
        reason = (found[0] if found else "torch.load(weights_only=True) failed")[:300]
        raise ModelLoadError(
            f"refusing to load {file}: it is an unsafe pickle (it holds Python objects other than tensors, "
            f"which could run code when unpickled). Convert it to safetensors. ({reason})"
        ) from None
    except Exception as e:
        raise ModelLoadError(f"could not read {file}: {e}") from None


def _copy_out(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of a memory-mapped file in `dtype`, copied unless converting already copied it."""
    tensor = _convert(raw, dtype)
    if tensor.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
        tensor = tensor.clone()
    return tensor


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.to(b.dtype), b)


def _convert(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def check_state(state: LazyStateDict, config: ModelConfig, path: Path) -> None:
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in state]
    wrong = [
        f"{k} has shape {state.shape(k)}, expected {shape}"
        for k, shape in expected.items()
        if k in state and state.shape(k) != shape
    ]
    if missing or wrong:
        problems = [f"missing {k}" for k in missing] + wrong
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ModelLoadError(
            f"the weights in {path} do not match its config.json ({config.n_layer} layers, width "
            f"{config.n_embd}, vocabulary {config.vocab_size}): {'; '.join(problems[:8])}{more}"
        )
    unexpected = sorted(k for k in state if k not in expected)
    if unexpected:
        names = ", ".join(unexpected[:5])
        log.warning("ignoring %d unexpected tensors in %s: %s", len(unexpected), path, names)
        for k in unexpected:
            del state[k]
