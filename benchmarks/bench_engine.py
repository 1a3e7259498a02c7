"""End-to-end decode speed: gpt2serve's engine against transformers, CTranslate2, llama.cpp and the roofline.

Every engine gets the same weights (gpt2serve's `random:<size>` state dict, exported once as a Hugging Face
checkpoint that transformers loads, CTranslate2 converts and llama.cpp's convert_hf_to_gguf.py turns into
F32, BF16 and Q8_0 GGUF files for float32, bfloat16 and int8), the same 8-token prompt, the same decoding
settings with EOS disabled (so all generate the same number of tokens) and the same number of threads.
The figure of merit is ms per decode step = wall time of a whole request / new tokens per sequence (the
8-token prefill included), the median over `--reps` repetitions after a warm-up. The repetitions of the
engines held in memory together alternate, so load from other processes hits them alike: all engines
with a small model, the engines of one precision with a model over 2 GB (`--interleave`,
`--per-precision`, `--sequential` choose).

The "long_prompt" shape has a 500-token prompt and 20 new tokens: its figure, ms per new token, is mostly
the prompt's processing (no roofline applies). The roofline is the time to stream the weights read per
step (every matrix, and the output head) once from RAM at the read bandwidth that bench_roofline.py
measures: "x_roofline" against the best of the bandwidths measured before and after the run,
"x_roofline_adjacent" the median of each repetition against the bandwidth measured just before it (a
shared host's bandwidth moves from minute to minute).

    python benchmarks/bench_engine.py [--model random:gpt2] [--shapes greedy,top_p,beam,seed,long_prompt]
        [--precisions float32,bfloat16,int8] [--peers transformers,ct2,llamacpp|none] [--only-peers]
        [--reps 3] [--threads 2] [--interleave|--per-precision|--sequential] [--cold-start [--no-decode]]
        [--out NAME|FILE.json|-] [--plot [FILE.png]]

llama.cpp (`--peers llamacpp`, the `[llamacpp]` extra; see _llamacpp.py) runs only greedy one-sequence
shapes; the report's "llamacpp" block lists the others under "not_run". Each engine runs in a process of
its own (see _peers.py). `--cold-start` also times `gpt2serve serve` from launch to /ping 200 and reads
its peak RSS (_cold_start.py). Prints one JSON object (see BENCHMARKS.md)
and writes it to benchmarks/results/<machine>/engine_<model>.json (cold_<model>.json with --no-decode;
`--out`: see _results.py); its "interleaved" says which engines alternated (all, per-precision, none).
`--plot` draws it (plot_engine.py) beside the JSON, or to the PNG given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bench_roofline  # noqa: E402
from _cold_start import cold_start_report  # noqa: E402
from _llamacpp import NOT_RUN, convert_gguf, runs_shape, tensor_types  # noqa: E402
from _peers import SHAPES, RemoteRunner, Shape, convert_ct2, export_hf, free  # noqa: E402
from _results import add_out_argument, command_line, model_slug, record, save  # noqa: E402
from bench_roofline import measure_read_bandwidth  # noqa: E402

from gpt2serve.engine.config import KNOWN_SHAPES, ModelConfig  # noqa: E402
from gpt2serve.engine.model import kernel_family, layer_format  # noqa: E402
from gpt2serve.engine.tokenizer import Tokenizer  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy"  # 8 GPT-2 tokens
FILLER = " dog, and the dog, who had seen foxes before, did not move; it only watched the field."
PRECISIONS = ("float32", "bfloat16", "int8")
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
WARMUP_TOKENS = 8
BIG_MODEL_BYTES = 2e9  # fp32 weights above this: the engines of one precision in memory at a time


# -- the model and its roofline --------------------------------------------------------------------------


def model_config(spec: str) -> ModelConfig:
    if spec.startswith("random:"):
        return KNOWN_SHAPES[spec.removeprefix("random:")]
    return ModelConfig.from_dict(json.loads((Path(spec) / "config.json").read_text()))


def streamed_bytes(cfg: ModelConfig, precision: str) -> int:
    """Weight bytes one decode step reads: the 4 matrices of every layer and the (tied) output head, each
    in the format the engine stores it in on this machine (int8 keeps some matrices in bfloat16)."""
    e = cfg.n_embd
    family = kernel_family("auto", cfg, torch.device("cpu"))
    sizes = {"attn.c_attn": 3 * e * e, "attn.c_proj": e * e, "mlp.c_fc": 4 * e * e, "mlp.c_proj": 4 * e * e}
    layers = sum(n * BYTES[layer_format(precision, name, family)] for name, n in sizes.items())
    return cfg.n_layer * layers + cfg.vocab_size * e * BYTES[layer_format(precision, "lm_head", family)]


# -- peers' checkpoints ----------------------------------------------------------------------------------


def peer_dirs(spec: str, peers: list[str], precisions: list[str], cache: Path) -> dict[str, Path]:
    """Export the weights for transformers and convert them for CTranslate2 and llama.cpp (reused when
    already there; an export from before its config named `n_ctx` is written again)."""
    from gpt2serve.engine.loader import load_checkpoint

    root = cache / spec.replace(":", "_").replace("/", "_")
    hf = root / "hf"
    current = (hf / "DONE").is_file() and "n_ctx" in json.loads((hf / "config.json").read_text())
    if not current and not Path(spec).is_dir():
        loaded = load_checkpoint(spec)
        export_hf(loaded, hf)
        del loaded
        free()
    hf = Path(spec) if Path(spec).is_dir() else hf
    dirs = {"hf": hf}
    if "ct2" in peers:
        import ctranslate2

        for p in set(precisions) & ctranslate2.get_supported_compute_types("cpu"):
            dirs[f"ct2-{p}"] = convert_ct2(hf, root / f"ct2-{p}", p)
            free()
    if "llamacpp" in peers:
        for p in precisions:
            dirs[f"gguf-{p}"] = convert_gguf(hf, root / f"{p}.gguf", p, cache)
    return dirs


def factories(args, dirs: dict[str, Path]) -> list[tuple[str, str, object]]:
    """(engine, precision, what its runner loads) for every engine and precision asked for."""
    out = [] if args.only_peers else [("gpt2serve", p, args.model) for p in args.precisions]
    if "transformers" in args.peers:
        out += [("transformers", p, dirs["hf"]) for p in args.precisions if p in ("float32", "bfloat16")]
    if "ct2" in args.peers:
        out += [("ctranslate2", p, dirs.get(f"ct2-{p}")) for p in args.precisions]
    if "llamacpp" in args.peers:
        out += [("llamacpp", p, dirs[f"gguf-{p}"]) for p in args.precisions]
    return out


def runs(engine: str, shape: Shape) -> bool:
    return runs_shape(shape) if engine == "llamacpp" else True


# -- timing ------------------------------------------------------------------------------------------------


def prompt_ids_for(shape: Shape, tokenizer) -> list[int]:
    """PROMPT's tokens, or for a shape with prompt_tokens, PROMPT and FILLER cut to that many tokens."""
    if not shape.prompt_tokens:
        return tokenizer.encode(PROMPT)
    n = shape.prompt_tokens
    ids = tokenizer.encode(PROMPT + FILLER * (n // 15 + 1))[:n]
    for _ in range(8):  # the cut may split a word that gpt2serve, which takes text, would encode otherwise
        again = tokenizer.encode(tokenizer.decode(ids))[:n]
        if again == ids:
            return ids
        ids = again
    raise ValueError(f"no {n}-token prompt that survives decoding and encoding again")


def warm_up(runner, shapes: list[Shape], prompt_ids: dict[str, list[int]]) -> None:
    for shape in (s for s in shapes if runs(runner.engine, s)):
        runner.run(Shape(**{**shape.__dict__, "new_tokens": WARMUP_TOKENS}), prompt_ids[shape.name], 0)


def groups(engines: list[tuple], interleave: str) -> list[list[tuple]]:
    """The engines held in memory together, whose repetitions alternate: all of them, those of one
    precision (a big model: gpt2-xl float32 is 6 GB per engine), or each alone."""
    if interleave == "all":
        return [engines]
    if interleave == "none":
        return [[e] for e in engines]
    precisions = list(dict.fromkeys(p for _, p, _ in engines))
    return [[e for e in engines if e[1] == p] for p in precisions]


def measure(args, prompt_ids: dict[str, list[int]], dirs: dict[str, Path], log) -> tuple[dict, list[dict]]:
    """{(engine, precision, shape): {"times": [...], "lengths": [...], "compute": ...}}, errors."""
    shapes = [SHAPES[s] for s in args.shapes]
    samples: dict[tuple, dict] = {}
    errors: list[dict] = []

    def open_runner(engine, precision, source):
        try:
            runner = RemoteRunner(engine, precision, source, args.threads)
        except Exception as exc:  # e.g. a compute type this CPU lacks: recorded, not fatal
            errors.append({"engine": engine, "precision": precision, "error": str(exc)[:300]})
            log(f"skip {engine} {precision}: {exc}")
            return None
        warm_up(runner, shapes, prompt_ids)
        return runner

    def record(runner, shape, rep):
        if hasattr(bench_roofline, "wait_for_quiet"):  # the machine may be shared: start when it is idle
            bench_roofline.wait_for_quiet(max_wait_s=args.quiet_wait)
        bandwidth = measure_read_bandwidth(gb=0.25, repeats=3)  # this minute's: the host's moves
        seconds, lengths = runner.run(shape, prompt_ids[shape.name], seed=1234 + rep)
        key = (runner.engine, runner.precision, shape.name)
        entry = samples.setdefault(
            key, {"times": [], "read_GBps": [], "lengths": lengths, "compute": str(runner.compute)}
        )
        entry["times"].append(seconds)
        entry["read_GBps"].append(bandwidth)
        entry["peak_rss_MB"] = round(runner.peak_rss_kb / 1024, 1)
        log(f"{key} rep {rep}: {seconds / max(lengths) * 1e3:.1f} ms/step, lengths {lengths}")

    for group in groups(factories(args, dirs), args.interleave):
        runners = [r for e, p, f in group if (r := open_runner(e, p, f)) is not None]
        for shape in shapes:
            for rep in range(args.reps):
                for runner in (r for r in runners if runs(r.engine, shape)):
                    record(runner, shape, rep)
        for runner in runners:
            runner.close()
    return samples, errors


# -- the report --------------------------------------------------------------------------------------------


def summarize(
    samples: dict, roofline_ms: dict[str, float], prompt_ids: dict[str, list[int]], streamed: dict[str, int]
) -> tuple[list[dict], list[dict]]:
    rows = []
    for (engine, precision, shape_name), entry in samples.items():
        steps = max(entry["lengths"])
        step_ms = [t / steps * 1e3 for t in entry["times"]]
        med = statistics.median(step_ms)
        # a long prompt's request is mostly its prompt: ms per new token, against no roofline
        x_roofline = None if SHAPES[shape_name].prompt_tokens else round(med / roofline_ms[precision], 2)
        # each repetition against the roofline at the bandwidth measured just before it
        floors = [streamed[precision] / (bw * 1e9) * 1e3 for bw in entry["read_GBps"]]
        adjacent = [ms / floor for ms, floor in zip(step_ms, floors)]
        rows.append(
            {
                "engine": engine,
                "precision": precision,
                "compute_type": entry["compute"],
                "shape": shape_name,
                "label": SHAPES[shape_name].label,
                "prompt_tokens": len(prompt_ids[shape_name]),
                "new_tokens_per_seq": entry["lengths"],
                "tokens_generated": sum(entry["lengths"]),
                "reps": len(step_ms),
                "step_ms_median": round(med, 2),
                "step_ms_min": round(min(step_ms), 2),
                "step_ms_all": [round(x, 2) for x in step_ms],
                "x_roofline": x_roofline,
                "read_GBps_per_rep": [round(bw, 1) for bw in entry["read_GBps"]],
                "x_roofline_adjacent": None if x_roofline is None else round(statistics.median(adjacent), 2),
                "process_peak_rss_MB": entry.get("peak_rss_MB"),
            }
        )
    by = {(r["engine"], r["precision"], r["shape"]): r["step_ms_median"] for r in rows}
    ratios = []
    for (engine, precision, shape), ours in by.items():
        if engine != "gpt2serve":
            continue
        entry = {"shape": shape, "precision": precision, "gpt2serve_ms": ours}
        for peer in ("ctranslate2", "transformers", "llamacpp"):
            if (peer, precision, shape) in by:
                entry[f"speedup_vs_{peer}"] = round(by[(peer, precision, shape)] / ours, 2)
        if ("transformers", "float32", shape) in by:
            entry["speedup_vs_transformers_fp32"] = round(by[("transformers", "float32", shape)] / ours, 2)
        if precision == "float32" and ("llamacpp", "bfloat16", shape) in by:  # against llama.cpp's BF16
            entry["speedup_vs_llamacpp_bf16"] = round(by[("llamacpp", "bfloat16", shape)] / ours, 2)
        ratios.append(entry)
    return rows, ratios


def llamacpp_report(args, dirs: dict[str, Path]) -> dict:
    """The GGUF files' tensor types and the shapes llama.cpp did not run, and why."""
    not_run = [s for s in args.shapes if not runs_shape(SHAPES[s])]
    types = {p: tensor_types(dirs[f"gguf-{p}"]) for p in args.precisions}
    return {"gguf_tensor_types": types, "not_run": {"shapes": not_run, "why": NOT_RUN} if not_run else None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:gpt2", help="random:<size> or a checkpoint directory")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--peers", default="transformers,ct2", help="transformers,ct2,llamacpp or none")
    ap.add_argument("--only-peers", action="store_true", help="skip gpt2serve (peers measured on their own)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--interleave", action="store_true", help="all engines in memory at once, even for big models"
    )
    ap.add_argument(
        "--per-precision",
        action="store_true",
        help="the engines of one precision in memory at once (automatic for models over 2 GB)",
    )
    ap.add_argument("--quiet-wait", type=float, default=3.0, help="seconds to wait for an idle CPU per rep")
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="one engine in memory at a time",
    )
    ap.add_argument(
        "--cache-dir",
        default=str(Path(tempfile.gettempdir()) / "gpt2serve-bench"),
        help="where the exported and converted checkpoints are kept between runs",
    )
    ap.add_argument("--cold-start", action="store_true", help="also time `gpt2serve serve` to /ping 200")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode benchmark (with --cold-start)")
    add_out_argument(ap, "engine_<model>, or cold_<model> with --no-decode")
    plot_help = "also draw the plot (plot_engine.py): beside the JSON, or to this PNG"
    ap.add_argument("--plot", nargs="?", const="", help=plot_help)
    args = ap.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.peers = [] if args.peers in ("", "none") else args.peers.split(",")
    unknown = set(args.shapes) - set(SHAPES) or set(args.precisions) - set(PRECISIONS)
    unknown = unknown or set(args.peers) - {"transformers", "ct2", "llamacpp"}
    if unknown:
        ap.error(f"unknown value(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    torch.set_num_threads(args.threads)
    cfg = model_config(args.model)
    small = cfg.n_params * 4 < BIG_MODEL_BYTES
    if args.interleave or (small and not (args.sequential or args.per_precision)):
        args.interleave = "all"
    else:
        args.interleave = "none" if args.sequential else "per-precision"
    report: dict = {"model": args.model, "threads": args.threads, "prompt": PROMPT}
    bandwidth = measure_read_bandwidth()
    log(f"read bandwidth {bandwidth:.1f} GB/s")
    if not args.no_decode:
        tokenizer = Tokenizer.bundled()
        prompt_ids = {name: prompt_ids_for(shape, tokenizer) for name, shape in SHAPES.items()}
        dirs = peer_dirs(args.model, args.peers, args.precisions, Path(args.cache_dir)) if args.peers else {}
        samples, errors = measure(args, prompt_ids, dirs, log)
        bandwidth = max(bandwidth, measure_read_bandwidth())  # the best of before and after
        roofline = {p: streamed_bytes(cfg, p) / (bandwidth * 1e9) * 1e3 for p in PRECISIONS}
        streamed = {p: streamed_bytes(cfg, p) for p in PRECISIONS}
        rows, ratios = summarize(samples, roofline, prompt_ids, streamed)
        report |= {
            "prompt_tokens": len(prompt_ids["greedy"]),
            "reps": args.reps,
            "interleaved": args.interleave,
            "read_GBps": round(bandwidth, 2),
            "streamed_bytes": {p: streamed_bytes(cfg, p) for p in args.precisions},
            "roofline_ms": {p: round(roofline[p], 2) for p in args.precisions},
            "results": rows,
            "ratios": ratios,
            "errors": errors,
        }
        if "llamacpp" in args.peers:
            report["llamacpp"] = llamacpp_report(args, dirs)
    if args.cold_start:
        report["cold_start"] = cold_start_report(args.model, args.precisions, cfg, log)
    report = record(command_line(argv), report, read_gbps=bandwidth)
    print(json.dumps(report, indent=1))
    name = f"{'cold' if args.no_decode else 'engine'}_{model_slug(args.model)}"
    path = save(report, args.out, name)
    if args.plot is not None and "results" in report:
        from plot_engine import plot

        png = Path(args.plot) if args.plot else (path or Path(f"{name}.json")).with_suffix(".png")
        plot(report, png)


if __name__ == "__main__":
    main()
