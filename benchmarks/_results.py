"""Where a benchmark's JSON goes, and what it records besides its figures.

Every script adds the same five keys to the JSON it prints (`record`): "benchmark" (the script), "commit"
(the checkout's `git rev-parse --short HEAD`, and "dirty" when tracked files differ from it), "date" (UTC,
ISO 8601), "command" (the command line) and "machine" (`machine_info`: CPU model, family and model
number, SIMD flags, cores, memory, read bandwidth, library versions). Its own figures follow.

Results live in `benchmarks/results/<machine>/<name>.json`, one folder per kind of CPU (`machine_folder`:
"zen5", "zen4", "zen3-avx2"...), so a re-run on the same kind of machine replaces the file it re-measures
and git shows what moved. `--out` in every script: a name ("engine_gpt2_run2") goes in that folder, a path
ending in .json is used as it is, "-" writes no file; the default is the script's own name.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
# The flags that decide which kernels run (gemv.c's builds, oneDNN's bf16/VNNI paths, AMX).
SIMD_FLAGS = re.compile(r"^(sse4_[12]|avx.*|fma|f16c|amx.*)$")
VERSIONED = ("torch", "transformers", "ctranslate2", "llama_cpp_python")


def lscpu() -> dict[str, str]:
    """`lscpu`'s "Field: value" lines (empty where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _mem_gb() -> float | None:
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal"))
    except (OSError, StopIteration):
        return None
    return round(int(line.split()[1]) / 1e6, 1)


def cpu_identity() -> dict:
    """The CPU from `lscpu`: model name, vendor, family and model numbers, SIMD flags, cores."""
    cpu = lscpu()
    return {
        "cpu": cpu.get("Model name", platform.processor()),
        "vendor": cpu.get("Vendor ID"),
        "cpu_family": cpu.get("CPU family"),
        "cpu_model": cpu.get("Model"),
        "cores": os.cpu_count(),
        "flags": sorted(f for f in cpu.get("Flags", "").split() if SIMD_FLAGS.match(f)),
    }


def machine_info(read_gbps: float | None = None) -> dict:
    """This machine, as every result records it. `read_gbps`: the read bandwidth the script measured
    (bench_roofline.py), else it is measured here (a few seconds)."""
    if read_gbps is None:
        from bench_roofline import measure_read_bandwidth

        read_gbps = measure_read_bandwidth(gb=0.5, repeats=5)
    info = cpu_identity()
    versions = {name: _version(name) for name in VERSIONED}
    return info | {
        "mem_GB": _mem_gb(),
        "read_GBps": round(read_gbps, 2),
        "python": platform.python_version(),
        **versions,
        "folder": machine_folder(info),
    }


def _amd_core(family: int, model: int) -> str | None:
    """AMD's core generation from the CPU family and model numbers (None where not known here)."""
    if family == 23:
        return "zen1" if model < 0x30 else "zen2"
    if family == 25:
        return "zen4" if 0x10 <= model < 0x20 or 0x60 <= model < 0xB0 else "zen3"
    if family == 26:
        return "zen5"
    return None


def machine_folder(info: dict) -> str:
    """The results folder for this kind of CPU: "zen5", "zen4", "zen3-avx2", "intel-f6m143"...; "-avx2"
    (or "-sse") when the CPU has no AVX-512, since the kernels then take another build."""
    try:
        family, model = int(info["cpu_family"]), int(info["cpu_model"])
    except (KeyError, TypeError, ValueError):
        family = model = -1
    vendor = (info.get("vendor") or "").lower()
    name = _amd_core(family, model) if "amd" in vendor else None
    if name is None:
        short = "amd" if "amd" in vendor else "intel" if "intel" in vendor else vendor or "cpu"
        name = f"{short}-f{family}m{model}" if family >= 0 else short
    flags = set(info.get("flags", []))
    if "avx512f" not in flags:
        name += "-avx2" if "avx2" in flags else "-sse"
    return name


def git_commit() -> tuple[str, bool]:
    """(short commit, whether tracked files differ from it); ("unknown", False) outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)  # fmt: skip
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown", False
    if head.returncode:
        return "unknown", False
    return head.stdout.strip(), bool(status.stdout.strip())


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran: `python <script relative to the repository> <arguments>`, after the
    `GPT2SERVE_KERNEL_ISA=...` that picked the C kernels' build where it was set."""
    argv = sys.argv if argv is None else [sys.argv[0], *argv]
    script = Path(argv[0]).resolve()
    shown = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    isa = os.environ.get("GPT2SERVE_KERNEL_ISA")
    return " ".join([*([f"GPT2SERVE_KERNEL_ISA={isa}"] if isa else []), "python", str(shown), *argv[1:]])


def record(command: str, results: dict, *, read_gbps: float | None = None) -> dict:
    """`results` with what every result records first: benchmark, commit, dirty, date, command, machine."""
    commit, dirty = git_commit()
    script = next((word for word in command.split() if word.endswith(".py")), command)
    return {
        "benchmark": Path(script).stem,
        "commit": commit,
        "dirty": dirty,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "machine": machine_info(read_gbps),
        **results,
    }


def result_path(name: str, folder: str | None = None) -> Path:
    """`benchmarks/results/<folder>/<name>.json`; `folder` defaults to this machine's."""
    if folder is None:
        folder = machine_folder(cpu_identity())
    return RESULTS / folder / f"{name}.json"


def out_path(out: str | None, default_name: str, report: dict) -> Path | None:
    """Where `--out` asks for `report` to go: None for "-", a path ending in .json as given, else
    the name (or `default_name`) in the folder of the machine `report` records."""
    if out == "-":
        return None
    if out and out.endswith(".json"):
        return Path(out)
    return result_path(out or default_name, report["machine"]["folder"])


def save(report: dict, out: str | None, default_name: str) -> Path | None:
    """Write `report` where `--out` says (see `out_path`) and say so on standard error."""
    path = out_path(out, default_name, report)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return path


def add_out_argument(parser, default_name: str) -> None:
    """The `--out` every script takes (see the module docstring)."""
    parser.add_argument(
        "--out",
        help=f"a name in benchmarks/results/<machine>/ (default: {default_name}), a path ending in .json, "
        "or - for no file",
    )


def model_slug(spec: str) -> str:
    """The model part of a default name: "random:gpt2-xl" -> "gpt2-xl", a checkpoint directory -> its name."""
    return spec.split(":", 1)[1] if spec.startswith("random:") else Path(spec.rstrip("/")).name
