"""Linear-layer kernels on the CPU: y = x @ W + b for GPT-2's matrices, few rows, several weight formats.

Decoding reads every weight once per step for only 1-16 activation rows, so each kernel is judged by the
weight bytes it streams per second (GB/s) against the machine's read bandwidth (bench_roofline.py).
The weights of one method are replicated into a set of copies larger than the L3 cache and the calls cycle
through them, so every call reads its weight from RAM as in a real decode step. Methods are timed in
interleaved rounds (the machine is shared and noisy) and the median call time is reported.

    python benchmarks/bench_linear.py [--shapes gpt2|gpt2-xl|all] [--only fc,head] [--ms 1,3,8,16]
                                      [--methods a,b|all] [--threads N] [--rounds 3] [--cold-mb 128]
                                      [--out NAME|FILE.json|-]

One matrix takes 15-60 s on a quiet 2-core machine (`--only` picks matrices). Prints one JSON object
(and writes it to benchmarks/results/<machine>/linear_<shapes>.json, or where --out says), with what
_results.record adds: {"roofline_read_GBps", "threads", "torch", "results": [{shape, in, out, M, method,
ms_median, ms_best, GBps, pct_roofline, rel_err, foreign_cpu_ticks}, ...]}; GBps counts the weight bytes
in the method's format, rel_err is the Frobenius error against a float64 x @ W + b, foreign_cpu_ticks the
CPU time other processes took during the timed calls (10 ms ticks: large values mean a disturbed
measurement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _results import add_out_argument, command_line, record, save  # noqa: E402
from bench_roofline import foreign_cpu_ticks, measure_read_bandwidth, wait_for_quiet  # noqa: E402

from gpt2serve.engine import native  # noqa: E402
from gpt2serve.engine.linear import PackedLinear, _fbgemm_pack, mkldnn_bf16, quantize_int8  # noqa: E402

Kernel = Callable[[torch.Tensor], torch.Tensor]
mkldnn = torch.ops.mkldnn

SHAPES = {  # name -> (in, out, has_bias)
    "gpt2": {
        "attn": (768, 2304, True),
        "proj": (768, 768, True),
        "fc": (768, 3072, True),
        "mlp_proj": (3072, 768, True),
        "head": (768, 50257, False),
    },
    "gpt2-xl": {
        "attn": (1600, 4800, True),
        "proj": (1600, 1600, True),
        "fc": (1600, 6400, True),
        "mlp_proj": (6400, 1600, True),
        "head": (1600, 50257, False),
    },
}


def _f32(w: torch.Tensor, b: torch.Tensor | None) -> dict[str, Kernel]:
    w_oi = w.t().contiguous()
    packed = mkldnn._reorder_linear_weight(w_oi)
    return {
        "f32_F.linear": lambda x: F.linear(x, w_oi, b),
        "f32_addmm_io": lambda x: torch.addmm(b, x, w) if b is not None else x @ w,
        "f32_mkldnn_packed": lambda x: mkldnn._linear_pointwise(x, packed, b, "none", [], ""),
    }


def _f32_extra(w: torch.Tensor, b: torch.Tensor | None) -> dict[str, Kernel]:
    w_oi = w.t().contiguous()
    mkl = torch.ops.mkl._mkl_reorder_linear_weight(w_oi, 8)
    fp16 = torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(w_oi)
    return {
        "f32_mkl_packed_bs8": lambda x: torch.ops.mkl._mkl_linear(x, mkl, w_oi, b, 8),
        "f32_addmm_io_rows": lambda x: torch.cat(
            [
                torch.addmm(b, x[i : i + 1], w) if b is not None else x[i : i + 1] @ w
                for i in range(x.shape[0])
            ]
        ),
        "fp16w_fbgemm": lambda x: torch.ops.aten.fbgemm_linear_fp16_weight_fp32_activation(x, fp16, b),
    }


def _gemv(w: torch.Tensor, b: torch.Tensor | None) -> dict[str, Kernel]:
    if not native.available():
        return {}
    w_oi = w.t().contiguous()
    q, scale = quantize_int8(w_oi)
    w16 = w_oi.bfloat16()
    return {
        "gemv_f32": lambda x: native.gemv(x, w_oi, None, b),
        "gemv_bf16": lambda x: native.gemv(x, w16, None, b),
        "gemv_int8": lambda x: native.gemv(x, q, scale, b),
    }


def _bf16(w: torch.Tensor, b: torch.Tensor | None) -> dict[str, Kernel]:
    w_oi = w.t().contiguous().bfloat16()
    b16 = b.bfloat16() if b is not None else None
    if not mkldnn_bf16():  # oneDNN's bf16 packing needs AVX-512 (or AVX-NE-CONVERT)
        return {"bf16_F.linear": lambda x: F.linear(x.bfloat16(), w_oi, b16).float()}
    packed = mkldnn._reorder_linear_weight(w_oi)
    chunks = w_oi.split(256)  # 256 rows of 768 fp32 = 0.8 MB: upcast stays in L2

    def upcast(x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.linear(x, c.float()) for c in chunks], dim=-1)
        return y + b if b is not None else y

    return {
        "bf16_F.linear": lambda x: F.linear(x.bfloat16(), w_oi, b16).float(),
        "bf16_mkldnn_packed": lambda x: mkldnn._linear_pointwise(
            x.bfloat16(), packed, b16, "none", [], ""
        ).float(),
        "bf16_upcast_chunks": upcast,
    }


def _int8(w: torch.Tensor, b: torch.Tensor | None) -> dict[str, Kernel]:
    q, scale = quantize_int8(w.t())
    qw = torch.ops.onednn.qlinear_prepack(q, None)
    zeros = torch.zeros(q.shape[0], dtype=torch.long)
    fb = _fbgemm_pack(w.t(), b)  # per-channel int8 weight, as PackedLinear packs it

    def onednn_dynamic(x: torch.Tensor) -> torch.Tensor:  # per-tensor uint8 activations
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
        xs = float((hi - lo) / 255) or 1.0
        xz = int(round(-float(lo) / xs))
        qx = (x / xs).round_().add_(xz).clamp_(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(
            qx, xs, xz, qw, scale, zeros, b, 1.0, 0, torch.float32, "none", [], ""
        )

    def add_b(y: torch.Tensor) -> torch.Tensor:
        return y + b if b is not None else y

    s16 = scale.bfloat16()
    return {
        "int8_weight_int8pack_mm": lambda x: add_b(torch._weight_int8pack_mm(x, q, scale)),
        "int8_int8pack_mm_bf16x": lambda x: add_b(torch._weight_int8pack_mm(x.bfloat16(), q, s16).float()),
        "int8_onednn_dynamic_act": onednn_dynamic,
        "int8_fbgemm_dynamic_act": lambda x: torch.ops.quantized.linear_dynamic(x, fb),
    }


def _int4(w: torch.Tensor, b: torch.Tensor | None, group: int = 64) -> dict[str, Kernel]:
    w_oi = w.t().contiguous()
    n, k = w_oi.shape
    if n % 16 or k % group:
        return {}  # the packing needs N divisible by 16 (not the 50257-row head)
    wg = w_oi.reshape(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    sz = torch.stack([scale.squeeze(-1), (lo + 8 * scale).squeeze(-1)], -1).transpose(0, 1).contiguous()

    def run(x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x, packed, group, sz)
        return y + b if b is not None else y

    return {"int4_weight_int4pack_mm_g64": run}


def _packed(w: torch.Tensor, b: torch.Tensor | None) -> dict[str, Kernel]:
    return {f"PackedLinear_{fmt}": PackedLinear(w, b, fmt) for fmt in ("float32", "bfloat16", "int8")}


FAMILIES = [_f32, _f32_extra, _bf16, _gemv, _int8, _int4, _packed]
# The default selection: the kernels chosen by PackedLinear and their main rivals (--methods all: every one).
MAIN = [
    "f32_F.linear",
    "f32_addmm_io",
    "f32_mkldnn_packed",
    "fp16w_fbgemm",
    "bf16_F.linear",
    "bf16_mkldnn_packed",
    "int8_int8pack_mm_bf16x",
    "int8_onednn_dynamic_act",
    "int8_fbgemm_dynamic_act",
    "gemv_f32",
    "gemv_bf16",
    "gemv_int8",
    "PackedLinear_float32",
    "PackedLinear_bfloat16",
    "PackedLinear_int8",
]
BYTES_PER_WEIGHT = {
    "f32": 4,
    "fp16w": 2,
    "bf16": 2,
    "int8": 1,
    "int4": 0.5,
    "gemv_f32": 4,
    "gemv_bf16": 2,
    "gemv_int8": 1,
    "PackedLinear_float32": 4,
    "PackedLinear_bfloat16": 2,
    "PackedLinear_int8": 1,
}


def weight_bytes(method: str, k: int, n: int) -> float:
    for prefix, per in sorted(BYTES_PER_WEIGHT.items(), key=lambda kv: -len(kv[0])):
        if method.startswith(prefix):
            return per * k * n
    raise KeyError(method)


def build(k: int, n: int, has_bias: bool, wanted: set[str] | None, cold_mb: float) -> dict[str, list[Kernel]]:
    """Method name -> kernels over distinct weight copies whose total size exceeds `cold_mb` MB."""
    gen = torch.Generator().manual_seed(0)
    weights = []  # created lazily: the int8 copies of a small matrix need the most

    def weight(i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        while len(weights) <= i:
            w = torch.randn(k, n, generator=gen) * 0.02
            weights.append((w, torch.randn(n, generator=gen) * 0.02 if has_bias else None))
        return weights[i]

    out: dict[str, list[Kernel]] = {}
    for family in FAMILIES:
        names = [m for m in family(*weight(0)) if wanted is None or m in wanted]
        need = {m: max(2, int(cold_mb * 1e6 // weight_bytes(m, k, n)) + 1) for m in names}
        for i in range(max(need.values(), default=0)):
            kernels = family(*weight(i))
            for m in names:
                if i < need[m]:
                    out.setdefault(m, []).append(kernels[m])
    out["_weights"] = weights[:1]  # the reference weight for the error check
    return out


def _timed_calls(fns: list[Kernel], x: torch.Tensor, budget_s: float) -> list[float]:
    fns[0](x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget_s and len(times) < 60):
        fn = fns[len(times) % len(fns)]
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_rounds(kernels: dict[str, list[Kernel]], x: torch.Tensor, rounds: int, budget_s: float) -> dict:
    """Median and best per-call ms of each method over interleaved rounds.

    A round during which other processes used the CPUs is run again (up to 3 tries, keeping the
    least disturbed), since the machine may be shared; `foreign_ticks` sums what was left.
    """
    times: dict[str, list[float]] = {m: [] for m in kernels}
    foreign = dict.fromkeys(kernels, 0)
    for _ in range(rounds):
        wait_for_quiet(max_wait_s=3.0)
        for m, fns in kernels.items():
            tries = []
            for _ in range(3):
                before = foreign_cpu_ticks()
                calls = _timed_calls(fns, x, budget_s / rounds)
                tries.append((foreign_cpu_ticks() - before, calls))
                if tries[-1][0] <= 1:
                    break
                wait_for_quiet(max_wait_s=1.0)
            ticks, calls = min(tries, key=lambda t: t[0])
            times[m] += calls
            foreign[m] += ticks
    return {m: (statistics.median(t), min(t), foreign[m]) for m, t in times.items()}


def rel_error(fn: Kernel, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> float:
    ref = x.double() @ w.double() + (b.double() if b is not None else 0)
    return float((fn(x).double() - ref).norm() / ref.norm())


def run(args: argparse.Namespace, read_gbps: float) -> list[dict]:
    results = []
    wanted = None if args.methods == "all" else set(args.methods.split(",") if args.methods else MAIN)
    shape_sets = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
    for set_name in shape_sets:
        for shape, (k, n, has_bias) in SHAPES[set_name].items():
            if args.only and shape not in args.only.split(","):
                continue
            kernels = build(k, n, has_bias, wanted, args.cold_mb)
            w, b = kernels.pop("_weights")[0]
            for m_rows in (int(v) for v in args.ms.split(",")):
                x = torch.randn(m_rows, k)
                timed = time_rounds(kernels, x, args.rounds, args.budget_s)
                for method, (med, best, foreign) in timed.items():
                    gbps = weight_bytes(method, k, n) / med / 1e6
                    results.append(
                        {
                            "shape": f"{set_name}.{shape}",
                            "in": k,
                            "out": n,
                            "M": m_rows,
                            "method": method,
                            "ms_median": round(med, 4),
                            "ms_best": round(best, 4),
                            "GBps": round(gbps, 2),
                            "pct_roofline": round(100 * gbps / read_gbps, 1),
                            "rel_err": float(f"{rel_error(kernels[method][0], x, w, b):.2e}"),
                            "foreign_cpu_ticks": foreign,
                        }
                    )
                    print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            del kernels
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="gpt2", help="gpt2, gpt2-xl, a comma list, or all")
    parser.add_argument("--only", default="", help="comma list of matrices: attn,proj,fc,mlp_proj,head")
    parser.add_argument("--ms", default="1,2,3,5,8,16", help="comma list of activation row counts")
    parser.add_argument("--methods", default="", help="comma list of method names, or all (default: MAIN)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=0.1, help="seconds per method per (shape, M)")
    parser.add_argument("--cold-mb", type=float, default=128.0, help="weight bytes cycled through per method")
    add_out_argument(parser, "linear_<shapes>")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    read_gbps = measure_read_bandwidth(gb=0.5, repeats=5)
    results = run(args, read_gbps)
    report = {
        "roofline_read_GBps": round(read_gbps, 2),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "results": results,
    }
    report = record(command_line(), report, read_gbps=read_gbps)
    print(json.dumps(report))
    save(report, args.out, f"linear_{args.shapes.replace(',', '-')}")


if __name__ == "__main__":
    main()
