"""Cold start and memory of `gpt2serve serve`: seconds from launch to /ping 200, and peak RSS (VmHWM).

The server runs as a subprocess on a free 127.0.0.1 port; its /proc/<pid>/status is read while it loads,
after /ping turns 200 and after a first (default) /invocations request. If the server does not come up,
`Engine.load` plus a first generation is measured in a subprocess instead, and the report says so.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The quick brown fox jumps over the lazy"
READY_TIMEOUT_S = 600.0
BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}
ENGINE_ONLY = """
import sys, time
t0 = time.perf_counter()
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.engine import Engine
from gpt2serve.engine.params import SamplingParams
e = Engine.load(sys.argv[1], EngineConfig(dtype=sys.argv[2], max_batch_size=8)); e.start()
t1 = time.perf_counter()
e.generate_sync(sys.argv[3], SamplingParams(max_new_tokens=8))
print(t1 - t0, time.perf_counter() - t1, flush=True)
e.stop()
"""


def _env() -> dict[str, str]:
    src = str(ROOT / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: bytes | None = None, timeout: float = 1.0) -> int:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return 0


def runtime_floor_mb() -> float:
    """Peak RSS of a Python that only imports torch and the server app: what any model adds to."""
    code = "import torch, gpt2serve.api.app; print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True).stdout
    kb = next((int(line.split()[1]) for line in out.splitlines() if line.startswith("VmHWM:")), 0)
    return round(kb / 1024, 1)


def _serve_command(spec: str, dtype: str, port: int) -> list[str]:
    flags = {"--model": spec, "--port": str(port), "--host": "127.0.0.1", "--device": "cpu", "--dtype": dtype,
             "--request-timeout-s": "590", "--log-level": "warning"}  # fmt: skip
    return [sys.executable, "-m", "gpt2serve.cli", "serve", *(x for kv in flags.items() for x in kv)]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def serve_cold_start(spec: str, dtype: str) -> dict:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            _serve_command(spec, dtype, port), env=_env(), stdout=log, stderr=log, text=True
        )
        try:
            while _get(base + "/ping") != 200:
                if proc.poll() is not None or time.perf_counter() - start > READY_TIMEOUT_S:
                    log.seek(0)
                    return {
                        "ok": False,
                        "error": (log.read() if proc.poll() is not None else "timeout")[-500:],
                    }
                time.sleep(0.05)
            ready_s = time.perf_counter() - start
            hwm_ready, rss_ready = _status_kb(proc.pid, "VmHWM"), _status_kb(proc.pid, "VmRSS")
            t = time.perf_counter()
            body = json.dumps({"input": PROMPT}).encode()
            status = _get(base + "/invocations", body, timeout=READY_TIMEOUT_S)
            first_s = time.perf_counter() - t
            hwm = _status_kb(proc.pid, "VmHWM")
        finally:
            _stop(proc)
    return {
        "ok": True,
        "how": "gpt2serve serve -> GET /ping 200",
        "ready_s": round(ready_s, 2),
        "rss_at_ready_MB": round(rss_ready / 1024, 1),
        "peak_rss_at_ready_MB": round(hwm_ready / 1024, 1),
        "first_request_s": round(first_s, 2),
        "first_request_status": status,
        "peak_rss_MB": round(hwm / 1024, 1),
    }


def engine_cold_start(spec: str, dtype: str) -> dict:
    """The fallback: Engine.load + a first 8-token generation in a fresh interpreter."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", ENGINE_ONLY, spec, dtype, PROMPT],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    hwm = 0
    while proc.poll() is None:
        hwm = max(hwm, _status_kb(proc.pid, "VmHWM"))
        time.sleep(0.05)
    out = proc.stdout.read().split()
    if proc.returncode or len(out) < 2:
        return {"ok": False, "error": proc.stderr.read()[-500:]}
    return {
        "ok": True,
        "how": "Engine.load + first generation (subprocess)",
        "ready_s": round(float(out[0]), 2),
        "first_request_s": round(float(out[1]), 2),
        "process_s": round(time.perf_counter() - start, 2),
        "peak_rss_MB": round(hwm / 1024, 1),
    }


def cold_start_report(spec: str, precisions: list[str], cfg, log) -> dict:
    floor = runtime_floor_mb()
    rows = []
    for dtype in precisions:
        row = serve_cold_start(spec, dtype)
        if not row["ok"]:
            log(f"serve failed for {dtype}: {row.get('error')}; measuring Engine.load instead")
            row = {"serve_error": row.get("error"), **engine_cold_start(spec, dtype)}
        weights_mb = cfg.n_params * BYTES[dtype] / 2**20
        row |= {
            "dtype": dtype,
            "weights_MB": round(weights_mb, 1),
            "peak_rss_over_weights": round(row.get("peak_rss_MB", 0) / weights_mb, 2),
            "peak_rss_minus_runtime_over_weights": round((row.get("peak_rss_MB", 0) - floor) / weights_mb, 2),
        }
        log(f"cold start {spec} {dtype}: {row}")
        rows.append(row)
    return {"model": spec, "runtime_floor_MB": floor, "runs": rows}
