"""Memory bandwidth roofline: how fast this machine streams bytes from RAM.

GPT-2 decoding on a CPU is bound by reading the weights once per step, so the read bandwidth measured
here divided into the weight bytes is the best possible step time. Prints JSON
`{"read_GBps": ..., "copy_GBps": ..., ...}` with what _results.record adds, and writes it to
benchmarks/results/<machine>/roofline.json (or where --out says); other benchmarks import
`measure_read_bandwidth()`.

    python benchmarks/bench_roofline.py [--gb 1.0] [--repeats 7] [--threads N] [--out NAME|FILE.json|-]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _results import add_out_argument, command_line, record, save


def cpu_busy(interval_s: float = 0.1) -> float:
    """Fraction of the machine's CPU time spent busy over `interval_s` (Linux /proc/stat; 0 elsewhere)."""
    if not Path("/proc/stat").exists():
        return 0.0

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # idle + iowait

    total0, idle0 = sample()
    time.sleep(interval_s)
    total1, idle1 = sample()
    return 1 - (idle1 - idle0) / max(1, total1 - total0)


def foreign_cpu_ticks() -> int:
    """CPU ticks used so far by every process but this one (Linux; 0 elsewhere): a contention meter."""
    if not Path("/proc/stat").exists():
        return 0
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return sum(ticks) - ticks[3] - ticks[4] - int(own[11]) - int(own[12])  # minus idle, iowait, utime, stime


def wait_for_quiet(max_wait_s: float = 20.0, threshold: float = 0.15) -> bool:
    """Wait (bounded) until other processes leave the CPUs idle, as the machine may be shared."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        if cpu_busy() <= threshold:
            return True
    return False


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread pool start
    times = []
    for _ in range(repeats):
        wait_for_quiet(max_wait_s=5.0)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_read_bandwidth(gb: float = 1.0, repeats: int = 7) -> float:
    """Read bandwidth in GB/s (1e9 bytes/s): the median time of `sum()` over a `gb`-GB float32 tensor."""
    x = torch.ones(int(gb * 1e9) // 4, dtype=torch.float32)
    seconds = _median_seconds(lambda: x.sum(), repeats)
    return x.numel() * 4 / seconds / 1e9


def measure_copy_bandwidth(gb: float = 1.0, repeats: int = 7) -> float:
    """Copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.ones(int(gb * 1e9) // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="tensor size in GB")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_out_argument(parser, "roofline")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    read = measure_read_bandwidth(args.gb, args.repeats)
    copy = measure_copy_bandwidth(args.gb, args.repeats)
    gpt2_fp32_bytes = 124.4e6 * 4
    report = {
        "read_GBps": round(read, 2),
        "copy_GBps": round(copy, 2),
        "threads": torch.get_num_threads(),
        "gb": args.gb,
        "gpt2_fp32_step_ms_at_read_bw": round(gpt2_fp32_bytes / (read * 1e9) * 1e3, 2),
    }
    report = record(command_line(), report, read_gbps=read)
    print(json.dumps(report))
    save(report, args.out, "roofline")


if __name__ == "__main__":
    main()
