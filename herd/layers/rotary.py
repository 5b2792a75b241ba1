"""Rotary position embedding as Llama 4 applies it: on interleaved (even, odd) pairs.

Meta and HF rotate each pair (x[2i], x[2i+1]) as one complex number, not the rotate-half
layout of Llama 2/3 in HF; the two are not interchangeable without permuting q/k weights.
"""

from __future__ import annotations

import math

import torch

from herd.config import RopeScaling
from herd.layers.norm import fused_on_cpu, rms_norm
from herd.layers.triton_ops import triton_available

_FUSED_ON_CUDA = triton_available()  # read once: the check must not run inside a compiled graph


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], float32, with Llama 3 scaling when given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    if scaling.high_freq_factor == scaling.low_freq_factor:
        # Real Scout configs have low == high: there is no band to smooth over (and the
        # smoothing formula would divide by zero).
        return scaled
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """e^(i * position * frequency) per token: complex64 [T, head_dim // 2]."""
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate x: [T, n_heads, head_dim], each (even, odd) pair as one complex number, in float32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * angles[:, None, :]).flatten(-2).type_as(x)


def rope_and_qk_norm(
    qk: torch.Tensor, angles: torch.Tensor, use_rope: bool, use_qk_norm: bool, eps: float
) -> torch.Tensor:
    """RoPE, then the weightless qk-norm (after RoPE, as the reference does), for q and k heads side by side.

    One Triton kernel on a GPU, one of herd's CPU ops for 16-bit heads on a CPU; PyTorch's ops elsewhere.
    """
    if not (use_rope or use_qk_norm):
        return qk
    if qk.is_cuda and _FUSED_ON_CUDA:
        from herd.layers.triton_ops.norm_rope import rope_qk_norm

        return rope_qk_norm(qk, angles, use_rope, use_qk_norm, eps)
    if fused_on_cpu(qk):
        return torch.ops.herd_cpu.rope_qk_norm(qk, angles, use_rope, use_qk_norm, eps)
    if use_rope:
        qk = apply_rope(qk, angles)
    return rms_norm(qk, eps) if use_qk_norm else qk
