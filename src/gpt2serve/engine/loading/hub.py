"""A Hugging Face hub model id: its snapshot from the local Hugging Face cache, else downloaded (config,
tokenizer files and weights only), failing within seconds with a clear message where the hub cannot be
reached (no machine here reaches it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from gpt2serve.engine.config import KNOWN_SHAPES
from gpt2serve.engine.errors import ModelLoadError
from gpt2serve.engine.loading.checkpoint_dir import BIN_INDEX, SAFE_INDEX, weight_files

log = logging.getLogger(__name__)

HUB_TIMEOUT_S = 5.0  # per request to the hub: an unreachable hub fails within seconds
_HUB_FILES = ("config.json", "tokenizer.json", "vocab.json", "merges.txt")


def hub_snapshot(model_id: str) -> Path:
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
    return folder if weight_files(folder) else None


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
        ("model.safetensors", SAFE_INDEX, "model-"),
        ("pytorch_model.bin", BIN_INDEX, "pytorch_model-"),
    ):
        if single in names:
            return [single]
        if index in names:
            return [index] + sorted(n for n in names if n.startswith(shard_prefix) and "/" not in n)
    return []
