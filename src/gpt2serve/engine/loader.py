"""Load GPT-2 weights: a Hugging Face checkpoint directory, a hub model id, or `random:<size>`.

Every source yields a `LoadedModel` whose state dict uses Hugging Face GPT-2 names without the
`transformer.` prefix (`wte.weight`, `h.0.attn.c_attn.weight` in Conv1D (in, out) layout, ...). The
output head is tied to `wte`, so `lm_head.weight` and the `attn.bias` / `attn.masked_bias` buffers are
dropped.

The state dict is lazy (`LazyStateDict`): shapes come from file headers (or the model's shape for random
weights) and each tensor is read, or generated, and converted only when it is first accessed. The engine
pops the tensors one by one as it packs them, so loading holds the packed weights plus the few source
tensors being read (`PREFETCH` ahead) and packed.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
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
PREFETCH = 3  # tensors read ahead while the model packs the previous ones
_HUB_FILES = ("config.json", "tokenizer.json", "vocab.json", "merges.txt")
_SAFE_INDEX, _BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
_WEIGHT_FILES = ("model.safetensors", _SAFE_INDEX, "pytorch_model.bin", _BIN_INDEX)


class LazyStateDict(MutableMapping[str, torch.Tensor]):
    """A state dict whose tensors are produced only when first accessed; their shapes are known up front.

    Each entry is a shape and a function that returns the tensor. An accessed tensor is kept until it is
    removed, as in a dict; `pop` hands it over without keeping it. `shape()` and `numel()` read nothing.
    With `prefetch`, a background thread reads that many of the first unread entries ahead of time (a
    consumer that takes the tensors about in order then waits less), holding them until they are accessed.
    """

    def __init__(self, prefetch: int = 0) -> None:
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._read: dict[str, Callable[[], torch.Tensor]] = {}  # not started
        self._pending: dict[str, Future[torch.Tensor]] = {}  # being read ahead
        self._held: dict[str, torch.Tensor] = {}
        self._prefetch = prefetch
        self._pool: ThreadPoolExecutor | None = None

    def add(self, name: str, shape: tuple[int, ...], read: Callable[[], torch.Tensor]) -> None:
        self._forget(name)
        self._shapes[name], self._read[name] = tuple(shape), read

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self._shapes.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._held.get(name)
        if tensor is None:
            future = self._pending.pop(name, None)
            tensor = future.result() if future is not None else self._read.pop(name)()
            self._held[name] = tensor
            self._read_ahead()
        return tensor

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self._forget(name)
        self._shapes[name], self._held[name] = tuple(tensor.shape), tensor

    def __delitem__(self, name: str) -> None:
        del self._shapes[name]
        self._forget(name)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __repr__(self) -> str:
        return f"LazyStateDict({len(self)} tensors, {len(self._held)} read)"

    def _forget(self, name: str) -> None:
        self._read.pop(name, None)
        self._held.pop(name, None)
        future = self._pending.pop(name, None)
        if future is not None:
            future.cancel()

    def _read_ahead(self) -> None:
        if not self._prefetch:
            return
        for name in list(self._read)[: self._prefetch - len(self._pending)]:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt2serve-read")
            self._pending[name] = self._pool.submit(self._read.pop(name))
        if self._pool is not None and not self._read and not self._pending:
            self._pool.shutdown(wait=False)  # everything read: the thread exits
            self._pool = None


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


def _read_weights(path: Path, dtype: torch.dtype) -> LazyStateDict:
    """The checkpoint's tensors as a LazyStateDict: only headers are read here."""
    files = _weight_files(path)
    if not files:
        raise ModelLoadError(f"{path} holds no weights: looked for {', '.join(_WEIGHT_FILES)}")
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


def _check_state(state: LazyStateDict, config: ModelConfig, path: Path) -> None:
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
    state = lazy_random_state_dict(config, dtype, seed=RANDOM_SEED)
    name = f"{RANDOM_PREFIX}{size}"
    return LoadedModel(name, config, state, Tokenizer.bundled(), is_random=True, source="random")


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


# -- memory while loading --------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
LOAD_MMAP_THRESHOLD = 1 << 20
SERVE_MMAP_THRESHOLD = 32 << 20  # the ceiling of glibc's own adjustment of the threshold (64-bit)


@contextmanager
def returning_freed_memory() -> Iterator[None]:
    """Let memory freed while loading go back to the OS (glibc; elsewhere this does nothing).

    glibc gives blocks above its mmap threshold their own mappings, unmapped when freed, but it raises
    the threshold (up to 32 MB) whenever such a block is freed: the tensor-sized blocks that packing then
    allocates and frees land on the heap, and stay resident once freed. While loading, the threshold is
    held at 1 MB; afterwards it is set where glibc's adjustment would have taken it, and the heap trimmed.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, LOAD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, SERVE_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * SERVE_MMAP_THRESHOLD)
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols of the running process, its C library included
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim") else None
