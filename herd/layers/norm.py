"""Normalisations, computed in float32 and cast back as the reference does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.kernels import cpu as cpu_kernels
from herd.layers.triton_ops import triton_available

# Read once: the check must not run inside a compiled graph.
_FUSED_ON_CUDA = triton_available()


def fused_on_cpu(x: torch.Tensor) -> bool:
    # herd's CPU ops for the norms (and RoPE + qk-norm, herd.layers.rotary): one op instead of five to eight on a
    # decode step's small rows, rounding where the reference rounds in 16-bit dtypes (float32 ones keep PyTorch's,
    # whose sums the parity tests were written against). Compiled steps call them too (their fake kernels are in
    # herd.kernels.cpu.fake), so they round exactly as eager steps do.
    return x.device.type == "cpu" and x.dtype != torch.float32 and cpu_kernels.enabled()


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS norm; Llama 4's qk-norm ("L2 norm") is exactly this."""
    if fused_on_cpu(x):
        return torch.ops.herd_cpu.rms_norm(x, None, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_on_cpu(x) and self.weight.dtype == x.dtype:
            return torch.ops.herd_cpu.rms_norm(x, self.weight, self.eps)
        return rms_norm(x, self.eps) * self.weight


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)): the residual stream and the next sublayer's input; one kernel on a GPU."""
    if x.is_cuda and _FUSED_ON_CUDA:
        from herd.layers.triton_ops.norm_rope import add_rms_norm as fused

        return fused(x, delta, norm.weight, norm.eps)
    total = x + delta
    return total, norm(total)
