"""Packed linear layers: y = x @ W + b with the fastest kernel this torch build offers for a weight format.

Decoding streams every weight from memory once per step for only 1-16 activation rows, so a kernel is
judged by the weight bytes it reads per second. Wherever gpt2serve's C kernels build (x86-64 with AVX2 and
FMA, and a C compiler; see native.py) every CPU format goes to csrc/gemv.c (`kernel == "gemv"`), which
streams at the read bandwidth on the CPUs measured (below, and BENCHMARKS.md). torch's kernels serve
with `kernels="torch"` or without a compiler; on AVX-512 CPUs they are chosen as follows, measured by
benchmarks/bench_linear.py (torch 2.13 CPU, 2-core AMD EPYC Zen 4 with AVX-512, AVX512-BF16 and VNNI,
~31 GB/s read bandwidth, 2 threads, weights cold in RAM), median ms for gpt2's 768x3072 c_fc at
M = 1 / 3 / 8 / 16 rows:

- float32: oneDNN's inner product on a prepacked weight (`mkldnn._linear_pointwise`), 0.34 / 0.34 /
  0.36 / 0.49 ms (28-19 GB/s). `F.linear` and `addmm` call MKL sgemm, whose code path on this AMD CPU
  falls apart beyond one row: 0.70 / 1.69 / 1.07 / 1.26 ms; for the 768x50257 LM head at M = 3,
  37 ms against 4.9 ms. Exact: the same fp32 sums, ~4e-7 relative error.
- bfloat16: the same oneDNN kernel on bf16 activations (AVX512-BF16 dot products), output cast back to
  float32: 0.20 / 0.21 / 0.23 / 0.32 ms; ~3e-3 relative error from rounding activations and outputs.
- int8: fbgemm's dynamic quantization (weights int8 per output channel, activations quantized to uint8
  per call, VNNI int8 GEMM): 0.11 / 0.11 / 0.13 / 0.19 ms, the only int8 kernel that beats bfloat16.
  Weight-only `torch._weight_int8pack_mm` gets 0.17 / 0.22 / 0.56 / 0.83 ms (bf16 activations; fp32
  ones are 10x slower), int4 `_weight_int4pack_mm_for_cpu` 10-100x slower still. The price of fbgemm is
  accuracy: ~1.2e-2 relative error on Gaussian inputs (weight-only: 8e-3), ~5e-2 where a few input
  channels are 30x the rest, as GPT-2's outlier features are. `int8_weight_only=True` trades speed back.

For all of gpt2's matrices at M = 1 that is 17.8 / 10.7 / 5.7 ms per step (float32 / bfloat16 / int8)
against 34.7 ms with `F.linear`; the float32 figure is ~90% of the bandwidth bound. On CUDA every format
is a plain `F.linear` (cuBLAS); int8 there dequantizes its weight on the fly.

CPUs with AVX2 but no AVX-512 (Zen 3 here, ~16-23 GB/s) lack oneDNN's bf16 kernels and VNNI, and
oneDNN's and MKL's float32 products stream ~10 GB/s there for a few rows, where gemv.c streams the weights
at 12-18 GB/s (c_fc at M = 1: float32 0.54 ms against oneDNN's 0.83, int8 0.25 ms) with float32
activations, so its int8 is weight-only. On a Zen 5 with AVX-512 (~38 GB/s) gemv.c streams 28-40 GB/s
at 1-5 rows in every format. torch's kernels on AVX2-only CPUs:
half-width weights (bfloat16, and float16) go to fbgemm's float16-weight kernel (`linear_dynamic_fp16`:
float32 activations and sums), 0.35 / 0.44 / 0.67 ms for c_fc at M = 1 / 3 / 8 against 0.52 / 1.27 /
2.4 ms for a bf16 `F.linear`; a bfloat16 checkpoint is stored as float16 (the same size, 3 more mantissa
bits) unless a weight exceeds float16's range. fbgemm int8 quantizes activations to 7 bits
(`reduce_range`): AVX2's int8 dot product sums pairs into int16, which 8-bit activations overflow. And
oneDNN float32 streams 1 row 25% faster than 4, so rows are not padded there (`MKLDNN_MIN_ROWS`).
"""

from __future__ import annotations

import mmap
import warnings

import torch
import torch.nn.functional as F

from gpt2serve.engine import native

mkldnn = torch.ops.mkldnn

FORMATS = ("float32", "bfloat16", "float16", "int8")
AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
# With AVX-512, oneDNN streams the weight 10-25% slower for 1-2 rows than for 4: padding to 4 is cheaper.
MKLDNN_MIN_ROWS = 4 if AVX512 else 1
FLOAT16_MAX = torch.finfo(torch.float16).max
DENSE_CHUNK = 8192  # rows of a matrix widened to float32 at a time (quantizing; dense products of int8)
# Without VNNI, fbgemm's int8 dot products saturate on 8-bit activations: quantize them to 7 bits.
INT8_REDUCE_RANGE = not torch.cpu._is_vnni_supported()


# gemv.c reads the weights once per 8 rows and sums each row alone, whatever the other rows. Past a few
# dozen rows products are bound by arithmetic, where oneDNN's float32 and bfloat16 (AVX512-BF16) kernels
# do more per cycle: on a Zen 5 whole prompts of 128-512 tokens ran 1.2-2x faster through them
# (benchmarks/bench_prefill.py). int8, and formats without such kernels, stay on gemv.c up to
# GEMV_MAX_ROWS (their dense product widens the weight to float32 per call).
GEMV_MAX_ROWS = 512
ONEDNN_FROM_ROWS = 65
HUGE_PAGE = 2 << 20  # bytes of a transparent huge page (x86-64 Linux)
KERNEL_CHOICES = ("auto", "gemv", "torch")


def gemv_max_rows(fmt: str) -> int:
    """The most rows gemv.c multiplies a matrix of this format by; more go to a dense product."""
    if fmt == "float32" and torch.backends.mkldnn.is_available() or fmt == "bfloat16" and mkldnn_bf16():
        return ONEDNN_FROM_ROWS - 1
    return GEMV_MAX_ROWS


def use_gemv(kernels: str, in_features: int) -> bool:
    """Whether a CPU matrix goes to gemv.c: "gemv" and "auto" wherever it builds (AVX2 CPUs: 1.3-1.6x
    oneDNN's speed; Zen 5 with AVX-512: 1.4-2.7x per decode step, see BENCHMARKS.md), "torch" never."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"cpu kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "torch" or in_features % native.K_MULTIPLE:
        return False
    return native.available()


def mkldnn_bf16() -> bool:
    """Whether oneDNN has bfloat16 matrix products on this CPU (AVX-512 or AVX-NE-CONVERT)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def quantize_int8(weight: torch.Tensor, chunk: int = DENSE_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of an (out, in) matrix: (q int8 (out, in), scale float32 (out,)).
    Rows are quantized `chunk` at a time, so the float32 temporaries stay small."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], chunk):
        w = weight[start : start + chunk].detach().float()
        s = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        q[start : start + chunk] = torch.round(w / s[:, None]).clamp(-127, 127)
        scale[start : start + chunk] = s
    return q, scale


def _fbgemm_pack(w: torch.Tensor, bias: torch.Tensor | None) -> object | None:
    """fbgemm's packed int8 weight for `quantized.linear_dynamic`, or None where this torch lacks it."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    q, scale = quantize_int8(w)
    zeros = torch.zeros(len(scale), dtype=torch.long)
    try:
        with warnings.catch_warnings():  # quantized tensor types are deprecated; the kernel is the fastest
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
            return torch.ops.quantized.linear_prepack(qw, bias)
    except (AttributeError, RuntimeError):
        return None


def in_huge_pages(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU copy of `t` in `dtype` whose whole 2 MB stretches Linux may back with transparent
    huge pages (madvise): streaming weights then misses the TLB far less (gemv.c on Zen 3, gpt2 layers
    and head with 3-5 rows: 1-6 % faster; 1 row unchanged). Tensors under 2 MB, or where the OS has no
    such pages: a plain copy."""
    nbytes = t.numel() * dtype.itemsize
    if nbytes < HUGE_PAGE or t.device.type != "cpu" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return t.to(dtype).contiguous()
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(area, dtype=torch.uint8)  # keeps `area` mapped while any view lives
    start = -raw.data_ptr() % HUGE_PAGE
    try:  # only whole huge pages inside the tensor: the partial last one would hold unused memory
        area.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:  # a kernel without transparent huge pages
        pass
    out = raw[start : start + nbytes].view(dtype).view(t.shape)
    out.copy_(t)
    return out


class PackedLinear(torch.nn.Module):
    """y = x @ weight + bias from a GPT-2 Conv1D weight (in, out), packed once for `fmt`'s fastest kernel.

    `forward` takes (..., in) and returns (..., out) in the input's dtype (float32 on CPU). The weight is
    repacked, so the module is built for one device and not moved afterwards.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        fmt: str = "float32",
        device: str | torch.device = "cpu",
        int8_weight_only: bool = False,
        kernels: str = "auto",
    ) -> None:
        super().__init__()
        self._pack(weight.detach().t(), bias, fmt, torch.device(device), int8_weight_only, kernels)

    @classmethod
    def lm_head(
        cls,
        embedding: torch.Tensor,
        fmt: str = "float32",
        device: str | torch.device = "cpu",
        int8_weight_only: bool = False,
        kernels: str = "auto",
    ) -> PackedLinear:
        """The tied output projection: logits = x @ embedding.T, from the (vocab, n_embd) embedding."""
        head = cls.__new__(cls)
        torch.nn.Module.__init__(head)
        head._pack(embedding.detach(), None, fmt, torch.device(device), int8_weight_only, kernels)
        return head

    def _pack(
        self,
        w: torch.Tensor,
        bias: torch.Tensor | None,
        fmt: str,
        device: torch.device,
        int8_weight_only: bool,
        kernels: str,
    ) -> None:
        """Store the (out, in) matrix `w` in the layout of the kernel chosen for (fmt, device, kernels)."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
        self.fmt, self.device = fmt, device
        self.out_features, self.in_features = w.shape
        self.bias = None if bias is None else bias.detach().float().to(device)
        if device.type != "cpu":
            self._pack_dense(w.float().contiguous(), fmt, device)
        elif use_gemv(kernels, self.in_features):
            self._pack_gemv(w, fmt)
        elif fmt == "float32" and torch.backends.mkldnn.is_available() or fmt == "bfloat16" and mkldnn_bf16():
            self.kernel, dtype = "mkldnn_packed", getattr(torch, fmt)
            # converted straight to the kernel's dtype: no float32 copy of a bf16 weight
            w = w.to(dtype=dtype, memory_format=torch.contiguous_format)
            self.weight = mkldnn._reorder_linear_weight(w)
            self.bias = None if self.bias is None else self.bias.to(dtype)
        elif fmt in ("bfloat16", "float16"):
            self._pack_half(w, fmt)
        elif fmt == "float32":
            self._pack_dense(w.float().contiguous(), fmt, device)
        elif not int8_weight_only and (packed := _fbgemm_pack(w.float().contiguous(), self.bias)) is not None:
            self.kernel, self.weight = "fbgemm_dynamic_int8", packed
        else:
            self.kernel = "weight_int8pack_mm"
            self.weight, scale = quantize_int8(w.float().contiguous())
            self.scale = scale.bfloat16()  # the kernel takes bf16 scales: undo their rounding afterwards
            self.scale_fix = scale / self.scale.float()

    def _pack_gemv(self, w: torch.Tensor, fmt: str) -> None:
        """gemv.c's layout: the (out, in) matrix itself, row-major, in the format's dtype (int8: per-row
        scales), in huge pages where the OS gives them. Past `max_gemv_rows` rows oneDNN multiplies it as
        it is (float32, bfloat16), else it is widened to float32 in chunks."""
        self.kernel, self.scale, self.max_gemv_rows = "gemv", None, gemv_max_rows(fmt)
        if fmt == "int8":
            w, self.scale = quantize_int8(w)
        self.weight = in_huge_pages(w, getattr(torch, fmt))

    def _pack_half(self, w: torch.Tensor, fmt: str) -> None:
        """Half-width weights on a CPU without oneDNN bf16: fbgemm's float16 kernel, else `F.linear`."""
        fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
        if not fbgemm or (fmt == "bfloat16" and w.abs().max() > FLOAT16_MAX):
            self._pack_dense(w.float().contiguous(), fmt, self.device)
            return
        self.kernel = "fbgemm_fp16"
        self.weight = torch.ops.quantized.linear_prepack_fp16(w.float().contiguous(), self.bias)

    def _pack_dense(self, w: torch.Tensor, fmt: str, device: torch.device) -> None:
        """For `F.linear`: CUDA (cuBLAS), or a CPU build without oneDNN."""
        if fmt == "int8":
            self.kernel = "dense_int8"
            self.weight, self.scale = (t.to(device) for t in quantize_int8(w))
        else:
            self.kernel, self.weight = "dense", w.to(device, getattr(torch, fmt))

    def forward(self, x: torch.Tensor, gelu: bool = False, add: torch.Tensor | None = None) -> torch.Tensor:
        """(..., in) -> (..., out): x @ W + b, then GELU (tanh form) if `gelu`, plus `add` if given.

        oneDNN applies GELU and the addition inside the matrix product where that keeps float32 results
        (GELU for bfloat16, which then returns bfloat16 for the next bfloat16 layer); else torch does."""
        flat = x.dim() == 2  # the model's own calls: (rows, in), no reshaping needed
        x2 = x if flat else x.reshape(-1, self.in_features)
        x2 = x2 if x2.is_contiguous() else x2.contiguous()
        if self.kernel == "mkldnn_packed":
            y = self._mkldnn_packed(x2, gelu, add)
        else:
            y = getattr(self, "_" + self.kernel)(x2)
            y = y if y.dtype == x.dtype else y.to(x.dtype)
            y = F.gelu(y, approximate="tanh") if gelu else y
            y = y if add is None else y + add.reshape(y.shape)
        return y if flat else y.reshape(*x.shape[:-1], self.out_features)

    def _mkldnn_packed(self, x: torch.Tensor, gelu: bool, add: torch.Tensor | None) -> torch.Tensor:
        # Called ~50 times per decode step: torch calls that would change nothing are skipped.
        rows, dtype = x.shape[0], self.weight.dtype
        out_dtype = x.dtype if add is None else add.dtype
        if 0 < rows < MKLDNN_MIN_ROWS:  # zero rows leave the real rows' sums unchanged
            x = torch.cat([x, x.new_zeros(MKLDNN_MIN_ROWS - rows, x.shape[1])])
        x = x if x.dtype == dtype else x.to(dtype)
        padded = rows < x.shape[0]
        if add is not None and not gelu and not padded and dtype == out_dtype:
            add = add if add.dim() == 2 else add.reshape(rows, -1)
            return mkldnn._linear_pointwise.binary(x, add, self.weight, self.bias, "add")
        if gelu:
            y = mkldnn._linear_pointwise(x, self.weight, self.bias, "gelu", [], "tanh")
        else:
            y = mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        y = y[:rows] if padded else y
        if gelu and add is None:
            return y  # in the weight's dtype: a bfloat16 GELU output feeds the next bfloat16 layer as is
        y = y if y.dtype == out_dtype else y.to(out_dtype)
        return y if add is None else y + add.reshape(y.shape)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        x = x if x.dtype == torch.float32 else x.float()
        if x.shape[0] <= self.max_gemv_rows:
            return native.gemv(x, self.weight, self.scale, self.bias)
        return self._dense_rows(x)

    def _dense_rows(self, x: torch.Tensor) -> torch.Tensor:
        """gemv.c's matrix times more rows than it takes: on oneDNN, float32 as it is and bfloat16 where it
        has bf16 kernels (the activations rounded to bfloat16 too), else float32 copies (int8: its scales
        then multiply the output; oneDNN's bfloat16 would cost int8 1-1.5 points of top-1 agreement)."""
        as_bf16 = self.weight.dtype == torch.bfloat16 and mkldnn_bf16()
        dtype = torch.bfloat16 if as_bf16 else torch.float32
        onednn = as_bf16 or torch.backends.mkldnn.is_available()
        x_in = x.to(dtype)
        chunks = []
        for start in range(0, self.out_features, DENSE_CHUNK):  # bounded temporaries (the head's rows)
            rows = slice(start, start + DENSE_CHUNK)
            w = self.weight[rows].to(dtype)
            y = mkldnn._linear_pointwise(x_in, w, None, "none", [], "").float() if onednn else F.linear(x, w)
            y = y if self.scale is None else y * self.scale[rows]
            chunks.append(y if self.bias is None else y + self.bias[rows])
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)

    def _fbgemm_dynamic_int8(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x.float(), self.weight, INT8_REDUCE_RANGE)

    def _fbgemm_fp16(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self.weight)

    def _weight_int8pack_mm(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.bfloat16(), self.weight, self.scale).float()
        return y * self.scale_fix if self.bias is None else torch.addcmul(self.bias, y, self.scale_fix)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, b)

    def _dense_int8(self, x: torch.Tensor) -> torch.Tensor:  # dequantizes on the fly (CUDA)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, kernel={self.kernel}"
