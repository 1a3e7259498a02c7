"""Which CPU kernels to run: torch's (oneDNN/fbgemm) against gpt2serve's C kernels, or the C kernels'
AVX2 build against their AVX-512 build, or against the C kernels of another revision, end to end on this
machine.

Both sides live in one process and their requests alternate, so the machine's load (which moves a
decode step by 10-30 % from minute to minute on a shared host) hits them alike. `--compare families`
loads one engine per kernel family (`--cpu-kernels torch` and `gemv`); `--compare isa` loads one engine
and switches the C library it calls between the AVX2 and the AVX-512 build (same weights, same layout),
so it needs a CPU with AVX-512; `--compare revision` loads one engine and switches between the C library
built from `--base`'s csrc (a git revision, default HEAD) and the one built from the working tree. The
figure is ms per decode step (wall time of a request / new tokens), the median over `--reps` alternations
after a warm-up; request shapes as in bench_engine.py.

    python benchmarks/bench_kernels.py [--compare families|isa|revision] [--base REV] [--model random:gpt2]
        [--precisions float32,bfloat16,int8] [--shapes greedy,beam,seed] [--reps 5] [--out NAME|FILE.json|-]

Prints one JSON object: {"compare", "model", "results": [{precision, shape, <side>_ms..., ratio}], and
what _results.record adds}, ratio = the first side's ms / the second's (above 1: the second, the default,
is faster); written to benchmarks/results/<machine>/kernels_<compare>.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _peers import SHAPES, load_engine, sampling_params  # noqa: E402
from _results import add_out_argument, command_line, record, save  # noqa: E402
from bench_engine import PROMPT  # noqa: E402

from gpt2serve.engine import native  # noqa: E402


def isa_libraries() -> dict:
    """The C library built for each instruction set, loaded side by side."""
    libraries = {}
    for isa in native.ISAS:
        os.environ["GPT2SERVE_KERNEL_ISA"] = isa
        native.library.cache_clear()
        libraries[isa] = native.library()
    del os.environ["GPT2SERVE_KERNEL_ISA"]
    return libraries


GIT = {"capture_output": True, "check": True, "text": True}


def revision_libraries(base: str) -> dict:
    """The C library built from `base`'s csrc ("base": every file that revision has there) and from the
    working tree's ("worktree")."""
    sources, root = native.SOURCES, Path(__file__).resolve().parents[1]
    folder = sources[0].parent.relative_to(root).as_posix()
    listed = subprocess.run(["git", "ls-tree", "--name-only", f"{base}:{folder}"], cwd=root, **GIT)
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(listed.stdout.split()):
            shown = subprocess.run(["git", "show", f"{base}:{folder}/{name}"], cwd=root, **GIT)
            (Path(tmp) / name).write_text(shown.stdout)
        native.SOURCES = sorted(Path(tmp).iterdir())
        native.library.cache_clear()
        libraries = {"base": native.library()}  # built into the kernel cache, so tmp may go
    native.SOURCES = sources
    native.library.cache_clear()
    return libraries | {"worktree": native.library()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", choices=("families", "isa", "revision"), default="families")
    parser.add_argument("--base", default="HEAD", help="the revision --compare revision measures against")
    parser.add_argument("--model", default="random:gpt2")
    parser.add_argument("--precisions", default="float32,bfloat16,int8")
    parser.add_argument("--shapes", default="greedy,beam,seed")
    parser.add_argument("--reps", type=int, default=5)
    add_out_argument(parser, "kernels_<compare>")
    args = parser.parse_args(argv)
    if args.compare == "isa" and native.isa() != "avx512":
        sys.exit("--compare isa needs a CPU with AVX-512")
    libraries = {}
    if args.compare == "isa":
        libraries = isa_libraries()
    elif args.compare == "revision":
        libraries = revision_libraries(args.base)
    current = [next(iter(libraries), None)]
    if libraries:
        native.library = lambda: libraries[current[0]]  # decode and gemv look the library up per call
    results = []
    for precision in args.precisions.split(","):
        if args.compare == "families":
            engines = {side: load_engine(args.model, precision, 2, side) for side in ("torch", "gemv")}
        else:
            engine = load_engine(args.model, precision, 2, "gemv")
            engines = {side: engine for side in libraries}
        for shape in args.shapes.split(","):
            p = sampling_params(SHAPES[shape], seed=1)
            times: dict[str, list[float]] = {side: [] for side in engines}
            for rep in range(args.reps + 1):  # the first round warms up
                for side, engine in engines.items():
                    current[0] = side
                    start = time.perf_counter()
                    engine.generate_sync(PROMPT, p)
                    if rep:
                        times[side].append((time.perf_counter() - start) / p.max_new_tokens * 1e3)
            ms = {side: round(statistics.median(v), 2) for side, v in times.items()}
            first, second = list(ms)
            row = {"precision": precision, "shape": shape, **{f"{s}_ms": v for s, v in ms.items()}}
            row["ratio"] = round(ms[first] / ms[second], 2)
            print(json.dumps(row), file=sys.stderr, flush=True)
            results.append(row)
        for engine in set(engines.values()):
            engine.stop()
    report = {
        "compare": args.compare,
        **({"base": args.base} if args.compare == "revision" else {}),
        "model": args.model,
        "reps": args.reps,
        "results": results,
    }
    report = record(command_line(argv), report)
    print(json.dumps(report, indent=1))
    save(report, args.out, f"kernels_{args.compare}")


if __name__ == "__main__":
    main()
