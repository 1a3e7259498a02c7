"""Model shape (from a checkpoint's config.json) and the engine's configuration.

`EngineConfig` is the one definition of the engine's knobs and their defaults: the server's `Settings`
declares a flag for each and builds it with `Settings.engine_config()`. `resolve_dtype` is the one place
a weight format is chosen for a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a GPT-2 model, as in a Hugging Face `config.json`."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        e, layers = self.n_embd, self.n_layer
        per_layer = 12 * e * e + 13 * e
        return self.vocab_size * e + self.n_positions * e + layers * per_layer + 2 * e

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config.json has model_type {model_type!r}; gpt2serve serves GPT-2 models only")
        activation = d.get("activation_function", "gelu_new")
        if activation not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function {activation!r} is not supported (GPT-2 uses gelu_new)")
        eos = d.get("eos_token_id", 50256)
        return cls(
            n_layer=d.get("n_layer", 12),
            n_head=d.get("n_head", 12),
            n_embd=d.get("n_embd", 768),
            n_positions=d.get("n_positions", d.get("n_ctx", 1024)),
            vocab_size=d.get("vocab_size", 50257),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            bos_token_id=d.get("bos_token_id", 50256),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )


# The shapes of the released GPT-2 checkpoints, for `random:<size>` models.
KNOWN_SHAPES: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": ModelConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": ModelConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": ModelConfig(n_layer=48, n_head=25, n_embd=1600),
    "distilgpt2": ModelConfig(n_layer=6, n_head=12, n_embd=768),
}


# The decode step: the model's own (GPT2.step) or the static-shape one of engine/device/ (CUDA graphs on
# CUDA, eager on the CPU).
DECODE_STEPS = ("auto", "eager", "static")

WEIGHT_FORMATS = ("float32", "bfloat16", "float16", "int8")
_FORMAT_ALIASES = {
    "fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
}  # fmt: skip


def resolve_dtype(name: str | None, device: str) -> str:
    """The weight format for `name` on `device` ("cpu", "cuda", "cuda:1" ...): None or "auto" is
    float16 on CUDA and float32 elsewhere; aliases (fp32, bf16, half, torch.float16 ...) are accepted."""
    if name is None or name == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    key = name.lower().removeprefix("torch.")
    fmt = _FORMAT_ALIASES.get(key, key)
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"dtype must be auto, {', '.join(WEIGHT_FORMATS)}; got {name!r}")
    return fmt


@dataclass(frozen=True)
class EngineConfig:
    """The batching engine's knobs. `None` fields are sized from the model when the engine starts."""

    max_batch_size: int = 32  # KV slots: sequences decoded together in one step
    kv_cache_gb: float = 8.0  # fewer slots than max_batch_size where full-context slots would not fit
    max_queue: int = 256  # requests waiting for slots; past this, callers get "busy" at once
    max_total_tokens: int | None = None  # prompt + new tokens reserved over running sequences
    request_timeout_s: float | None = 50.0
    device: str = "auto"  # auto (CUDA where torch has it, else CPU) | cpu | cuda | cuda:<n>
    dtype: str | None = "auto"  # float32 | bfloat16 | float16 | int8; auto or None: see resolve_dtype
    threads: int | None = None  # torch intra-op threads; None: torch's default
    engine_nice: int = 10  # the engine thread's CPU priority below the HTTP front's (Linux nice steps)
    cpu_kernels: str = "auto"  # auto | gemv | torch: see gpt2serve.engine.linear.use_gemv
    max_prompt_tokens: int | None = None  # None: the model's context - 1
    max_request_share: float = 0.5  # of the KV slots, what one request's sequences may hold
    max_stop_length: int = 256  # characters in one stop string
    decode_step: str = "auto"  # auto (static on CUDA, else eager) | eager | static: see engine/device/

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if not 0 <= self.engine_nice <= 19:
            raise ValueError(f"engine_nice must be in [0, 19], got {self.engine_nice}")
        if not 0 < self.max_request_share <= 1:
            raise ValueError(f"max_request_share must be in (0, 1], got {self.max_request_share}")
        if self.decode_step not in DECODE_STEPS:
            raise ValueError(f"decode_step must be {', '.join(DECODE_STEPS)}; got {self.decode_step!r}")
        resolve_dtype(self.dtype, "cpu")  # a dtype no device takes is refused here, before loading
