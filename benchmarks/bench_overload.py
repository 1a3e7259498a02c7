"""Overload benchmark: a server pushed to 1x, 4x and 10x its capacity, and a pass of oversized requests.

    python benchmarks/bench_overload.py [--model random:gpt2] [--max-batch-size 8] [--max-queue 16]
                                        [--levels 1,4,10] [--seconds 15] [--max-new-tokens 16]
                                        [--backoffs retry-after,0.05] [--engine-nice 10]
                                        [--out NAME|FILE.json|-]

It starts the server itself (the container entry point on a free 127.0.0.1 port; all traffic stays on
loopback) with --max-batch-size and --max-queue, so its capacity is their sum: the requests it can hold
at once, running or waiting. At each level, capacity x level callers (in 2 processes) send seeded
sampling requests back to back for --seconds; a refused caller waits the server's Retry-After (as the
OpenAI client does) or, in a harsher pass, a fixed --backoffs time. Meanwhile a light probe process of
its own calls GET /ping and a short generation every 50 ms: it sees the server as one more client would,
undelayed by the callers' own busy event loops. Per level: p50/p99 latency of the 200s, of the 503s
(refused: the queue is full), of /ping and of the probe's requests, and the count of any other status.

Memory: the server's RSS after a warm-up, then after a pass of oversized requests (a 6 MB `input`, a
prompt past the token limit, JSON Lines bodies past the line limit, long stop strings, a 1,000-prompt
OpenAI list) and the levels, and after 5 s idle. Prints one JSON object with the commit, machine,
command and date (_results.record) and writes it to benchmarks/results/<machine>/overload_<model>.json (or
where --out says).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _results import add_out_argument, command_line, model_slug, record, save
from bench_serving import _free_port, percentile

SRC = Path(__file__).resolve().parents[1] / "src"
BODY = {"input": "The history of the printing press begins in", "mode": "sample", "num_return_sequences": 1}


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "gpt2serve.api.container", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--model", args.model, "--device", "cpu",
           "--max-batch-size", str(args.max_batch_size),
           "--max-queue", str(args.max_queue), "--engine-nice", str(args.engine_nice),
           "--log-level", "error"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=tempfile.TemporaryFile(), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become ready")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _summary(values: list[float]) -> dict:
    top = max(values) if values else None
    return {"count": len(values), "p50_ms": _ms(percentile(values, 50)),
            "p99_ms": _ms(percentile(values, 99)), "max_ms": _ms(top)}  # fmt: skip


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


def _probe_loop(url: str, seconds: float, out: multiprocessing.Queue) -> None:
    """From a light process of its own (the callers' busy event loops must not delay it): GET /ping
    and one generation request in turn, every 50 ms. Returns ping latencies and (status, latency)."""
    pings, posts, stop_at = [], [], time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            try:
                client.get("/ping")
            except httpx.HTTPError:
                pass
            pings.append(time.monotonic() - t0)
            t0 = time.monotonic()
            try:
                status = str(client.post("/invocations", json={**BODY, "max_new_tokens": 4}).status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            posts.append((status, time.monotonic() - t0))
            time.sleep(0.05)
    out.put((pings, posts))


async def _post(conn: list, host: str, port: int, request: bytes) -> tuple[str, str]:
    """One request on the caller's kept-alive connection (opened again where the server closed it):
    (status, Retry-After). Plain asyncio streams: a load generator on the server's own 2 cores must
    cost little CPU per request, or its own delays are what it measures."""
    if not conn:
        conn.extend(await asyncio.open_connection(host, port))
    reader, writer = conn
    try:
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower().split("\r\n")
        fields = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
        await reader.readexactly(int(fields.get("content-length", "0")))
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.close()
        conn.clear()
        return type(exc).__name__, "0"
    if fields.get("connection") == "close":
        writer.close()
        conn.clear()
    return head[0].split()[1], fields.get("retry-after", "0")


async def _callers(url: str, first: int, count: int, seconds: float, max_new_tokens: int,
                   backoff_s: float | None) -> dict:
    latencies: dict[str, list[float]] = {}
    stop_at = time.monotonic() + seconds
    host, port = httpx.URL(url).host, httpx.URL(url).port

    async def caller(k: int) -> None:
        conn: list = []
        i = 0
        while time.monotonic() < stop_at:
            body = json.dumps({**BODY, "seed": k * 100_000 + i, "max_new_tokens": max_new_tokens}).encode()
            request = (f"POST /invocations HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                       f"content-length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip
            i += 1
            t0 = time.monotonic()
            status, retry_after = await _post(conn, host, port, request)
            latencies.setdefault(status, []).append(time.monotonic() - t0)
            if status == "503":  # busy: wait as told (the OpenAI client does), or `backoff_s`
                await asyncio.sleep(float(retry_after) if backoff_s is None else backoff_s)
        if conn:
            conn[1].close()

    await asyncio.gather(*(caller(k) for k in range(first, first + count)))
    return latencies


def _caller_process(url: str, first: int, count: int, seconds: float, max_new_tokens: int,
                    backoff_s: float | None, out) -> None:
    out.put(asyncio.run(_callers(url, first, count, seconds, max_new_tokens, backoff_s)))


def run_level(url: str, callers: int, seconds: float, max_new_tokens: int, backoff_s: float | None,
              processes: int = 2) -> dict:
    """`callers` spread over `processes` load-generating processes, and the pinger in its own."""
    out: multiprocessing.Queue = multiprocessing.Queue()
    pings: multiprocessing.Queue = multiprocessing.Queue()
    share = -(-callers // processes)
    workers = [multiprocessing.Process(target=_caller_process, args=(
                   url, k * share, min(share, callers - k * share), seconds, max_new_tokens, backoff_s, out))
               for k in range(processes) if k * share < callers]  # fmt: skip
    pinger = multiprocessing.Process(target=_probe_loop, args=(url, seconds, pings))
    for p in (*workers, pinger):
        p.start()
    latencies: dict[str, list[float]] = {}
    for _ in workers:
        for status, values in out.get().items():
            latencies.setdefault(status, []).extend(values)
    ping, probes = pings.get()
    for p in (*workers, pinger):
        p.join()
    other = {k: len(v) for k, v in latencies.items() if k not in ("200", "503")}
    probe = {status: _summary([t for s, t in probes if s == status]) for status in {s for s, _ in probes}}
    return {"callers": callers, "backoff": "Retry-After" if backoff_s is None else backoff_s,
            "ok": _summary(latencies.get("200", [])),
            "busy_503": _summary(latencies.get("503", [])), "ping": _summary(ping), "probe": probe,
            "other_statuses": other}  # fmt: skip


def oversized_pass(url: str, rounds: int) -> dict:
    """Requests that must be refused cheaply; their statuses, counted."""
    huge = "a" * (6 * 2**20 - 100)
    bodies = [
        ("/invocations", "application/json", json.dumps({"input": huge})),
        ("/invocations", "application/json", json.dumps({"input": "word " * 20_000})),
        ("/invocations", "application/json", json.dumps({"input": "x", "stop": ["s" * 100_000]})),
        ("/invocations", "application/jsonlines", "".join(json.dumps(BODY) + "\n" for _ in range(5000))),
        ("/v1/completions", "application/json", json.dumps({"prompt": ["hi"] * 1000, "max_tokens": 4})),
    ]
    statuses: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(rounds):
            for path, kind, body in bodies:
                r = client.post(path, content=body, headers={"content-type": kind})
                statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
    return statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--engine-nice", type=int, default=10, help="the server's --engine-nice")
    parser.add_argument("--levels", default="1,4,10")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--oversized-rounds", type=int, default=10)
    parser.add_argument("--backoffs", default="retry-after,0.05",
                        help="what a refused caller waits before its next request, per pass of the levels: "
                        "'retry-after' (the server's Retry-After, as the OpenAI client does) or seconds")
    add_out_argument(parser, "overload_<model>")
    args = parser.parse_args()
    proc, url = start_server(args)
    capacity = args.max_batch_size + args.max_queue
    try:
        run_level(url, 2, 3, args.max_new_tokens, 0.05)  # warm-up
        rss = {"warm": rss_mb(proc.pid)}
        oversized = oversized_pass(url, args.oversized_rounds)
        rss["after_oversized"] = rss_mb(proc.pid)
        backoffs = [None if b == "retry-after" else float(b) for b in args.backoffs.split(",")]
        levels = [run_level(url, capacity * int(x), args.seconds, args.max_new_tokens, backoff)
                  for backoff in backoffs for x in args.levels.split(",")]  # fmt: skip
        rss["after_levels"] = rss_mb(proc.pid)
        time.sleep(5)
        rss["after_idle"] = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    result = {
        "model": args.model, "capacity": capacity, "engine_nice": args.engine_nice,
        "levels": levels, "oversized_statuses": oversized,
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "rss_after_oversized_vs_warm": round(rss["after_oversized"] / rss["warm"], 3),
    }  # fmt: skip
    result = record(command_line(), result)
    print(json.dumps(result, indent=2))
    save(result, args.out, f"overload_{model_slug(args.model)}")


if __name__ == "__main__":
    main()
