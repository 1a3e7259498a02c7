"""Packed linear layers: y = x @ W + b with the fastest kernel this torch build offers for a weight format.

Decoding streams every weight from memory once per step for only 1-16 activation rows, so a kernel is
judged by the weight bytes it reads per second. Measured by benchmarks/bench_linear.py (torch 2.13 CPU,
2-core AMD EPYC Zen 4 with AVX-512 / AVX512-BF16 / VNNI, ~30-35 GB/s read bandwidth, 2 threads, weights
cold in RAM; gpt2's 768x3072 c_fc at M = 1 / 3 / 8 / 16 rows, median ms):

- float32: oneDNN inner product on a prepacked weight (`mkldnn._linear_pointwise`):
  0.42 / 0.35 / 0.46 / 0.57 ms (22-27 GB/s). `F.linear` / `addmm` go to MKL sgemm, whose path on AMD
  falls apart beyond one row: 0.68 / 1.63 / 0.94 / 1.23 ms. Exact: same fp32 sums, ~4e-7 relative error.
- bfloat16: the same oneDNN kernel with bf16 activations (AVX512-BF16 dot products), output cast back:
  0.20 / 0.17 / 0.22 / 0.29 ms, about twice as fast as float32; ~3e-3 relative error (bf16 activations).
- int8: fbgemm dynamic quantization (int8 weights per output channel, activations quantized per call
  to uint8 per tensor, VNNI int8 GEMM): 0.10 / 0.10 / 0.12 / 0.18 ms, the only int8 kernel faster than
  bfloat16. Weight-only `torch._weight_int8pack_mm` is slower than bfloat16 once M > 1 (0.17 / 0.23 /
  0.46 / 0.75 ms with bf16 activations; 10x worse with fp32 ones), int4 (`_weight_int4pack_mm_for_cpu`)
  is 10-100x slower still. The cost of fbgemm's speed is accuracy: ~1e-2 relative error on Gaussian
  inputs (weight-only: 8e-3), but ~5e-2 when a few input channels are 30x larger than the rest, as
  GPT-2's outlier features are; `int8_weight_only=True` picks the weight-only kernel instead.

On CUDA every format is a plain `F.linear` (cuBLAS); int8 there dequantizes its weight on the fly.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

FORMATS = ("float32", "bfloat16", "int8")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of an (out, in) matrix: (q int8 (out, in), scale float32 (out,))."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


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


class PackedLinear(torch.nn.Module):
    """y = x @ weight + bias from a GPT-2 Conv1D weight (in, out), packed once for `fmt`'s fastest kernel.

    `forward` takes (..., in) and returns (..., out) in the input's dtype (float32 on CPU). The weight is
    repacked, so the module is built for one device and not moved afterwards.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, fmt: str = "float32",
                 device: str | torch.device = "cpu", int8_weight_only: bool = False) -> None:
        super().__init__()
        self._pack(weight.detach().t(), bias, fmt, torch.device(device), int8_weight_only)

    @classmethod
    def lm_head(cls, embedding: torch.Tensor, fmt: str = "float32", device: str | torch.device = "cpu",
                int8_weight_only: bool = False) -> PackedLinear:
        """The tied output projection: logits = x @ embedding.T, from the (vocab, n_embd) embedding."""
        head = cls.__new__(cls)
        torch.nn.Module.__init__(head)
        head._pack(embedding.detach(), None, fmt, torch.device(device), int8_weight_only)
        return head

    def _pack(self, w: torch.Tensor, bias: torch.Tensor | None, fmt: str, device: torch.device,
              int8_weight_only: bool) -> None:
        """Store the (out, in) matrix `w` in the layout of the kernel chosen for (fmt, device)."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")
        self.fmt, self.device = fmt, device
        self.out_features, self.in_features = w.shape
        w = w.float().contiguous()
        b = None if bias is None else bias.detach().float().to(device)
        self.bias = b
        self.compute_dtype = torch.float32 if fmt == "int8" else getattr(torch, fmt)
        if device.type != "cpu":
            self.kernel = "F.linear"
            if fmt == "int8":
                self.weight, self.scale = (t.to(device) for t in quantize_int8(w))
            else:
                self.weight = w.to(device, dtype=getattr(torch, fmt))
        elif fmt == "int8" and not int8_weight_only and (packed := _fbgemm_pack(w, b)) is not None:
            self.kernel, self.weight = "fbgemm_dynamic_int8", packed
        elif fmt == "int8":
            self.kernel = "weight_int8pack_mm"
            self.weight, scale = quantize_int8(w)
            self.scale = scale.bfloat16()  # the kernel wants bf16 scales: keep the rounding to fix it later
            self.scale_fix = scale / self.scale.float()
        elif torch.backends.mkldnn.is_available():
            self.kernel = "mkldnn_packed"
            self.bias = None if b is None else b.to(self.compute_dtype)
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w.to(self.compute_dtype))
        else:
            self.kernel = "F.linear"
            self.weight = w.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        y = self._matmul(x2 if x2.is_contiguous() else x2.contiguous())
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "mkldnn_packed":
            xc = x.to(self.compute_dtype)
            return torch.ops.mkldnn._linear_pointwise(xc, self.weight, self.bias, "none", [], "")
        if self.kernel == "fbgemm_dynamic_int8":
            return torch.ops.quantized.linear_dynamic(x.float(), self.weight)
        if self.kernel == "weight_int8pack_mm":
            y = torch._weight_int8pack_mm(x.bfloat16(), self.weight, self.scale).float()
            return y * self.scale_fix if self.bias is None else torch.addcmul(self.bias, y, self.scale_fix)
        if self.fmt == "int8":  # CUDA: dequantize on the fly
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
            return y + self.bias.to(x.dtype) if self.bias is not None else y
        b = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, b)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, kernel={self.kernel}"
