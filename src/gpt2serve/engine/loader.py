"""Load GPT-2 weights: a Hugging Face checkpoint directory, a hub model id, or `random:<size>`.

Every source yields a `LoadedModel` whose state dict uses Hugging Face GPT-2 names without the
`transformer.` prefix (`wte.weight`, `h.0.attn.c_attn.weight` in Conv1D (in, out) layout, ...). The
output head is tied to `wte`, so `lm_head.weight` and the `attn.bias` / `attn.masked_bias` buffers are
dropped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2serve.engine.config import KNOWN_SHAPES, ModelConfig
from gpt2serve.engine.errors import ModelLoadError
from gpt2serve.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
RANDOM_SEED = 0
INIT_STD = 0.02
HUB_TIMEOUT_S = 5.0  # per request to the hub: an unreachable hub fails within seconds
_RANDOM_CHUNK = 1 << 22  # elements generated (in float32) per step of a random tensor
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}  # fmt: skip
_HUB_FILES = ("config.json", "tokenizer.json", "vocab.json", "merges.txt")
_SAFE_INDEX, _BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
_WEIGHT_FILES = ("model.safetensors", _SAFE_INDEX, "pytorch_model.bin", _BIN_INDEX)


@dataclass
class LoadedModel:
    """Weights, shape and tokenizer of one model, ready for the engine."""

    name: str
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    is_random: bool
    source: str = ""  # where the weights came from (a directory, or "random")

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.state_dict.values())


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """`None`/"auto": float32 on CPU, float16 on CUDA; else float32, float16 or bfloat16 (fp32, bf16 ...)."""
    if name is None or name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    dtype = _DTYPES.get(name.lower().removeprefix("torch."))
    if dtype is None:
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16; got {name!r}")
    return dtype


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 of this shape needs, in a fixed order, with its shape."""
    e, inner = config.n_embd, 4 * config.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, e),
        "wpe.weight": (config.n_positions, e),
    }
    for i in range(config.n_layer):
        p = f"h.{i}."
        layer = {
            "ln_1.weight": (e,), "ln_1.bias": (e,),
            "attn.c_attn.weight": (e, 3 * e), "attn.c_attn.bias": (3 * e,),
            "attn.c_proj.weight": (e, e), "attn.c_proj.bias": (e,),
            "ln_2.weight": (e,), "ln_2.bias": (e,),
            "mlp.c_fc.weight": (e, inner), "mlp.c_fc.bias": (inner,),
            "mlp.c_proj.weight": (inner, e), "mlp.c_proj.bias": (e,),
        }  # fmt: skip
        shapes.update({p + k: v for k, v in layer.items()})
    shapes["ln_f.weight"] = (e,)
    shapes["ln_f.bias"] = (e,)
    return shapes


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
            loaded = _load_dir(_hub_snapshot(spec), spec, dtype)
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


# -- checkpoint directories ------------------------------------------------------------------------


def _load_dir(path: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    config = _read_config(path)
    state = _read_weights(path, dtype)
    _check_state(state, config, path)
    tokenizer = Tokenizer.from_dir(path)
    if tokenizer is None:
        log.warning("%s has no tokenizer.json or vocab.json + merges.txt; using the bundled tokenizer", path)
        tokenizer = Tokenizer.bundled()
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model in {path} has {config.vocab_size}"
        )
    return LoadedModel(name, config, state, tokenizer, is_random=False, source=str(path))


def _read_config(path: Path) -> ModelConfig:
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


def _weight_files(path: Path) -> list[Path]:
    """The files that hold the weights, first matching format wins; [] when none."""
    for name in _WEIGHT_FILES:
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


def _read_weights(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    files = _weight_files(path)
    if not files:
        raise ModelLoadError(f"{path} holds no weights: looked for {', '.join(_WEIGHT_FILES)}")
    state: dict[str, torch.Tensor] = {}
    head: torch.Tensor | None = None
    for file in files:
        if not file.is_file():
            raise ModelLoadError(f"weight shard {file} is missing")
        reader = _read_safetensors if file.suffix == ".safetensors" else _read_pickle
        for key, tensor in reader(file):
            name = key.removeprefix("transformer.")
            if name == "lm_head.weight":
                head = tensor
            elif not name.endswith((".attn.bias", ".attn.masked_bias")):
                state[name] = _convert(tensor, dtype)
    wte = state.get("wte.weight")
    if head is not None and wte is not None and not _same(head, wte):
        log.warning("%s: lm_head.weight differs from wte.weight; gpt2serve ties the head to wte", path)
    return state


def _read_safetensors(file: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in list(f.keys()):
                yield key, f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for bad headers / truncation
        raise ModelLoadError(f"could not read {file}: {e}") from None


def _read_pickle(file: Path):
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = [line.strip() for line in str(e).splitlines() if "Unsupported" in line]
        reason = (found[0] if found else "torch.load(weights_only=True) failed")[:300]
        raise ModelLoadError(
            f"refusing to load {file}: it is an unsafe pickle (it holds Python objects other than tensors, "
            f"which could run code when unpickled). Convert it to safetensors. ({reason})"
        ) from None
    except Exception as e:
        raise ModelLoadError(f"could not read {file}: {e}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    yield from obj.items()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.to(b.dtype), b)


def _convert(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def _check_state(state: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> None:
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in state]
    wrong = [
        f"{k} has shape {tuple(state[k].shape)}, expected {shape}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != shape
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


# -- the Hugging Face hub ---------------------------------------------------------------------------


def _hub_snapshot(model_id: str) -> Path:
    """A local folder with `model_id`'s config, weights and tokenizer: from the cache, else downloaded."""
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model_id)
    except HFValidationError:
        raise ModelLoadError(
            f"{model_id!r} is neither a checkpoint directory, nor random:<size>, nor a Hugging Face model id"
        ) from None
    cached = _cached_snapshot(model_id)
    if cached is not None:
        log.info("using %s from the local Hugging Face cache (%s)", model_id, cached)
        return cached
    log.info("%s is not in the local Hugging Face cache; downloading it", model_id)
    try:
        return _download(model_id)
    except ModelLoadError:
        raise
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"model {model_id!r} was not found on the Hugging Face hub (or it is private). "
            f"Pass a local checkpoint directory, or {_random_hint(model_id)}."
        ) from None
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".strip().splitlines()[0][:200]
        raise ModelLoadError(
            f"model {model_id!r} is not in the local Hugging Face cache and the hub could not be reached "
            f"({reason}). Pass a local checkpoint directory, or {_random_hint(model_id)}."
        ) from None


def _random_hint(model_id: str) -> str:
    size = model_id.rsplit("/", 1)[-1]
    if size in KNOWN_SHAPES:
        return f"random:{size} for dummy weights of the same shape"
    return f"random:<size> for dummy weights ({', '.join(KNOWN_SHAPES)})"


def _cached_snapshot(model_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(model_id, "config.json")
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    return folder if _weight_files(folder) else None


def _download(model_id: str) -> Path:
    from huggingface_hub import HfApi, constants, hf_hub_download

    # No telemetry: it would also cost an extra hub request (with its own timeout) before the first one.
    constants.HF_HUB_DISABLE_TELEMETRY = True
    info = HfApi().model_info(model_id, timeout=HUB_TIMEOUT_S)
    names = {s.rfilename for s in info.siblings or ()}
    weights = _hub_weight_names(names)
    if "config.json" not in names or not weights:
        raise ModelLoadError(
            f"hub model {model_id!r} has no config.json or no weights in safetensors / pytorch_model.bin form"
        )
    files = [n for n in _HUB_FILES if n in names] + weights
    paths = [hf_hub_download(model_id, name, etag_timeout=HUB_TIMEOUT_S) for name in files]
    return Path(paths[0]).parent


def _hub_weight_names(names: set[str]) -> list[str]:
    for single, index, shard_prefix in (
        ("model.safetensors", _SAFE_INDEX, "model-"),
        ("pytorch_model.bin", _BIN_INDEX, "pytorch_model-"),
    ):
        if single in names:
            return [single]
        if index in names:
            return [index] + sorted(n for n in names if n.startswith(shard_prefix) and "/" not in n)
    return []


# -- random:<size> ----------------------------------------------------------------------------------


def _load_random(size: str, dtype: torch.dtype) -> LoadedModel:
    config = KNOWN_SHAPES.get(size)
    if config is None:
        raise ModelLoadError(
            f"unknown random model size {size!r}; choose one of {', '.join(KNOWN_SHAPES)} (e.g. random:gpt2)"
        )
    state = random_state_dict(config, dtype, seed=RANDOM_SEED)
    name = f"{RANDOM_PREFIX}{size}"
    return LoadedModel(name, config, state, Tokenizer.bundled(), is_random=True, source="random")


def random_state_dict(config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """GPT-2-initialised weights of `config`'s shape, deterministic for a seed, built directly in `dtype`.

    Weights ~ N(0, 0.02) (residual projections scaled by 1/sqrt(2 n_layer), as GPT-2 does); LayerNorm weights
    1, biases 0. Values are drawn in float32 chunk by chunk, so every dtype holds the same numbers rounded.
    """
    state = {name: torch.empty(shape, dtype=dtype) for name, shape in expected_shapes(config).items()}
    resid_std = INIT_STD / math.sqrt(2 * config.n_layer)

    def fill(item: tuple[int, tuple[str, torch.Tensor]]) -> None:
        index, (name, tensor) = item
        if name.endswith(".bias"):
            tensor.zero_()
        elif name.startswith("ln_f.") or ".ln_" in name:
            tensor.fill_(1.0)
        else:
            std = resid_std if name.endswith("c_proj.weight") else INIT_STD
            _fill_normal(tensor.view(-1), std, torch.Generator().manual_seed(seed * 1_000_003 + index))

    with ThreadPoolExecutor(max_workers=max(1, min(8, torch.get_num_threads()))) as pool:
        list(pool.map(fill, enumerate(state.items())))
    return state


def _fill_normal(flat: torch.Tensor, std: float, generator: torch.Generator) -> None:
    buffer = torch.empty(min(_RANDOM_CHUNK, flat.numel()), dtype=torch.float32)
    for lo in range(0, flat.numel(), _RANDOM_CHUNK):
        chunk = buffer[: min(_RANDOM_CHUNK, flat.numel() - lo)]
        chunk.normal_(0.0, std, generator=generator)
        flat[lo : lo + chunk.numel()].copy_(chunk)
