"""Batch benchmark: `gpt2serve batch` locally, the same requests one at a time, and a server at 16 clients.

    python benchmarks/bench_batch.py [--model random:gpt2] [--requests 200] [--sequential 40]
                                     [--clients 16] [--max-batch-size 48] [--out NAME|FILE.json|-]

The requests are seed-API defaults ({"input": prompt}: sample-top-p, 3 sequences, max_length 100), one per
line. Three runs, one after the other in this process, each measuring generated tokens/s over its wall
time (the model load excluded):
- batch: the batch job's local mode (one engine, 2 x max-batch-size requests in flight), all --requests;
- one at a time: the same engine and code with one request in flight, over the first --sequential
  requests (a rate; all 200 would take ten minutes);
- server: the batch job's --url mode with --clients requests in flight against the container entry point
  started here (a subprocess serving --model with the same --max-batch-size), all --requests.
Tokens are the engine's count locally and the bundled tokenizer's count of the continuations from the
server. Prints one JSON object with the commit, machine, command and date (_results.record) and writes it
to benchmarks/results/<machine>/batch_<model>.json (or where --out says); the 1-minute load average at
each run's end says how busy the (shared) machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _results import add_out_argument, command_line, model_slug, record, save  # noqa: E402
from bench_serving import start_server  # noqa: E402

from gpt2serve.batch import read_lines, run_lines  # noqa: E402
from gpt2serve.batch_output import OrderedWriter  # noqa: E402
from gpt2serve.batch_progress import Progress  # noqa: E402

PROMPT = "Request {i}: the history of the printing press begins in"


async def run(name: str, path: Path, limit: int, answer, concurrency: int) -> dict:
    """Answer the first `limit` lines of `path` with `concurrency` in flight; the run's figures."""
    lines = (item for item in read_lines(str(path), 0) if item[0] < limit)
    progress = Progress(limit)
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        await run_lines(lines, answer, OrderedWriter(out.fileno(), 0), concurrency, progress)
        wall = time.perf_counter() - started
    return {
        "run": name, "requests": limit, "in_flight": concurrency, "errors": progress.failed,
        "wall_s": round(wall, 2), "generated_tokens": progress.tokens,
        "tokens_per_s": round(progress.tokens / wall, 1), "requests_per_s": round(limit / wall, 3),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }  # fmt: skip


def local_runs(args: argparse.Namespace, path: Path) -> list[dict]:
    from gpt2serve.batch import BatchOptions
    from gpt2serve.batch_local import LocalBatch
    from gpt2serve.engine.params import SamplingParams

    options = BatchOptions("", "", model=args.model, max_batch_size=args.max_batch_size, threads=args.threads)
    local = LocalBatch.load(options)
    try:
        local.engine.generate_sync("Hello", SamplingParams(max_new_tokens=4))  # warm-up
        batch = asyncio.run(run("batch", path, args.requests, local.answer, 2 * args.max_batch_size))
        single = asyncio.run(run("one at a time", path, args.sequential, local.answer, 1))
    finally:
        local.close()
    return [batch, single]


def server_run(args: argparse.Namespace, path: Path) -> dict:
    from gpt2serve.batch_remote import RemoteBatch

    server_args = argparse.Namespace(model=args.model, device="cpu", max_batch_size=args.max_batch_size,
                                     threads=args.threads, dtype=None, start_timeout=300.0)  # fmt: skip
    proc, url, log = start_server(server_args)

    async def clients() -> dict:
        remote = RemoteBatch(url)  # at most --clients requests open at once
        try:
            name = f"server, {args.clients} clients"
            return await run(name, path, args.requests, remote.answer, args.clients)
        finally:
            await remote.close()

    try:
        return asyncio.run(clients())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--sequential", type=int, default=40, help="requests of the one-at-a-time run")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=48, help="KV slots, here and in the server")
    p.add_argument("--threads", type=int, default=None, help="CPU threads, here and in the server")
    add_out_argument(p, "batch_<model>")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "requests.jsonl"
        lines = (json.dumps({"input": PROMPT.format(i=i)}) + "\n" for i in range(args.requests))
        path.write_text("".join(lines))
        runs = local_runs(args, path) + [server_run(args, path)]
    batch, single, server = runs
    report = {
        "model": args.model,
        "requests": "seed-API defaults: sample-top-p, 3 sequences, max_length 100", "runs": runs,
        "batch_vs_one_at_a_time": round(batch["tokens_per_s"] / single["tokens_per_s"], 2),
        "batch_vs_server": round(batch["tokens_per_s"] / server["tokens_per_s"], 2),
    }  # fmt: skip
    report = record(command_line(argv), report)
    print(json.dumps(report, indent=2))
    save(report, args.out, f"batch_{model_slug(args.model)}")


if __name__ == "__main__":
    main()
