"""The engine on a GPU against transformers' generate(), in one run: decode speed, throughput, readiness.

For each model size (random weights: speed does not depend on their values; each engine draws its own),
transformers first (`GPT2LMHeadModel`, float16 on CUDA, `generate` with an attention mask), then
gpt2serve's engine (`Engine`, the static decode step with a CUDA graph per bucket, tokens chosen on the
device), each freed before the next:
  - ready_s: from building the model to the first token served (gpt2serve: loading, the KV cache, every
    CUDA graph captured up front, then a 1-token request); ttft_s: a 1-token request on the idle engine;
  - greedy_ms_per_step: one greedy sequence, (time of 128 new tokens - time of 16) / 112, median;
  - seed_default_s: the seed API's default request (top-k 50, top-p 0.92, 3 sequences, max_length 100);
  - streams: N sampled streams (top-p 0.9) of 100 new tokens each, all submitted at once: generated
    tokens/s = N * 100 / wall time (transformers: one batch of N);
  - peak_gpu_GB: torch.cuda.max_memory_allocated over that engine's runs.
End of text never ends a sequence early (min_new_tokens / stop_at_eos=False), so both make as many tokens.
The KV cache gets what the GPU has free (`--kv-cache-gb auto`); where fewer slots than N fit, the rest
queue, and "slots" says so.

    PYTHONPATH=src python3 benchmarks/bench_gpu.py [--device cuda] [--sizes gpt2,gpt2-xl]
        [--streams 16,64,256] [--reps 3] [--kv-cache-gb auto] [--decode-step static|eager]
        [--engines transformers,gpt2serve] [--out NAME|FILE.json|-]

`--device cpu --sizes tiny --streams 4` checks the script on a CPU (not a GPU figure). Imports torch,
tokenizers, safetensors, transformers and gpt2serve's engine only (not its HTTP layer).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _results import add_out_argument, command_line, record, save  # noqa: E402

from gpt2serve.engine.config import KNOWN_SHAPES, EngineConfig, ModelConfig  # noqa: E402
from gpt2serve.engine.engine import Engine  # noqa: E402
from gpt2serve.engine.loader import READ_DTYPES, LoadedModel  # noqa: E402
from gpt2serve.engine.loading.random_weights import lazy_random_state_dict  # noqa: E402
from gpt2serve.engine.params import SamplingParams  # noqa: E402
from gpt2serve.engine.tokenizer import Tokenizer  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy"  # 8 GPT-2 tokens
SIZES = {**KNOWN_SHAPES, "tiny": ModelConfig(n_layer=2, n_head=4, n_embd=64)}
SHORT, LONG, STREAM_TOKENS = 16, 128, 100
SEED_DEFAULT = {"do_sample": True, "top_k": 50, "top_p": 0.92, "n": 3, "max_length": 100}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_s(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()  # warm-up
    return statistics.median(timed(fn, device) for _ in range(reps))


def greedy_ms(run: Callable[[int], object], device: torch.device, reps: int) -> float:
    """ms per decode step of one greedy sequence: the difference of a long and a short request."""
    return (
        1000
        * (median_s(lambda: run(LONG), device, reps) - median_s(lambda: run(SHORT), device, reps))
        / (LONG - SHORT)
    )


def start_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


# -- transformers -----------------------------------------------------------------------------------------


def bench_transformers(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, args) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    start_peak(device)
    started = time.perf_counter()
    hf_cfg = GPT2Config(
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=cfg.n_positions
    )
    with torch.device(device):
        model = GPT2LMHeadModel._from_config(hf_cfg, torch_dtype=dtype).eval()
    bundled = Path(__file__).resolve().parents[1] / "src/gpt2serve/data/gpt2-tokenizer/tokenizer.json"
    tok = PreTrainedTokenizerFast(tokenizer_file=str(bundled))
    ids = torch.tensor([tok.encode(PROMPT)], device=device)

    def generate(batch: int, new: int | None = None, **kw) -> torch.Tensor:
        x = ids.expand(batch, -1)
        sizes = {"max_new_tokens": new, "min_new_tokens": new} if new else {}
        with torch.inference_mode():
            return model.generate(x, attention_mask=torch.ones_like(x), pad_token_id=50256, **sizes, **kw)

    generate(1, 1)
    out = {"ready_s": round(time.perf_counter() - started, 3)}
    out["ttft_s"] = median_s(lambda: generate(1, 1), device, args.reps)
    out["greedy_ms_per_step"] = greedy_ms(lambda n: generate(1, n, do_sample=False), device, args.reps)
    seed = dict(SEED_DEFAULT)
    n = seed.pop("n")
    out["seed_default_s"] = median_s(lambda: generate(1, num_return_sequences=n, **seed), device, args.reps)
    out["streams"] = {}
    for streams in args.streams:
        wall = median_s(lambda s=streams: generate(s, STREAM_TOKENS, do_sample=True, top_p=0.9), device, 1)
        out["streams"][streams] = {"tokens_per_s": round(streams * STREAM_TOKENS / wall, 1), "wall_s": wall}
    out["peak_gpu_GB"] = peak_gb(device)
    return out  # the model is freed with this frame


# -- gpt2serve --------------------------------------------------------------------------------------------


def kv_cache_gb(arg: str, cfg: ModelConfig, device: torch.device, weight_bytes: int) -> float:
    """`--kv-cache-gb`: a number, or auto: what the GPU has free less twice the weights and 6 GB."""
    if arg != "auto":
        return float(arg)
    if device.type != "cuda":
        return 2.0
    free = torch.cuda.mem_get_info(device)[0]
    return max(1.0, (free - 2 * cfg.n_params * weight_bytes - 6 * 2**30) / 2**30)


def run_all(engine: Engine, prompt: str, params: SamplingParams, count: int) -> None:
    """`count` requests submitted at once; returns when all are done (raises the first failure)."""
    done, results, lock = threading.Event(), [], threading.Lock()

    def sink(item: object) -> None:
        with lock:
            results.append(item)
            if len(results) == count:
                done.set()

    for _ in range(count):
        engine.submit(prompt, params, sink, stream=False)
    done.wait()
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise failed[0]


def bench_gpt2serve(cfg: ModelConfig, size: str, device: torch.device, fmt: str, args) -> dict:
    start_peak(device)
    started = time.perf_counter()
    loaded = LoadedModel(size, cfg, lazy_random_state_dict(cfg, READ_DTYPES[fmt]), Tokenizer.bundled(), True)
    gb = kv_cache_gb(args.kv_cache_gb, cfg, device, torch.finfo(READ_DTYPES[fmt]).bits // 8)
    config = EngineConfig(
        device=str(device), dtype=fmt, max_batch_size=max(args.streams), kv_cache_gb=gb, max_queue=1024,
        request_timeout_s=None, max_request_share=1.0, decode_step=args.decode_step,
    )  # fmt: skip
    engine = Engine(loaded, config)
    engine.start()
    out: dict = {"slots": engine.scheduler.n_slots, "kv_cache_GB": round(engine.cache.nbytes / 2**30, 2)}
    runner = engine.path.static.runner if engine.path.static is not None else None
    out["capture_s"] = runner.capture_all() if hasattr(runner, "capture_all") else None
    greedy = lambda n: SamplingParams(max_new_tokens=n, stop_at_eos=False)  # noqa: E731
    engine.generate_sync(PROMPT, greedy(1))
    out["ready_s"] = round(time.perf_counter() - started, 3)
    out["ttft_s"] = median_s(lambda: engine.generate_sync(PROMPT, greedy(1)), device, args.reps)
    out["greedy_ms_per_step"] = greedy_ms(
        lambda n: engine.generate_sync(PROMPT, greedy(n)), device, args.reps
    )
    seed = SamplingParams(stop_at_eos=False, **SEED_DEFAULT)
    out["seed_default_s"] = median_s(lambda: engine.generate_sync(PROMPT, seed), device, args.reps)
    out["streams"] = {}
    sampled = SamplingParams(do_sample=True, top_p=0.9, max_new_tokens=STREAM_TOKENS, stop_at_eos=False)
    for streams in args.streams:
        wall = median_s(lambda s=streams: run_all(engine, PROMPT, sampled, s), device, 1)
        out["streams"][streams] = {"tokens_per_s": round(streams * STREAM_TOKENS / wall, 1), "wall_s": wall}
    out["peak_gpu_GB"] = peak_gb(device)
    out["steps"], out["max_step_batch"] = engine.stats.steps, engine.stats.max_step_batch
    engine.stop()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", default="gpt2,gpt2-xl", help=f"comma-separated: {', '.join(SIZES)}")
    p.add_argument("--streams", default="16,64,256", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dtype", default="auto", help="auto: float16 on CUDA, float32 on the CPU")
    p.add_argument("--kv-cache-gb", default="auto")
    p.add_argument("--decode-step", default="static", choices=["static", "eager"])
    p.add_argument("--engines", default="transformers,gpt2serve")
    add_out_argument(p, "bench_gpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    fmt = args.dtype if args.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    results: dict = {"device": str(device), "dtype": fmt, "sizes": {}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        results["gpu"] = {"name": props.name, "memory_GB": round(props.total_memory / 2**30, 1),
                          "cuda": torch.version.cuda}  # fmt: skip
    for size in args.sizes.split(","):
        cfg, entry = SIZES[size], {}
        for name in args.engines.split(","):
            print(f"{size}: {name} ...", file=sys.stderr, flush=True)
            if name == "transformers":
                entry[name] = bench_transformers(cfg, device, getattr(torch, fmt), args)
            else:
                entry[name] = bench_gpt2serve(cfg, size, device, fmt, args)
            print(json.dumps({size: {name: entry[name]}}), file=sys.stderr, flush=True)
        results["sizes"][size] = entry
    report = record(command_line(argv), results)
    print(json.dumps(report, indent=1))
    save(report, args.out, "bench_gpu_" + results.get("gpu", {}).get("name", "cpu").replace(" ", "_"))


if __name__ == "__main__":
    main()
