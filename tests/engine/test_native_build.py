"""Building the C kernels: from scratch into the cache directory; torch's kernels where that fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2serve.engine import native
from tests.engine.test_linear import NO_GEMV

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import torch
from gpt2serve.engine import native
from tests.engine.test_linear import NO_GEMV
from gpt2serve.engine.linear import PackedLinear
weight, bias, x = torch.randn(64, 32), torch.randn(32), torch.randn(3, 64)
layer = PackedLinear(weight, bias, "float32", kernels="gemv")
assert torch.allclose(layer(x), x @ weight + bias, atol=1e-5)
for fmt in ("float32", "bfloat16", "int8") if native.available() else ():  # gemv.c's weight-only formats
    for rows in (1, 3, 5, 8, 9):
        w, x = torch.randn(72, 101), torch.randn(rows, 72)  # 72: the 16-wide loop and an 8-wide step
        got = PackedLinear(w, bias=None, fmt=fmt, kernels="gemv")(x).double()
        ref = x.double() @ w.double()
        assert (got - ref).norm() / ref.norm() < {"float32": 1e-6, "bfloat16": 5e-3, "int8": 1e-2}[fmt]
print(native.available(), layer.kernel, native.isa())
"""


def _probe(tmp_path: Path, **env: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "GPT2SERVE_CACHE_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return out.stdout.split()


@pytest.mark.skipif(not native.available(), reason=NO_GEMV)
def test_builds_from_scratch_into_the_cache_dir(tmp_path: Path) -> None:
    assert _probe(tmp_path) == ["True", "gemv", native.isa()]
    built = list(tmp_path.glob("kernels-*.so"))
    assert len(built) == 1 and built[0].stat().st_size > 0
    assert _probe(tmp_path) == ["True", "gemv", native.isa()]  # the second process loads the cached library
    assert list(tmp_path.glob("kernels-*.so")) == built


NO_AVX512 = "needs a CPU with AVX-512 (F, BW, VL, DQ), GPT2SERVE_KERNEL_ISA unset"


@pytest.mark.skipif(native.isa() != "avx512", reason=NO_AVX512)
def test_the_avx2_build_on_an_avx512_cpu(tmp_path: Path) -> None:
    assert _probe(tmp_path, GPT2SERVE_KERNEL_ISA="avx2") == ["True", "gemv", "avx2"]
    assert _probe(tmp_path) == ["True", "gemv", "avx512"]
    assert len(list(tmp_path.glob("kernels-*.so"))) == 2  # one library per instruction set


@pytest.mark.skipif(native.isa() is None, reason=NO_GEMV)
def test_the_instruction_set_is_at_most_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPT2SERVE_KERNEL_ISA", "avx2")
    assert native.isa() == "avx2"
    monkeypatch.setenv("GPT2SERVE_KERNEL_ISA", "avx512")
    assert native.isa() == ("avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2")
    monkeypatch.setenv("GPT2SERVE_KERNEL_ISA", "sse2")
    with pytest.raises(ValueError, match="GPT2SERVE_KERNEL_ISA"):
        native.isa()


def test_without_a_compiler_torch_kernels_serve(tmp_path: Path) -> None:
    assert _probe(tmp_path, CC=str(tmp_path / "no-such-compiler")) == ["False", "mkldnn_packed", native.isa()]
    assert not list(tmp_path.glob("*.so"))  # nothing left behind


@pytest.mark.skipif(native.isa() != "avx512", reason=NO_AVX512)
def test_a_compiler_without_avx512_gets_the_avx2_build(tmp_path: Path) -> None:
    compiler = tmp_path / "cc-without-avx512"
    refuse = 'case "$*" in *-mavx512f*) exit 1;; esac'
    compiler.write_text(f'#!/bin/sh\n{refuse}\nexec {native.compiler()} "$@"\n')
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    assert _probe(cache, CC=str(compiler))[:2] == ["True", "gemv"]
    assert len(list(cache.glob("kernels-*.so"))) == 1
