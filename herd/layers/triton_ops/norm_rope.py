"""Fused elementwise kernels of a Llama 4 layer: residual add + RMSNorm, and RoPE + qk L2-norm.

Each rounds where the PyTorch path rounds (the sum to the model dtype before it is normalised, the rotated
heads before their norm), so both give the same numbers up to fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(
    X,  # [T, H]: the residual stream
    Delta,  # [T, H]: what the sublayer adds
    W,  # [H]
    Sum,  # [T, H]: X + Delta
    Normed,  # [T, H]: RMSNorm(X + Delta) * W
    stride_x,
    stride_d,
    stride_s,
    stride_n,
    hidden,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    # fp32 arithmetic, rounded once: what PyTorch's bf16 ops give (and Triton's interpreter has no bf16 math)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(Delta + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + d).to(Sum.dtype.element_ty)
    tl.store(Sum + row * stride_s + cols, s, mask=mask)
    sf = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(sf * sf, 0) / hidden + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    normed = (sf * inv).to(Normed.dtype.element_ty).to(tl.float32) * w
    tl.store(Normed + row * stride_n + cols, normed.to(Normed.dtype.element_ty), mask=mask)


@triton.jit
def _rope_qk_norm_kernel(
    QK,  # [T, heads, D], any row stride
    Angles,  # [T, D // 2, 2] float32: (cos, sin) of each pair's rotation
    Out,  # [T, heads, D] contiguous
    stride_t,
    stride_h,
    half,
    eps,
    USE_ROPE: tl.constexpr,
    USE_NORM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    mask = i < half
    base = QK + t * stride_t + h * stride_h
    even = tl.load(base + 2 * i, mask=mask, other=0.0).to(tl.float32)
    odd = tl.load(base + 2 * i + 1, mask=mask, other=0.0).to(tl.float32)
    if USE_ROPE:
        cos = tl.load(Angles + t * 2 * half + 2 * i, mask=mask, other=1.0)
        sin = tl.load(Angles + t * 2 * half + 2 * i + 1, mask=mask, other=0.0)
        rot_even = even * cos - odd * sin
        rot_odd = even * sin + odd * cos
        # the PyTorch path rounds the rotated head to the model dtype before normalising it
        even = rot_even.to(Out.dtype.element_ty).to(tl.float32)
        odd = rot_odd.to(Out.dtype.element_ty).to(tl.float32)
    if USE_NORM:
        inv = 1.0 / tl.sqrt((tl.sum(even * even, 0) + tl.sum(odd * odd, 0)) / (2 * half) + eps)
        even = even * inv
        odd = odd * inv
    out = Out + (t * tl.num_programs(1) + h) * 2 * half
    tl.store(out + 2 * i, even.to(Out.dtype.element_ty), mask=mask)
    tl.store(out + 2 * i + 1, odd.to(Out.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta) * weight) for x, delta [T, H]."""
    tokens, hidden = x.shape
    total, normed = torch.empty_like(x), torch.empty_like(x)
    if tokens:
        _add_rms_norm_kernel[(tokens,)](
            x, delta, weight, total, normed,
            x.stride(0), delta.stride(0), total.stride(0), normed.stride(0), hidden, eps,
            BLOCK=triton.next_power_of_2(hidden),
        )  # fmt: skip
    return total, normed


def rope_qk_norm(
    qk: torch.Tensor,  # [T, heads, D]; the last dimension contiguous
    angles: torch.Tensor,  # [T, D // 2] complex64
    use_rope: bool,
    use_norm: bool,
    eps: float,
) -> torch.Tensor:
    """RoPE on interleaved pairs, then the weightless RMS ("L2") norm of every head, in one pass."""
    tokens, heads, dim = qk.shape
    assert qk.stride(2) == 1, "the head dimension must be contiguous"
    out = torch.empty((tokens, heads, dim), dtype=qk.dtype, device=qk.device)
    if tokens:
        cos_sin = torch.view_as_real(angles).contiguous()
        _rope_qk_norm_kernel[(tokens, heads)](
            qk, cos_sin, out, qk.stride(0), qk.stride(1), dim // 2, eps,
            USE_ROPE=use_rope, USE_NORM=use_norm, BLOCK=triton.next_power_of_2(dim // 2),
        )  # fmt: skip
    return out
