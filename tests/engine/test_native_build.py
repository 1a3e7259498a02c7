"""Building the C kernels: from scratch into the cache directory; torch's kernels where that fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
print(native.available(), layer.kernel)
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
    assert _probe(tmp_path) == ["True", "gemv"]
    built = list(tmp_path.glob("kernels-*.so"))
    assert len(built) == 1 and built[0].stat().st_size > 0
    assert _probe(tmp_path) == ["True", "gemv"]  # the second process loads the cached library
    assert list(tmp_path.glob("kernels-*.so")) == built


def test_without_a_compiler_torch_kernels_serve(tmp_path: Path) -> None:
    assert _probe(tmp_path, CC=str(tmp_path / "no-such-compiler")) == ["False", "mkldnn_packed"]
    assert not list(tmp_path.glob("*.so"))  # nothing left behind
