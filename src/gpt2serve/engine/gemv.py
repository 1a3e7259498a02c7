"""The few-row matrix kernels of gemv.c: built with the system C compiler on first use, loaded with ctypes.

They stream a weight matrix at the machine's read bandwidth where oneDNN's and MKL's small-batch paths
reach about two thirds of it (AVX2 CPUs, see linear.py). The shared library is cached under
`$GPT2SERVE_CACHE_DIR` (default `~/.cache/gpt2serve`, else the temporary directory), keyed by a hash of
the source and the compile command (`$CC`, else `cc`). Without a C compiler, or on a CPU without AVX2 and
FMA, `available()` is false and the caller keeps torch's kernels (`--cpu-kernels torch` chooses them).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
FORMAT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}
K_MULTIPLE = 8  # the kernels read 8 weights at a time


def _cache_dirs() -> list[Path]:
    configured = os.environ.get("GPT2SERVE_CACHE_DIR")
    if configured:
        return [Path(configured)]
    return [Path.home() / ".cache" / "gpt2serve", Path(tempfile.gettempdir()) / "gpt2serve"]


def _build(compiler: str) -> Path:
    """The compiled library, from the cache or compiled now (written to a temporary name, then renamed,
    so concurrent builds never load a partial file)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    errors = []
    for folder in _cache_dirs():
        target = folder / f"gemv-{key}.so"
        if target.exists():
            return target
        tmp = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            subprocess.run(
                [compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120
            )
            os.replace(tmp, target)
            return target
        except (OSError, subprocess.SubprocessError) as exc:
            stderr = getattr(exc, "stderr", b"") or b""
            errors.append(f"{folder}: {exc} {stderr.decode(errors='replace')[-500:]}")
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError("; ".join(errors))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with the reason logged once) where they cannot be used here."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("gemv kernels off: the CPU lacks AVX2/FMA")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("gemv kernels off: no C compiler (cc) found; using torch's kernels")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except OSError as exc:
        log.warning("gemv kernels off: building %s failed: %s", SOURCE.name, exc)
        return None
    fn = lib.gpt2serve_gemv
    fn.restype = ctypes.c_int
    p, i = ctypes.c_void_p, ctypes.c_int
    fn.argtypes = [i, p, i, i, p, p, p, p, i, i]
    return lib


def available() -> bool:
    return library() is not None


def gemv(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """(M, K) float32 @ weight (N, K)^T, times `scale` (N,) per column if given, plus `bias` (N,).

    `weight` is float32, bfloat16, float16 or int8, contiguous, with K a multiple of 8; `x` is float32."""
    lib = library()
    if lib is None:
        raise RuntimeError("the gemv kernels are not available on this machine")
    rows, (n, k) = x.shape[0], weight.shape
    if not weight.is_contiguous() or weight.dtype not in FORMAT_CODES:
        raise ValueError(f"gemv needs a contiguous weight of {list(FORMAT_CODES)}, got {weight.dtype}")
    if k % K_MULTIPLE or x.shape[1] != k or x.dtype != torch.float32:
        raise ValueError(f"gemv needs float32 x (M, K) and K a multiple of 8: x {tuple(x.shape)}, K {k}")
    x = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(rows, n, dtype=torch.float32)
    if rows == 0:
        return y
    rc = lib.gpt2serve_gemv(
        FORMAT_CODES[weight.dtype],
        x.data_ptr(),
        rows,
        k,
        weight.data_ptr(),
        None if scale is None else scale.data_ptr(),
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        n,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"gemv refused x {tuple(x.shape)} @ weight {tuple(weight.shape)} {weight.dtype}")
    return y
