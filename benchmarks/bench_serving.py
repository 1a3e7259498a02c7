"""Serving benchmark: concurrent streaming clients against a gpt2serve server (or llama.cpp's).

    python benchmarks/bench_serving.py [--url http://127.0.0.1:8080] [--model random:gpt2] [--clients 1,16]
                                       [--requests 32] [--max-tokens 32] [--prompt-tokens 0]
                                       [--api openai|native] [--temperature 0] [--device cpu]
                                       [--max-batch-size 32] [--threads N] [--dtype float32]
                                       [--ray-replicas 0,1,2 | --servers plain,llamacpp [--gguf F]]
                                       [--rounds 3]
                                       [--out NAME|FILE.json|-]

Without --url it starts a server itself (the container entry point, on a free loopback port, serving
--model) and stops it at the end. For each concurrency level in --clients, that many clients send
--requests streamed requests in all, back to back (each client starts its next request when the last one
ends), after one warm-up request.

Per level: requests/s, generated tokens/s over the level's wall time, time to first token (request sent
-> first text piece) p50/p99, and per-token latency ((last piece - first piece) / (tokens - 1), per
request) p50/p99. Tokens are counted by the server (OpenAI stream with `include_usage`); a stream without
usage (llama.cpp's) that ends for "length" has --max-tokens; otherwise (and for the native stream) the
generated text is tokenized with the bundled GPT-2 tokenizer. Prints one JSON object (and
writes it to benchmarks/results/<machine>/serving_<model>.json, or where --out says); its `scaling` field
gives tokens/s and requests/s of the last level relative to the first. Each level also records the
1-minute load average at its end: on a busy machine, compare levels only at similar load.

--ray-replicas compares servers on the same requests: 0 is a plain `gpt2serve serve`, N is
`gpt2serve serve --ray --replicas N` (Ray Serve's proxy in front of N replicas, each an engine on
--threads threads, default 1; the same model and --max-batch-size), each started here in turn, --rounds
times alternated; the report gives each server's levels per round and their medians, and the Ray proxy's
overhead per request: the median over rounds of (1 replica - plain) in request latency and time to first
token at the first level (use 1 client, where nothing queues). Results go to serving_<model>_ray.json.

--servers names the servers to compare the same way: plain, ray-N, and llamacpp: llama-cpp-python's
`python -m llama_cpp.server` (the `[llamacpp]` extra with its `[server]` part) on the --gguf file, by
default --model converted by llama.cpp's convert_hf_to_gguf.py at --dtype (F32, BF16 or Q8_0, see
_llamacpp.py), on --threads threads (default 2), with `--interrupt_requests False` so that concurrent
requests queue (it runs one request at a time; by default a new request ends the streaming one early).
Results go to serving_<model>_llamacpp.json, with gpt2serve's tokens/s over llama.cpp's per level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from _llamacpp import server_command as llamacpp_command
from _llamacpp import tensor_types
from _results import add_out_argument, command_line, model_slug, record, save

SRC = Path(__file__).resolve().parents[1] / "src"
PROMPT = "Request {i}: the history of the printing press begins in"
FILLER = (
    " Movable type spread from Mainz to Venice, Paris and London within a few decades, and with it cheap"
    " books, pamphlets and newspapers that changed how people learned, argued and worshipped."
)


@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    tpot: float | None = None
    tokens: int = 0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(min(rank, len(ordered))) - 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(args: argparse.Namespace, port: int, server: str) -> list[str]:
    """`gpt2serve serve` (the container entry point) for "plain", `gpt2serve serve --ray --replicas N` for
    "ray-N", llama.cpp's server for "llamacpp"."""
    if server == "llamacpp":
        return llamacpp_command(gguf_file(args), port, args.threads or 2)
    replicas = int(server.removeprefix("ray-")) if server.startswith("ray-") else 0
    where = ["gpt2serve.cli", "serve", "--ray", "--replicas", str(replicas)] if replicas else \
        ["gpt2serve.api.container", "serve"]  # fmt: skip
    threads = ["--threads", str(args.threads)] if args.threads else []
    dtype = ["--dtype", args.dtype] if args.dtype else []
    return [sys.executable, "-m", *where, "--host", "127.0.0.1", "--port", str(port), "--model", args.model,
            "--device", args.device, "--max-batch-size", str(args.max_batch_size), "--log-level", "warning",
            *threads, *dtype]  # fmt: skip


def gguf_file(args: argparse.Namespace) -> Path:
    """--gguf, else --model converted at --dtype (bench_engine.py's conversion, kept between runs)."""
    if args.gguf:
        return Path(args.gguf)
    from bench_engine import peer_dirs

    precision = args.dtype or "float32"
    cache = Path(tempfile.gettempdir()) / "gpt2serve-bench"
    return peer_dirs(args.model, ["llamacpp"], [precision], cache)[f"gguf-{precision}"]


def start_server(args: argparse.Namespace, server: str = "plain") -> tuple[subprocess.Popen, str, object]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    log = tempfile.TemporaryFile()
    cmd = server_command(args, port, server)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    ready = "/v1/models" if server == "llamacpp" else "/ping"  # llama.cpp's server has no /ping
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{output}")
        try:
            if httpx.get(url + ready, timeout=2).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise TimeoutError(f"the server did not answer {ready} with 200 within {args.start_timeout} s")


def prompt_for(args: argparse.Namespace, i: int, tokenizer) -> str:
    """Request i's prompt: PROMPT, or with --prompt-tokens N, PROMPT and filler cut to N tokens."""
    prompt = PROMPT.format(i=i)
    if not args.prompt_tokens:
        return prompt
    ids = tokenizer.encode(prompt + FILLER * (args.prompt_tokens // 20 + 1))[: args.prompt_tokens]
    return tokenizer.decode(ids)


def request_for(args: argparse.Namespace, i: int, tokenizer) -> tuple[str, dict]:
    prompt = prompt_for(args, i, tokenizer)
    if args.api == "openai":
        body = {"model": "gpt-2", "prompt": prompt, "max_tokens": args.max_tokens, "stream": True,
                "temperature": args.temperature, "seed": i,
                "stream_options": {"include_usage": True}}  # fmt: skip
        return "/v1/completions", body
    mode = {"mode": "greedy"}
    if args.temperature > 0:
        mode = {"mode": "sample", "temperature": args.temperature, "top_k": 0, "top_p": 1.0, "seed": i}
    body = {"input": prompt, "max_new_tokens": args.max_tokens, "num_return_sequences": 1, "stream": True}
    body.update(mode)
    return "/invocations", body


async def one_request(client: httpx.AsyncClient, args: argparse.Namespace, i: int, tokenizer) -> Sample:
    path, body = request_for(args, i, tokenizer)
    started = time.perf_counter()
    first = last = finish = None
    tokens, text = 0, ""
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Sample(ok=False)
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return Sample(ok=False)
            piece = data["choices"][0]["text"] if data.get("choices") else data.get("text", "")
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data.get("choices"):
                finish = data["choices"][0].get("finish_reason") or finish
            if piece:
                last = time.perf_counter()
                first = first or last
                text += piece
    if first is None:
        return Sample(ok=False)
    if args.api == "native":
        tokens = len(tokenizer.encode(text[len(body["input"]) :]))
    elif not tokens:  # no usage in the stream (llama.cpp's server)
        tokens = args.max_tokens if finish == "length" else len(tokenizer.encode(text))
    tpot = (last - first) / (tokens - 1) if tokens > 1 else None
    return Sample(ok=True, ttft=first - started, latency=last - started, tpot=tpot, tokens=tokens)


async def run_level(url: str, args: argparse.Namespace, clients: int, tokenizer) -> dict:
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        await one_request(client, args, -1, tokenizer)  # warm-up
        counter = iter(range(args.requests))
        samples: list[Sample] = []

        async def worker() -> None:
            for i in counter:
                samples.append(await one_request(client, args, i, tokenizer))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    good = [s for s in samples if s.ok]
    tokens = sum(s.tokens for s in good)
    ttft = [s.ttft * 1000 for s in good]
    latency = [s.latency * 1000 for s in good]
    tpot = [s.tpot * 1000 for s in good if s.tpot is not None]

    def ms(values: list[float], q: float) -> float | None:
        v = percentile(values, q)
        return None if v is None else round(v, 2)

    return {
        "clients": clients, "requests": len(samples), "errors": len(samples) - len(good),
        "wall_s": round(wall, 3), "requests_per_s": round(len(good) / wall, 3),
        "generated_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
        "ttft_ms": {"p50": ms(ttft, 50), "p99": ms(ttft, 99)},
        "latency_ms": {"p50": ms(latency, 50), "p99": ms(latency, 99)},
        "per_token_ms": {"p50": ms(tpot, 50), "p99": ms(tpot, 99)},
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews the numbers
    }  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server; without it one is started with --model")
    p.add_argument("--model", default="random:gpt2", help="model for the server started here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="the server's --threads (default: its own)")
    p.add_argument("--ray-replicas", default=None,
                   help="compare servers: comma-separated, 0 plain serve, N serve --ray --replicas N")
    p.add_argument("--servers", default=None,
                   help="compare servers: comma-separated, plain, ray-N (serve --ray --replicas N), llamacpp")
    p.add_argument("--gguf", help="llamacpp's model file (default: --model converted at --dtype)")
    p.add_argument("--dtype", default=None, help="the server's --dtype (default: its own; llamacpp: float32)")
    p.add_argument("--rounds", type=int, default=1, help="comparing servers: rounds of every server")
    p.add_argument("--clients", default="1,16", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--prompt-tokens", type=int, default=0, help="prompt length in tokens (0: ~12)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--api", choices=("openai", "native"), default="openai")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    p.add_argument("--start-timeout", type=float, default=300.0)
    add_out_argument(p, "serving_<model>")
    return p.parse_args(argv)


def run_levels(args: argparse.Namespace, levels: list[int], tokenizer, server: str = "plain") -> list[dict]:
    """Every level against --url, or a server started here (see `server_command`) and stopped after."""
    proc = log = None
    url = args.url
    if url is None:
        proc, url, log = start_server(args, server)
    try:
        return [asyncio.run(run_level(url.rstrip("/"), args, c, tokenizer)) for c in levels]
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def median(values: list[float | None]) -> float | None:
    ordered = sorted(v for v in values if v is not None)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return round(ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2, 2)


def server_name(replicas: int) -> str:
    return f"ray-{replicas}" if replicas else "plain"


MEDIANS = {"tokens_per_s": ("tokens_per_s",), "latency_p50_ms": ("latency_ms", "p50"),
           "ttft_p50_ms": ("ttft_ms", "p50"), "per_token_p50_ms": ("per_token_ms", "p50")}  # fmt: skip


def level_value(level: dict, path: tuple[str, ...]):
    for key in path:
        level = level[key]
    return level


def medians(rounds: list[list[dict]]) -> list[dict]:
    """Per level, the median over rounds of tokens/s and the p50 latencies."""
    return [{"clients": runs[0]["clients"], "errors": sum(r["errors"] for r in runs),
             **{k: median([level_value(r, path) for r in runs]) for k, path in MEDIANS.items()}}
            for runs in zip(*rounds)]  # fmt: skip


def compare_servers(args: argparse.Namespace, servers: list[str], levels: list[int], tokenizer) -> dict:
    """Each server's rounds (alternated) and medians; the Ray proxy's overhead (plain and ray-1), and
    gpt2serve's tokens/s over llama.cpp's per level (plain and llamacpp)."""
    rounds: dict[str, list[list[dict]]] = {name: [] for name in servers}
    for _ in range(args.rounds):
        for name in servers:
            rounds[name].append(run_levels(args, levels, tokenizer, name))
    report: dict = {name: {"rounds": rounds[name], "median": medians(rounds[name])} for name in servers}
    if "plain" in rounds and "ray-1" in rounds:
        pairs = list(zip(rounds["plain"], rounds["ray-1"]))
        overhead = {f"{key}_p50": median([b[0][key]["p50"] - a[0][key]["p50"] for a, b in pairs])
                    for key in ("latency_ms", "ttft_ms")}  # fmt: skip
        report["ray_proxy_overhead_ms"] = {"clients": levels[0], **overhead}
    if "plain" in rounds and "llamacpp" in rounds:
        pairs = zip(report["plain"]["median"], report["llamacpp"]["median"])
        report["tokens_per_s_vs_llamacpp"] = [
            {"clients": a["clients"], "ratio": round(a["tokens_per_s"] / b["tokens_per_s"], 2)}
            for a, b in pairs if a["tokens_per_s"] and b["tokens_per_s"]]  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    sys.path.insert(0, str(SRC))
    from gpt2serve.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.bundled()
    servers = args.servers.split(",") if args.servers else None
    if args.ray_replicas is not None:
        servers = [server_name(int(n)) for n in args.ray_replicas.split(",")]
    if servers:
        report = {"api": args.api, "max_tokens": args.max_tokens, "temperature": args.temperature,
                  "model": args.model, "dtype": args.dtype, "max_batch_size": args.max_batch_size,
                  "threads": args.threads or 1}  # fmt: skip
        report["servers"] = compare_servers(args, servers, levels, tokenizer)
        if "llamacpp" in servers:
            report["llamacpp_server"] = " ".join(server_command(args, 0, "llamacpp")[1:])
            report["gguf_tensor_types"] = tensor_types(gguf_file(args))
        report = record(command_line(argv), report)
        print(json.dumps(report, indent=2))
        suffix = "llamacpp" if "llamacpp" in servers else "ray"
        save(report, args.out, f"serving_{model_slug(args.model)}_{suffix}")
        return
    results = run_levels(args, levels, tokenizer)
    first, last = results[0], results[-1]

    def ratio(key: str) -> float | None:
        return round(last[key] / first[key], 2) if first[key] else None

    report = {
        "url": args.url or f"(started here) {args.model} on {args.device}",
        "api": args.api, "max_tokens": args.max_tokens, "temperature": args.temperature,
        "prompt_tokens": args.prompt_tokens or None,
        "levels": results,
        "scaling": {
            "clients": f"{first['clients']} -> {last['clients']}",
            "tokens_per_s_ratio": ratio("tokens_per_s"),
            "requests_per_s_ratio": ratio("requests_per_s"),
        },
    }  # fmt: skip
    report = record(command_line(argv), report)
    print(json.dumps(report, indent=2))
    save(report, args.out, f"serving_{model_slug(args.model)}")


if __name__ == "__main__":
    main()
