"""Many sequences per decode step: ms per step, tokens/s and FLOP rate for 1-32 sequences and 3 contexts.

Each point decodes `n` sequences together, one token each per step, every one `context` tokens into its
sequence, through `GPT2.step` (what the engine calls: decode.c for the layers, the head sketch for greedy's
top token) plus the greedy choice of each row's token, fed back as the next step's input. The cache is
filled once per context by a real prompt of that length, copied into every slot. The figure is the mean
step time over --steps steps; the median over --reps repetitions is reported with its spread (the
machine may be shared), the repetitions of every sequence count alternating.

Beside each step: the FLOPs a dense decode step does (2 per weight per row: every matrix and the output
head, which the head sketch also streams in full, plus attention's 4 * n_layer * C per key read), the
rate they run at against two peaks measured in the same run (a large `torch.mm`, MKL's sgemm; and
oneDNN's prepacked float32 product of the same size, which on AMD CPUs reaches the FMA units' limit
where MKL does not), and the bandwidth roofline: the weight bytes a greedy step streams (every layer's
matrices and the head sketch's int8 matrix) plus the keys and values it reads, over the read bandwidth
(bench_roofline.py).

    python benchmarks/bench_scaling.py [--model random:gpt2] [--precisions float32[,bfloat16,int8]]
        [--seqs 1,2,4,8,16,32] [--contexts 8,256,900] [--steps 8] [--reps 5] [--threads 2]
        [--out NAME|FILE.json|-] [--plot [FILE.png]]

Prints one JSON object (with what _results.record adds) and writes it to
benchmarks/results/<machine>/scaling_<model>.json; `--plot` draws tokens/s and GFLOP/s beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _results import add_out_argument, command_line, model_slug, out_path, record, save  # noqa: E402
from bench_engine import model_config, streamed_bytes  # noqa: E402
from bench_roofline import measure_read_bandwidth, wait_for_quiet  # noqa: E402

from gpt2serve.engine.config import ModelConfig  # noqa: E402
from gpt2serve.engine.loader import load_checkpoint  # noqa: E402
from gpt2serve.engine.model import GPT2  # noqa: E402

PEAK_SIZE = 2048  # square float32 matrices for the peaks: ~0.3 s of work each at ~100 GFLOP/s


# -- peaks and rooflines ---------------------------------------------------------------------------------


def _best_rate(fn, flops: float, reps: int) -> float:
    """GFLOP/s of `fn` at its median time over `reps` calls after a warm-up."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times) / 1e9


def measure_peaks(n: int = PEAK_SIZE, reps: int = 7) -> dict[str, float]:
    """float32 GFLOP/s of an (n, n) @ (n, n) product: `torch.mm` and oneDNN's prepacked linear."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    peaks = {"torch_mm": _best_rate(lambda: torch.mm(a, b, out=c), 2 * n**3, reps)}
    if torch.backends.mkldnn.is_available():
        mkldnn = torch.ops.mkldnn
        packed = mkldnn._reorder_linear_weight(b)
        run = lambda: mkldnn._linear_pointwise(a, packed, None, "none", [], "")  # noqa: E731
        peaks["onednn"] = _best_rate(run, 2 * n**3, reps)
    return {k: round(v, 1) for k, v in peaks.items()}


def step_flops(cfg: ModelConfig, n: int, keys: int) -> float:
    """A dense decode step's FLOPs for `n` rows each attending to `keys` keys."""
    e = cfg.n_embd
    weights = cfg.n_layer * 12 * e * e + cfg.vocab_size * e
    return n * (2.0 * weights + 4.0 * cfg.n_layer * e * keys)


def weight_bytes(model: GPT2, precision: str) -> int:
    """Weight bytes a greedy step streams: every layer's matrices, and the head sketch where the model has
    one (its int8 matrix and slacks; the exact rows of its few candidates are left out), else the head;
    bench_engine's estimate where torch's packed weights hide their size."""
    mats = [m.weight for b in model.blocks for m in (b.c_attn, b.attn_proj, b.c_fc, b.mlp_proj)]
    plain = lambda w: isinstance(w, torch.Tensor) and w.layout == torch.strided  # noqa: E731
    if not all(plain(w) for w in [*mats, model.lm_head.weight]):
        return streamed_bytes(model.cfg, precision)
    head = model.head_sketch.nbytes if model.head_sketch is not None else model.lm_head.weight.nbytes
    return sum(w.nbytes for w in mats) + head


def kv_bytes(cfg: ModelConfig, n: int, keys: int) -> int:
    """Bytes of keys and values a step reads (float32 cache)."""
    return n * keys * cfg.n_layer * 2 * cfg.n_embd * 4


# -- one point -------------------------------------------------------------------------------------------


def fill_cache(model: GPT2, context: int, slots: int, max_len: int):
    """A cache whose first `slots` slots all hold one real `context`-token prompt."""
    cache = model.new_cache(slots, max_len)
    ids = [(31 * i + 7) % model.cfg.vocab_size for i in range(context)]
    model.step([], [(ids, 0)], cache)
    cache.copy_slots([0] * (slots - 1), list(range(1, slots)), context)
    return cache


def step_ms(model: GPT2, cache, n: int, context: int, steps: int) -> float:
    """Mean ms of `steps` greedy decode steps of `n` sequences from position `context`."""
    tokens = [(13 * i + 1) % model.cfg.vocab_size for i in range(n)]
    start = time.perf_counter()
    for t in range(steps):
        logits = model.step([(tok, i, context + t) for i, tok in enumerate(tokens)], [], cache, top=1)
        tokens = logits.argmax(dim=-1).tolist()
    return (time.perf_counter() - start) * 1e3 / steps


def measure(model: GPT2, precision: str, context: int, args, bandwidth: float) -> list[dict]:
    """Every sequence count at one context: the repetitions alternate over the counts."""
    cfg, seqs = model.cfg, args.seqs
    cache = fill_cache(model, context, max(seqs), context + args.steps)
    samples: dict[int, list[float]] = {n: [] for n in seqs}
    for rep in range(args.reps + 1):
        for n in seqs:
            wait_for_quiet(max_wait_s=2.0)
            ms = step_ms(model, cache, n, context, args.steps)
            if rep:  # the first round warms up
                samples[n].append(ms)
    del cache
    weights = weight_bytes(model, precision)
    rows = []
    for n in seqs:
        med, keys = statistics.median(samples[n]), context + args.steps // 2
        flops = step_flops(cfg, n, keys)
        roofline = (weights + kv_bytes(cfg, n, keys)) / (bandwidth * 1e9) * 1e3
        rows.append({
            "precision": precision, "context": context, "sequences": n,
            "step_ms": round(med, 2), "step_ms_min": round(min(samples[n]), 2),
            "step_ms_max": round(max(samples[n]), 2), "tokens_per_s": round(n / med * 1e3, 1),
            "gflops": round(flops / med / 1e6, 1), "roofline_ms": round(roofline, 2),
            "x_roofline": round(med / roofline, 2),
        })  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


# -- the plot --------------------------------------------------------------------------------------------


def plot(report: dict, out: Path) -> Path:
    """tokens/s and GFLOP/s against sequences, one line per (precision, context), the peaks as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    series = dict.fromkeys((r["precision"], r["context"]) for r in report["results"])
    for precision, context in series:
        rows = [r for r in report["results"] if (r["precision"], r["context"]) == (precision, context)]
        xs = [r["sequences"] for r in rows]
        label = f"{precision}, {context}-token context"
        left.plot(xs, [r["tokens_per_s"] for r in rows], marker="o", label=label)
        right.plot(xs, [r["gflops"] for r in rows], marker="o", label=label)
    for name, value in report["peaks_gflops"].items():
        right.axhline(value, linestyle="--", color="grey")
        right.annotate(f"{name} peak {value:.0f}", (1, value), fontsize=8, va="bottom")
    for ax, what in ((left, "generated tokens/s"), (right, "GFLOP/s (dense step)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences per step")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(f"{report['model']} greedy decode, {report['threads']} threads, {machine['cpu']} "
                 f"({machine['folder']}), commit {report['commit']}", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:gpt2")
    ap.add_argument("--precisions", default="float32")
    ap.add_argument("--seqs", default="1,2,4,8,16,32")
    ap.add_argument("--contexts", default="8,256,900")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per repetition")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plot", nargs="?", const="", default=None, help="a PNG (default: beside the JSON)")
    add_out_argument(ap, "scaling_<model>")
    args = ap.parse_args(argv)
    args.seqs = [int(v) for v in args.seqs.split(",")]
    args.contexts = [int(v) for v in args.contexts.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = model_config(args.model)
    if max(args.contexts) + args.steps > cfg.n_positions:
        raise SystemExit(f"contexts + steps must stay within {cfg.n_positions} positions")
    bandwidth, peaks, results = measure_read_bandwidth(), measure_peaks(), []
    for precision in args.precisions.split(","):
        loaded = load_checkpoint(args.model, dtype=torch.float32)
        model = GPT2(loaded.config, loaded.state_dict, precision, "cpu")
        del loaded
        for context in args.contexts:
            results += measure(model, precision, context, args, bandwidth)
        del model
    after = measure_peaks()  # the best of before and after: the machine may be shared
    peaks = {k: max(v, after[k]) for k, v in peaks.items()}
    for row in results:
        row |= {f"of_{k}_peak": round(row["gflops"] / v, 2) for k, v in peaks.items()}
    report = {
        "model": args.model, "threads": args.threads, "steps": args.steps, "reps": args.reps,
        "read_GBps": round(bandwidth, 2), "peaks_gflops": peaks, "results": results,
    }  # fmt: skip
    report = record(command_line(argv), report, read_gbps=bandwidth)
    print(json.dumps(report, indent=1))
    name = f"scaling_{model_slug(args.model)}"
    save(report, args.out, name)
    if args.plot is not None:
        json_path = out_path(args.out, name, report) or Path(f"{name}.json")
        print(f"wrote {plot(report, Path(args.plot) if args.plot else json_path.with_suffix('.png'))}",
              file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
