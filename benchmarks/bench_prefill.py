"""Prompt processing on the CPU: one prompt of N tokens through gpt2serve's two CPU paths.

- decode.c: every layer in one C call, the prompt's tokens as rows, every product on gemv.c (what
  prompts run on while they fit `GPT2.fused_rows` with the decode rows of their step);
- torch: the layer-by-layer forward of torch operations (scaled_dot_product_attention), each product on
  gemv.c up to its `max_gemv_rows` and beyond on torch's dense kernels (oneDNN for float32 and bfloat16
  where it has them, int8 widened to float32 in chunks): what a longer prompt runs on.

Both compute the logits of the prompt's last token from an empty cache, on the same model; the two
paths alternate, and the figure is the median of --reps timings after one warm-up.

    python benchmarks/bench_prefill.py [--model random:gpt2] [--precisions float32,bfloat16,int8]
                                       [--tokens 16,32,64,128,256,512] [--reps 5] [--threads 2]
                                       [--out NAME|FILE.json|-]

Prints one JSON object: {"model", "threads", "results": [{precision, tokens, fused_rows, decode_c_ms,
torch_ms, torch_over_decode_c}], and what _results.record adds} (fused_rows: the most rows decode.c takes
for that precision), written to benchmarks/results/<machine>/prefill_<model>.json unless --out says
otherwise.
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

from _results import add_out_argument, command_line, model_slug, record, save  # noqa: E402

from gpt2serve.engine.loader import load_checkpoint  # noqa: E402
from gpt2serve.engine.model import GPT2, make_batch  # noqa: E402


def prefill_ms(model: GPT2, n: int, on_decode_c: bool) -> float:
    ids = [(17 * i + 5) % model.cfg.vocab_size for i in range(n)]
    cache = model.new_cache(1, n)
    start = time.perf_counter()
    if on_decode_c:
        model.forward_rows(ids, [0] * n, list(range(n)), [n - 1], cache)
    else:
        model.fused_decode = False
        try:
            model(make_batch([ids], [0], [0], "cpu"), cache)
        finally:
            model.fused_decode = True
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:gpt2")
    ap.add_argument("--precisions", default="float32,bfloat16,int8")
    ap.add_argument("--tokens", default="16,32,64,128,256,512")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    add_out_argument(ap, "prefill_<model>")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for precision in args.precisions.split(","):
        loaded = load_checkpoint(args.model, dtype=torch.float32)
        model = GPT2(loaded.config, loaded.state_dict, precision, "cpu", "gemv")
        del loaded
        if not model.fused_decode:
            raise SystemExit("decode.c does not run here (the C kernels did not build)")
        for n in (int(t) for t in args.tokens.split(",")):
            times: dict[bool, list[float]] = {True: [], False: []}
            for rep in range(args.reps + 1):
                for on_decode_c in (True, False):
                    ms = prefill_ms(model, n, on_decode_c)
                    if rep:  # the first round warms up
                        times[on_decode_c].append(ms)
            fused, torch_ms = statistics.median(times[True]), statistics.median(times[False])
            row = {
                "precision": precision,
                "tokens": n,
                "fused_rows": model.fused_rows,
                "decode_c_ms": round(fused, 2),
                "torch_ms": round(torch_ms, 2),
                "torch_over_decode_c": round(torch_ms / fused, 2),
            }
            print(json.dumps(row), file=sys.stderr, flush=True)
            results.append(row)
        del model
    report = record(command_line(argv), {"model": args.model, "threads": args.threads, "results": results})
    print(json.dumps(report, indent=1))
    save(report, args.out, f"prefill_{model_slug(args.model)}")


if __name__ == "__main__":
    main()
