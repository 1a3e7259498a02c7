"""PackedLinear computes x @ W + b in every weight format, for 2-D and 3-D inputs and the tied LM head."""

from __future__ import annotations

import sys

import pytest
import torch

from gpt2serve.engine import native
from gpt2serve.engine.linear import (
    FLOAT16_MAX,
    FORMATS,
    GEMV_MAX_ROWS,
    PackedLinear,
    gemv_max_rows,
    mkldnn_bf16,
    quantize_int8,
)

# Relative (Frobenius) error allowed per format: float32 is exact up to summation order; bfloat16 rounds
# activations and outputs to 8 mantissa bits (or, on CPUs without bf16 kernels, weights to float16's 11);
# float16 rounds weights to 11 bits; int8 rounds weights (and, with fbgemm, activations).
TOLERANCE = {"float32": 1e-5, "bfloat16": 1.5e-2, "float16": 2e-3, "int8": 3e-2}


NO_GEMV = "gpt2serve's C kernels build only on x86 CPUs with AVX2 and a C compiler (cc); run where both are"
# Every layer test runs on torch's kernels and on gemv.c's (where it builds: AVX2 and a C compiler).
KERNELS = pytest.mark.parametrize(
    "kernels",
    [
        "torch",
        pytest.param("gemv", marks=pytest.mark.skipif(not native.available(), reason=NO_GEMV)),
    ],
)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _conv1d(n_in: int, n_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n_in, n_out, generator=gen) * 0.02, torch.randn(n_out, generator=gen) * 0.02


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 16])
@KERNELS
def test_matches_x_at_w_plus_b(kernels: str, fmt: str, rows: int) -> None:
    weight, bias = _conv1d(64, 96)
    layer = PackedLinear(weight, bias, fmt, kernels=kernels)
    x = torch.randn(rows, 64)
    y = layer(x)
    assert y.shape == (rows, 96) and y.dtype == torch.float32
    assert _rel_err(y, x.double() @ weight.double() + bias.double()) < TOLERANCE[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
@KERNELS
def test_three_dim_input_keeps_leading_dims(kernels: str, fmt: str) -> None:
    weight, bias = _conv1d(64, 48, seed=1)
    x = torch.randn(2, 5, 64)
    y = PackedLinear(weight, bias, fmt, kernels=kernels)(x)
    assert y.shape == (2, 5, 48)
    assert _rel_err(y, x.double() @ weight.double() + bias.double()) < TOLERANCE[fmt]


@KERNELS
def test_float32_exact_on_a_gpt2_sized_matrix(kernels: str) -> None:
    weight, bias = _conv1d(768, 2304, seed=2)
    x = torch.randn(3, 768)
    y = PackedLinear(weight, bias, "float32", kernels=kernels)(x)
    assert _rel_err(y, x.double() @ weight.double() + bias.double()) < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
@KERNELS
def test_lm_head_uses_the_embedding_without_bias(kernels: str, fmt: str) -> None:
    embedding = torch.randn(200, 64, generator=torch.Generator().manual_seed(3)) * 0.02
    head = PackedLinear.lm_head(embedding, fmt, kernels=kernels)
    x = torch.randn(4, 64)
    logits = head(x)
    assert logits.shape == (4, 200)
    assert _rel_err(logits, x.double() @ embedding.double().T) < TOLERANCE[fmt]


def test_int8_weight_only_kernel() -> None:
    weight, bias = _conv1d(64, 96, seed=4)
    layer = PackedLinear(weight, bias, "int8", int8_weight_only=True, kernels="torch")
    assert layer.kernel == "weight_int8pack_mm"
    x = torch.randn(3, 64)
    assert _rel_err(layer(x), x.double() @ weight.double() + bias.double()) < 2e-2


def test_quantize_int8_rounds_each_weight_to_the_nearest_step() -> None:
    weight = torch.randn(32, 48)
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (32,)
    assert int(q.abs().amax(dim=1).min()) == 127  # every row uses the full range
    assert torch.all((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
@KERNELS
def test_empty_and_non_contiguous_inputs(kernels: str, fmt: str) -> None:
    weight, bias = _conv1d(64, 96, seed=5)
    layer = PackedLinear(weight, bias, fmt, kernels=kernels)
    assert layer(torch.randn(0, 64)).shape == (0, 96)
    x = torch.randn(64, 3).T  # a transposed view
    assert _rel_err(layer(x), x.double() @ weight.double() + bias.double()) < TOLERANCE[fmt]


def test_unknown_format_is_rejected() -> None:
    weight, bias = _conv1d(8, 8)
    with pytest.raises(ValueError, match="float64"):
        PackedLinear(weight, bias, "float64")


def test_kernel_follows_the_cpu() -> None:
    """bfloat16 takes oneDNN where the CPU has bf16 kernels, else fbgemm's float16 one, unless a weight is
    beyond float16's range (then plain bf16 `F.linear`, still correct); float16 always takes fbgemm."""
    weight, bias = _conv1d(64, 96, seed=7)
    assert PackedLinear(weight, bias, "float32", kernels="torch").kernel == "mkldnn_packed"
    half_kernel = "mkldnn_packed" if mkldnn_bf16() else "fbgemm_fp16"
    assert PackedLinear(weight, bias, "bfloat16", kernels="torch").kernel == half_kernel
    assert PackedLinear(weight, bias, "float16", kernels="torch").kernel == "fbgemm_fp16"
    huge = weight.clone()
    huge[0, 0] = 4 * FLOAT16_MAX
    layer = PackedLinear(huge, bias, "bfloat16", kernels="torch")
    x = torch.randn(3, 64)
    assert layer.kernel == ("mkldnn_packed" if mkldnn_bf16() else "dense")
    assert _rel_err(layer(x), x.double() @ huge.double() + bias.double()) < TOLERANCE["bfloat16"]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_matches_cpu_reference(fmt: str) -> None:
    weight, bias = _conv1d(64, 96, seed=6)
    layer = PackedLinear(weight, bias, fmt, device="cuda")
    x = torch.randn(3, 64)
    y = layer(x.cuda()).cpu()
    assert _rel_err(y, x.double() @ weight.double() + bias.double()) < TOLERANCE[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 4, 7])
@KERNELS
def test_fused_gelu_and_residual_add(kernels: str, fmt: str, rows: int) -> None:
    """`gelu=True` applies GELU (tanh form) to x @ W + b and `add=` adds a residual, as torch would."""
    weight, bias = _conv1d(64, 96, seed=4)
    layer = PackedLinear(weight, bias, fmt, kernels=kernels)
    x, residual = torch.randn(rows, 64), torch.randn(rows, 96)
    product = x.double() @ weight.double() + bias.double()
    gelu = layer(x, gelu=True)
    assert gelu.shape == (rows, 96)
    assert _rel_err(gelu, torch.nn.functional.gelu(product, approximate="tanh")) < TOLERANCE[fmt]
    added = layer(x, add=residual)
    assert added.shape == (rows, 96) and added.dtype == torch.float32
    assert _rel_err(added, product + residual.double()) < TOLERANCE[fmt] / 5
    # A bfloat16 GELU output feeds the next bfloat16 layer, whose residual stays float32.
    second = PackedLinear(*_conv1d(96, 64, seed=5), fmt, kernels=kernels)
    out = second(gelu, add=x)
    assert out.dtype == torch.float32
    assert _rel_err(out, second(gelu.float()).double() + x.double()) < TOLERANCE[fmt]


@pytest.mark.skipif(not native.available(), reason=NO_GEMV)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17, "limit", "limit+1", GEMV_MAX_ROWS + 1])
@pytest.mark.parametrize("width", [64, 72])
def test_gemv_every_row_count_and_ragged_width(fmt: str, rows: int | str, width: int) -> None:
    """gemv.c's blocks of 1-8 rows (and of 8, 4, 3, 2, 1 weight rows, here with 101 outputs, not a multiple
    of any), and the dense product past the format's `max_gemv_rows` (oneDNN or widened weights), all
    against float64; int8 and float32 are weight-only in gemv: the activations stay float32. 72 inputs
    end AVX-512's 16-wide loop with an 8-wide step."""
    weight, bias = _conv1d(width, 101, seed=8)
    layer = PackedLinear(weight, bias, fmt, kernels="gemv")
    assert layer.kernel == "gemv" and layer.max_gemv_rows == gemv_max_rows(fmt) <= GEMV_MAX_ROWS
    rows = {"limit": layer.max_gemv_rows, "limit+1": layer.max_gemv_rows + 1}.get(rows, rows)
    x = torch.randn(rows, width)
    ref = x.double() @ weight.double() + bias.double()
    tolerance = {"float32": 1e-6, "bfloat16": 5e-3, "float16": 1e-3, "int8": 1e-2}[fmt]
    assert _rel_err(layer(x), ref) < tolerance


@pytest.mark.skipif(not native.available(), reason=NO_GEMV)
def test_gemv_refuses_what_it_cannot_read() -> None:
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="contiguous"):
        native.gemv(x, torch.randn(64, 96).t(), None, None)
    with pytest.raises(ValueError, match="multiple of 8"):
        native.gemv(torch.randn(2, 60), torch.randn(96, 60), None, None)
    # A width that is not a multiple of 8 keeps torch's kernels.
    assert PackedLinear(*_conv1d(60, 32), "float32", kernels="gemv").kernel == "mkldnn_packed"


@pytest.mark.skipif(not native.available(), reason=NO_GEMV)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("width", [64, 72, 4104])
def test_gemv_row_results_do_not_depend_on_the_batch(fmt: str, width: int) -> None:
    """Bit for bit, a row's output is the same alone or among others (every block sums the inputs in the
    same order), so a request decodes the same whatever runs beside it. 4104 inputs are cut into K
    blocks past 6 rows (every format), the last one ending 8-wide, and past 64 rows into row groups."""
    weight, bias = _conv1d(width, 101, seed=9)
    layer = PackedLinear(weight, bias, fmt, kernels="gemv")
    x = torch.randn(layer.max_gemv_rows, width)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(len(x))])
    assert _rel_err(alone, x.double() @ weight.double() + bias.double()) < 1e-2
    counts = range(2, layer.max_gemv_rows + 1) if width < 1024 else (2, 6, 7, 9, 33, 64, 65, 130, 512)
    for rows in (n for n in counts if n <= layer.max_gemv_rows):
        assert torch.equal(layer(x[:rows]), alone[:rows]), rows


def test_weights_in_huge_pages_are_equal_contiguous_copies():
    from gpt2serve.engine.linear import HUGE_PAGE, in_huge_pages

    w = torch.randn(3072, 768)  # int8 2.25 MB (one whole huge page and a partial one) to float32 9 MB
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        src = w if dtype != torch.int8 else (w * 40).clamp(-127, 127).to(torch.int8)
        out = in_huge_pages(src, dtype)
        assert torch.equal(out, src.to(dtype)) and out.is_contiguous() and out.data_ptr() != src.data_ptr()
        if dtype == torch.float32 and sys.platform.startswith("linux"):
            assert out.data_ptr() % HUGE_PAGE == 0  # its first 2 MB can be one huge page
    small = torch.randn(4, 8)
    assert torch.equal(in_huge_pages(small, torch.float32), small)
