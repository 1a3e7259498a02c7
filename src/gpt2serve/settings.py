"""Server settings: one definition feeding the command-line flags, the environment variables and --help.

Each field of `Settings` carries its flag, the environment variables read for it (first one set wins),
a help line and a parser. A value comes from the flag if given, else from the environment, else from
the field's default: `Settings.from_args(parser.parse_args())` after `add_arguments(parser)`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from gpt2serve.engine.config import DECODE_STEPS, WEIGHT_FORMATS, EngineConfig

MODEL_DIR_ENV = "GPT2SERVE_MODEL_DIR"
SAGEMAKER_MODEL_DIR = "/opt/ml/model"
FALLBACK_MODEL = "gpt2-xl"
DTYPES = ("auto", *WEIGHT_FORMATS)
CPU_KERNELS = ("auto", "gemv", "torch")
ENGINE = EngineConfig()  # the engine's defaults: its knobs below take theirs from here
BATCH_STRATEGIES = ("MULTI_RECORD", "SINGLE_RECORD")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def default_model(environ: Mapping[str, str] | None = None) -> str:
    """The SageMaker model directory (`GPT2SERVE_MODEL_DIR`, default /opt/ml/model) if it holds a
    config.json, else the `gpt2-xl` checkpoint from the Hugging Face Hub."""
    environ = os.environ if environ is None else environ
    model_dir = Path(environ.get(MODEL_DIR_ENV) or SAGEMAKER_MODEL_DIR)
    return str(model_dir) if (model_dir / "config.json").is_file() else FALLBACK_MODEL


def default_request_timeout(environ: Mapping[str, str] | None = None) -> float:
    """50 s, under a real-time endpoint's 60 s limit; 590 s in a batch transform job (600 s limit)."""
    environ = os.environ if environ is None else environ
    return 590.0 if environ.get("SAGEMAKER_BATCH", "").lower() == "true" else 50.0


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value

    return parse


def _device(text: str) -> str:
    value = text.strip().lower()
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise ValueError("must be auto, cpu, cuda or cuda:<index>")


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError("must be > 0")
        return value

    return parse


def _nice(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 19:
        raise ValueError("must be in [0, 19]")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError("must be in (0, 1]")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _readable_file(text: str) -> str:
    if not Path(text).is_file():
        raise ValueError("no such file")
    return text


def _batch_strategy(text: str) -> str:
    value = text.strip().upper()
    if value not in BATCH_STRATEGIES:
        raise ValueError(f"must be one of {', '.join(BATCH_STRATEGIES)}")
    return value


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise ValueError("must be true or false")
    return value in ("true", "1")


def _span(text: str) -> tuple[int, int]:
    """`MIN:MAX`, 1 <= MIN <= MAX."""
    low, sep, high = text.strip().partition(":")
    try:
        span = (int(low), int(high))
    except ValueError:
        raise ValueError("must be MIN:MAX, two integers") from None
    if not sep or not 1 <= span[0] <= span[1]:
        raise ValueError("must be MIN:MAX with 1 <= MIN <= MAX")
    return span


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be in [0, 65535]")
    return value


def _setting(
    flag: str,
    env: tuple[str, ...],
    help: str,
    parse: Callable[[str], Any],
    default: Any = None,
    computed: Callable[[Mapping[str, str] | None], Any] | None = None,
    shown: str = "",
    repeat: bool = False,
    switch: bool = False,
) -> Any:
    """A `Settings` field: `computed(environ)` gives a default that depends on the environment, and
    `shown` describes it in --help. A `repeat` flag may be given several times: `parse` returns a tuple
    (from one flag or the whole variable) and the tuples are joined. A `switch` flag may be given
    without a value (`--ray` means `--ray true`)."""
    meta = {"flag": flag, "env": env, "help": help, "parse": parse, "computed": computed, "shown": shown,
            "repeat": repeat, "switch": switch}  # fmt: skip
    if computed is not None:
        return field(default_factory=lambda: computed(None), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Settings:
    """Everything `gpt2serve serve` and the SageMaker container can be told. Every field of
    EngineConfig is here under its own name (see `engine_config`)."""

    model: str = _setting(
        "--model", ("GPT2SERVE_MODEL",),
        "model to serve: a checkpoint directory, a Hugging Face Hub id, or random:<size>", str,
        computed=default_model,
        shown=f"{SAGEMAKER_MODEL_DIR} (or ${MODEL_DIR_ENV}) if it holds config.json, else {FALLBACK_MODEL}",
    )
    dtype: str = _setting(
        "--dtype", ("GPT2SERVE_DTYPE",), "weights dtype; auto: float32 on CPU, float16 on CUDA",
        _choice(*DTYPES), default=ENGINE.dtype,
    )
    device: str = _setting(
        "--device", ("GPT2SERVE_DEVICE",), "auto (CUDA if available), cpu, cuda or cuda:<n>", _device,
        default=ENGINE.device,
    )
    host: str = _setting(
        "--host", ("GPT2SERVE_HOST",),
        "interface to listen on (the container entry point listens on 0.0.0.0)", str, default="127.0.0.1",
    )
    port: int = _setting(
        "--port", ("SAGEMAKER_BIND_TO_PORT", "GPT2SERVE_PORT"), "TCP port to listen on", _port, default=8080
    )
    max_body_mb: float = _setting(
        "--max-body-mb", ("GPT2SERVE_MAX_BODY_MB", "SAGEMAKER_MAX_PAYLOAD_IN_MB"),
        "largest request body in MB (2**20 bytes); larger bodies get 413", _positive(float), default=6.0,
    )
    shutdown_grace_s: float = _setting(
        "--shutdown-grace-s", ("GPT2SERVE_SHUTDOWN_GRACE_S",),
        "on SIGTERM, seconds in-flight requests get to finish", _positive(float), default=25.0,
    )
    header_timeout_s: float = _setting(
        "--header-timeout-s", ("GPT2SERVE_HEADER_TIMEOUT_S",),
        "seconds a request's headers may take to arrive (from its first byte, or from the connection's "
        "start); past it: 408 and the connection is closed", _positive(float), default=10.0,
    )
    body_timeout_s: float = _setting(
        "--body-timeout-s", ("GPT2SERVE_BODY_TIMEOUT_S",),
        "seconds a request's whole body may take to arrive after its headers; past it: 408 and the "
        "connection is closed", _positive(float), default=30.0,
    )
    max_connections: int = _setting(
        "--max-connections", ("GPT2SERVE_MAX_CONNECTIONS",),
        "open connections at most; one more is answered 503 and closed", _positive(int), default=512,
    )
    max_batch_size: int = _setting(
        "--max-batch-size", ("GPT2SERVE_MAX_BATCH_SIZE",),
        "sequences decoded together in one step (KV slots)", _positive(int), default=ENGINE.max_batch_size,
    )
    max_queue: int = _setting(
        "--max-queue", ("GPT2SERVE_MAX_QUEUE",),
        "requests that may wait for a slot; past this, callers get 503 at once", _non_negative_int,
        default=ENGINE.max_queue,
    )
    kv_cache_gb: float = _setting(
        "--kv-cache-gb", ("GPT2SERVE_KV_CACHE_GB",),
        "memory for the KV cache; caps the KV slots when max-batch-size full-context slots would not fit",
        _positive(float), default=ENGINE.kv_cache_gb,
    )
    max_total_tokens: int | None = _setting(
        "--max-total-tokens", ("GPT2SERVE_MAX_TOTAL_TOKENS",),
        "tokens (prompt + new) reserved over all running sequences", _positive(int),
        shown="max-batch-size x the model's context",
    )
    request_timeout_s: float = _setting(
        "--request-timeout-s", ("GPT2SERVE_REQUEST_TIMEOUT_S",),
        "a request running longer than this gets 504", _positive(float), computed=default_request_timeout,
        shown="50, or 590 in a SageMaker batch transform job (SAGEMAKER_BATCH=true)",
    )
    max_concurrent_transforms: int = _setting(
        "--max-concurrent-transforms",
        ("SAGEMAKER_MAX_CONCURRENT_TRANSFORMS", "GPT2SERVE_MAX_CONCURRENT_TRANSFORMS"),
        "MaxConcurrentTransforms advertised to batch transform (GET /execution-parameters)",
        _positive(int), default=4,
    )
    batch_strategy: str = _setting(
        "--batch-strategy", ("SAGEMAKER_BATCH_STRATEGY", "GPT2SERVE_BATCH_STRATEGY"),
        "BatchStrategy advertised to batch transform (GET /execution-parameters)", _batch_strategy,
        default="MULTI_RECORD",
    )
    batch_transform: bool = _setting(
        "--batch-transform", ("SAGEMAKER_BATCH", "GPT2SERVE_BATCH_TRANSFORM"),
        "serving a batch transform job: a JSON body of several newline-joined records is JSON Lines",
        _boolean, default=False,
    )
    threads: int | None = _setting(
        "--threads", ("GPT2SERVE_THREADS",), "CPU threads for the model's matrix products", _positive(int),
        shown="torch's default (the machine's cores)",
    )
    engine_nice: int = _setting(
        "--engine-nice", ("GPT2SERVE_ENGINE_NICE",),
        "how many nice steps (0-19) the engine's threads run below the HTTP front, so that /ping and "
        "refusals are answered at once while the model keeps every core busy; 0: the same priority",
        _nice, default=ENGINE.engine_nice,
    )
    cpu_kernels: str = _setting(
        "--cpu-kernels", ("GPT2SERVE_CPU_KERNELS",),
        "few-row matrix kernels on CPU: gemv (gpt2serve's, built with the C compiler on first use), torch "
        "(oneDNN/fbgemm), auto (gemv on CPUs without AVX-512 where a compiler is found)",
        _choice(*CPU_KERNELS), default=ENGINE.cpu_kernels,
    )
    decode_step: str = _setting(
        "--decode-step", ("GPT2SERVE_DECODE_STEP",),
        "decode steps: static (fixed shapes, CUDA graphs on CUDA, tokens chosen on the device), eager (the "
        "model's own step), auto (static on CUDA, else eager)", _choice(*DECODE_STEPS),
        default=ENGINE.decode_step,
    )
    max_prompt_tokens: int | None = _setting(
        "--max-prompt-tokens", ("GPT2SERVE_MAX_PROMPT_TOKENS",),
        "longest prompt in tokens; a longer one gets 400 (one over this many characters x 128 is refused "
        "before it is tokenized)", _positive(int), shown="the model's context - 1",
    )
    max_request_share: float = _setting(
        "--max-request-share", ("GPT2SERVE_MAX_REQUEST_SHARE",),
        "the share of the KV slots one request's sequences (beams or samples) may hold; more gets 400",
        _share, default=ENGINE.max_request_share,
    )
    max_stop_length: int = _setting(
        "--max-stop-length", ("GPT2SERVE_MAX_STOP_LENGTH",), "characters in one stop string; longer gets 400",
        _positive(int), default=ENGINE.max_stop_length,
    )
    max_lines_per_body: int = _setting(
        "--max-lines-per-body", ("GPT2SERVE_MAX_LINES_PER_BODY",),
        "requests in one JSON Lines body (which shares one deadline); more gets 400", _positive(int),
        default=1000,
    )
    max_prompts_per_request: int = _setting(
        "--max-prompts-per-request", ("GPT2SERVE_MAX_PROMPTS_PER_REQUEST",),
        "prompts in one OpenAI completion request (a `prompt` list); more gets 400", _positive(int),
        default=32,
    )
    log_level: str = _setting(
        "--log-level", ("GPT2SERVE_LOG_LEVEL",), "logging level", _choice(*LOG_LEVELS), default="info"
    )
    # -- who may call, and how much (gpt2serve.api.auth) --
    api_keys: tuple[str, ...] = _setting(
        "--api-key", ("GPT2SERVE_API_KEYS",),
        "an API key callers send as `Authorization: Bearer KEY` or `x-api-key`; repeat the flag for more "
        "(the variable takes a comma-separated list)", _list, default=(), shown="none", repeat=True,
    )
    api_keys_file: str | None = _setting(
        "--api-keys-file", ("GPT2SERVE_API_KEYS_FILE",),
        "file of API keys: one a line, `KEY [NAME] [concurrent_requests=N] [requests_per_minute=N] "
        "[tokens_per_minute=N]`", _readable_file, shown="none",
    )
    sigv4_credentials: str | None = _setting(
        "--sigv4-credentials", ("GPT2SERVE_SIGV4_CREDENTIALS",),
        "AWS shared-credentials file (~/.aws/credentials format) whose key pairs may call with SigV4 "
        "signatures (service sagemaker)", _readable_file, shown="none",
    )
    sigv4_region: str | None = _setting(
        "--sigv4-region", ("GPT2SERVE_SIGV4_REGION",), "the region SigV4 signatures must be scoped to",
        str, shown="any region",
    )
    key_concurrent_requests: int | None = _setting(
        "--key-concurrent-requests", ("GPT2SERVE_KEY_CONCURRENT_REQUESTS",),
        "requests one key may have in flight, for keys whose file entry sets none", _positive(int),
        shown="no limit",
    )
    key_requests_per_minute: int | None = _setting(
        "--key-requests-per-minute", ("GPT2SERVE_KEY_REQUESTS_PER_MINUTE",),
        "requests one key may start in any 60 s, for keys whose file entry sets none", _positive(int),
        shown="no limit",
    )
    key_tokens_per_minute: int | None = _setting(
        "--key-tokens-per-minute", ("GPT2SERVE_KEY_TOKENS_PER_MINUTE",),
        "tokens one key's requests may generate in any 60 s, for keys whose file entry sets none",
        _positive(int), shown="no limit",
    )
    cors_origins: tuple[str, ...] = _setting(
        "--cors-origins", ("GPT2SERVE_CORS_ORIGINS",),
        "comma-separated origins browsers may call from (`*`: any); CORS is off without it", _list,
        default=(), shown="none (CORS off)",
    )

    # -- past one machine: Ray Serve (gpt2serve.scale) --
    ray: bool = _setting(
        "--ray", ("GPT2SERVE_RAY",),
        "serve with Ray Serve: replicas of the engine behind Ray's HTTP proxy (pip install 'gpt2serve[ray]')",
        _boolean, default=False, switch=True,
    )
    replicas: int | None = _setting(
        "--replicas", ("GPT2SERVE_REPLICAS",), "with --ray: replicas, each with its own engine",
        _positive(int), shown="1",
    )
    autoscale: tuple[int, int] | None = _setting(
        "--autoscale", ("GPT2SERVE_AUTOSCALE",),
        "with --ray, instead of --replicas: MIN:MAX replicas, scaled on the requests they have in flight",
        _span, shown="off",
    )
    target_ongoing_requests: float | None = _setting(
        "--target-ongoing-requests", ("GPT2SERVE_TARGET_ONGOING_REQUESTS",),
        "with --autoscale: requests in flight per replica that autoscaling aims at", _positive(float),
        shown="half of max-batch-size",
    )
    ray_address: str | None = _setting(
        "--ray-address", ("GPT2SERVE_RAY_ADDRESS", "RAY_ADDRESS"),
        "with --ray: the Ray cluster to join (`auto`, or host:port of its head node)", str,
        shown="a local Ray instance started for the server",
    )

    @classmethod
    def from_args(
        cls, ns: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        """Flag > environment variable > default, for every field."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = getattr(ns, f.name, None) if ns is not None else None
            if isinstance(value, list):  # a repeated flag: one tuple per occurrence
                value = tuple(item for part in value for item in part)
            if value is None:
                value = _from_env(f.name, f.metadata, environ)
            if value is None and f.metadata["computed"] is not None:
                value = f.metadata["computed"](environ)
            if value is not None:
                values[f.name] = value
        return cls(**values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        return cls.from_args(None, environ)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    def engine_config(self) -> EngineConfig:
        """The engine's configuration: each EngineConfig field from the setting of the same name."""
        return EngineConfig(**{f.name: getattr(self, f.name) for f in fields(EngineConfig)})


def _from_env(name: str, meta: Mapping[str, Any], environ: Mapping[str, str]) -> Any:
    for var in meta["env"]:
        raw = environ.get(var)
        if raw is None or raw.strip() == "":
            continue
        try:
            return meta["parse"](raw)
        except ValueError as exc:
            raise ValueError(f"environment variable {var}={raw!r} is invalid for {name}: {exc}") from None
    return None


def _argparse_type(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: {exc}") from None

    convert.__name__ = name  # argparse names the type in some messages
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per `Settings` field; unset flags stay None so `from_args` can fall back."""
    for f in fields(Settings):
        meta = f.metadata
        default = meta["shown"] or (str(f.default) if f.default is not MISSING else "")
        env = " or ".join(f"${v}" for v in meta["env"])
        switch = {"nargs": "?", "const": "true"} if meta["switch"] else {}
        parser.add_argument(
            meta["flag"],
            dest=f.name,
            default=None,
            action="append" if meta["repeat"] else "store",
            type=_argparse_type(f.name, meta["parse"]),
            help=f"{meta['help']} (env: {env}; default: {default})",
            **switch,
        )


def settings_or_exit(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """`Settings.from_args(ns, environ)`; a bad environment variable prints one line and exits with status
    2 (as argparse does for a bad flag)."""
    try:
        return Settings.from_args(ns, environ)
    except ValueError as exc:
        print(f"gpt2serve: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
