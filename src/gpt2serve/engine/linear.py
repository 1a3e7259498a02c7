"""Packed linear layers: y = x @ W + b with the fastest kernel for a weight format (preliminary)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FORMATS = ("float32", "bfloat16", "int8")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of an (out, in) matrix: returns (q int8 (out, in), scale fp32 (out,))."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class PackedLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str = "float32",
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        self._init_out_in(weight.t(), bias, fmt, torch.device(device))

    @classmethod
    def lm_head(cls, embedding: torch.Tensor, fmt: str = "float32",
                device: str | torch.device = "cpu") -> PackedLinear:
        head = cls.__new__(cls)
        torch.nn.Module.__init__(head)
        head._init_out_in(embedding, None, fmt, torch.device(device))
        return head

    def _init_out_in(self, w: torch.Tensor, bias: torch.Tensor | None, fmt: str, device: torch.device) -> None:
        self.fmt, self.device = fmt, device
        self.out_features, self.in_features = w.shape
        self.bias = None if bias is None else bias.detach().float().to(device)
        w = w.detach().float().contiguous()
        if fmt == "int8":
            q, scale = quantize_int8(w)
            self.weight, self.scale = q.to(device), scale.to(device)
        elif fmt == "bfloat16":
            self.bias = None if bias is None else self.bias.bfloat16()
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16())
        else:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.fmt == "int8":
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale)
            if self.bias is not None:
                y = y + self.bias
        elif self.fmt == "bfloat16":
            y = torch.ops.mkldnn._linear_pointwise(x2.bfloat16(), self.weight, self.bias, "none", [], "")
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.weight, self.bias, "none", [], "")
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)
