"""Weight-only quantized GEMMs on the GPU: INT4 or FP8 weights dequantized in registers, a tile at a time.

INT4 layout (herd.layers.quantization.int4.pack_for_kernel, non-CPU): uint8 [out, in / 2], input 2j in the
low nibble and 2j + 1 in the high one, each stored as q + 8; scales [out, in / group]. A [BLOCK_K, BLOCK_N]
tile of W^T is read as bytes (each byte serves two k), shifted by 4 * (k % 2), scaled by its group's scale,
cast to the activations' dtype and fed to `tl.dot`: the weight moves as a quarter of bf16's bytes, and
decode GEMVs are bound by those bytes. FP8 (float8_e4m3fn [out, in], a float32 scale per output row) is read
the same way, one element per k (the activations stay in bf16: W8A16-style, not the checkpoint's FP8 x FP8,
which `torch._scaled_mm` does for the dense layers).

`w4a16_matmul` is the INT4 linear layer; `fused_moe_w4a16` and `fused_moe_fp8` the routed experts, grouped on
the device exactly as the bf16 fused MoE does (herd.layers.triton_ops.fused_moe.align_rows_by_expert), so the
step stays capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from herd.layers.triton_ops.fused_moe import align_rows_by_expert

INT4, FP8 = 0, 1  # KIND: how W stores a weight (the kernels compare KIND with these literals)


@triton.jit
def _weight_tile(W, S, k, n, k_ok, n_ok, stride_wn, stride_sn, group, DTYPE: tl.constexpr, KIND: tl.constexpr = 0):
    """[BLOCK_K, BLOCK_N] of W^T (rows n of W, inputs k), dequantized to DTYPE."""
    mask = k_ok[:, None] & n_ok[None, :]
    if KIND == 0:  # INT4
        byte = tl.load(W + n[None, :].to(tl.int64) * stride_wn + (k[:, None] // 2), mask=mask, other=8)
        q = ((byte.to(tl.int32) >> ((k[:, None] % 2) * 4)) & 0xF) - 8
    else:
        q = tl.load(W + n[None, :].to(tl.int64) * stride_wn + k[:, None], mask=mask, other=0.0)
    scale = tl.load(S + n[None, :].to(tl.int64) * stride_sn + (k[:, None] // group), mask=mask, other=0.0)
    return (q.to(tl.float32) * scale.to(tl.float32)).to(DTYPE)


@triton.jit
def _w4a16_gemm_kernel(
    X,  # [M, K]
    W,  # uint8 [N, K / 2]
    S,  # [N, K / group]
    Out,  # [M, N]
    M,
    N,
    K,
    group,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(X + m[:, None].to(tl.int64) * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = _weight_tile(W, S, k, n, k_ok, n_ok, stride_wn, stride_sn, group, X.dtype.element_ty)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    out = Out + m[:, None].to(tl.int64) * stride_om + n[None, :]
    tl.store(out, acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _blocks(x: torch.Tensor) -> tuple[int, int, str]:
    on_gpu = x.is_cuda
    return (64 if on_gpu else 16), (64 if on_gpu else 16), "ieee" if x.dtype == torch.float32 else "tf32"


def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N], W INT4 in the layout above."""
    x = x.contiguous()
    m, k = x.shape
    n = packed.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_n, block_k, precision = _blocks(x)
    block_m = 16
    _w4a16_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x, packed, scales, out, m, n, k, group, x.stride(0), packed.stride(0), scales.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
    )  # fmt: skip
    return out


@triton.jit
def _gate_up_kernel(
    X,  # [N, H]
    W,  # uint8 [E, 2I, H / 2]: gate rows, then up rows
    S,  # [E, 2I, H / group]
    Act,  # [P, I] in sorted, padded order
    sorted_rows,
    tile_expert,
    num_rows,
    num_experts,
    hidden,
    inter,
    group,
    stride_xn,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_an,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    KIND: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert + tile)
    if expert < num_experts:
        slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(sorted_rows + slots)
        row_ok = rows < num_rows
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        w_base, s_base = W + expert.to(tl.int64) * stride_we, S + expert.to(tl.int64) * stride_se
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < hidden
            x_ptrs = X + rows[:, None].to(tl.int64) * stride_xn + k[None, :]
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            dtype = X.dtype.element_ty
            w_gate = _weight_tile(w_base, s_base, k, n, k_ok, n_ok, stride_wn, stride_sn, group, dtype, KIND)
            w_up = _weight_tile(w_base, s_base, k, inter + n, k_ok, n_ok, stride_wn, stride_sn, group, dtype, KIND)
            acc_gate = tl.dot(x, w_gate, acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(x, w_up, acc_up, input_precision=PRECISION)
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up
        act_ptrs = Act + slots[:, None].to(tl.int64) * stride_an + n[None, :]
        tl.store(act_ptrs, act.to(Act.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    Act,  # [P, I]
    W,  # uint8 [E, H, I / 2]
    S,  # [E, H, I / group]
    Out,  # [N, H]
    sorted_rows,
    tile_expert,
    num_rows,
    num_experts,
    hidden,
    inter,
    group,
    stride_an,
    stride_we,
    stride_wn,
    stride_se,
    stride_sn,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    KIND: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert + tile)
    if expert < num_experts:
        slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(sorted_rows + slots)
        row_ok = rows < num_rows
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        w_base, s_base = W + expert.to(tl.int64) * stride_we, S + expert.to(tl.int64) * stride_se
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < inter
            a_ptrs = Act + slots[:, None].to(tl.int64) * stride_an + k[None, :]
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = _weight_tile(w_base, s_base, k, n, k_ok, n_ok, stride_wn, stride_sn, group, Act.dtype.element_ty, KIND)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        out_ptrs = Out + rows[:, None].to(tl.int64) * stride_on + n[None, :]
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def fused_moe_w4a16(
    x: torch.Tensor,  # [N, H]
    expert_ids: torch.Tensor,  # [N] int64
    gate_up: torch.Tensor,  # uint8 [E, 2I, H / 2]
    gate_up_scales: torch.Tensor,  # [E, 2I, H / group]
    down: torch.Tensor,  # uint8 [E, H, I / 2]
    down_scales: torch.Tensor,  # [E, H, I / group]
    gate_up_group: int,
    down_group: int,
) -> torch.Tensor:  # [N, H]
    return _fused_moe(x, expert_ids, gate_up, gate_up_scales, down, down_scales, gate_up_group, down_group, INT4)


def fused_moe_fp8(
    x: torch.Tensor,  # [N, H]
    expert_ids: torch.Tensor,  # [N] int64
    gate_up: torch.Tensor,  # float8_e4m3fn [E, 2I, H]
    gate_up_scales: torch.Tensor,  # float32 [E, 2I]
    down: torch.Tensor,  # float8_e4m3fn [E, H, I]
    down_scales: torch.Tensor,  # float32 [E, H]
) -> torch.Tensor:  # [N, H]
    # A row's one scale is a group as wide as the row: k // group is 0 for every input k.
    hidden, inter = gate_up.shape[2], down.shape[2]
    return _fused_moe(
        x, expert_ids, gate_up, gate_up_scales[..., None], down, down_scales[..., None], hidden, inter, FP8
    )


def _fused_moe(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scales: torch.Tensor,
    down: torch.Tensor,
    down_scales: torch.Tensor,
    gate_up_group: int,
    down_group: int,
    kind: int,
) -> torch.Tensor:
    n, hidden = x.shape
    num_experts, inter = gate_up.shape[0], gate_up.shape[1] // 2
    hidden_out = down.shape[1]
    out = torch.empty((n, hidden_out), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    block_n, block_k, precision = _blocks(x)
    block_m = 16 if (not x.is_cuda or n <= 64 * num_experts) else 64
    sorted_rows, tile_expert = align_rows_by_expert(expert_ids, num_experts, block_m)
    x = x.contiguous()
    act = torch.empty((sorted_rows.shape[0], inter), dtype=x.dtype, device=x.device)
    tiles = tile_expert.shape[0]
    _gate_up_kernel[(tiles, triton.cdiv(inter, block_n))](
        x, gate_up, gate_up_scales, act, sorted_rows, tile_expert, n, num_experts, hidden, inter, gate_up_group,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), gate_up_scales.stride(0), gate_up_scales.stride(1),
        act.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, KIND=kind,
    )  # fmt: skip
    _down_kernel[(tiles, triton.cdiv(hidden_out, block_n))](
        act, down, down_scales, out, sorted_rows, tile_expert, n, num_experts, hidden_out, inter, down_group,
        act.stride(0), down.stride(0), down.stride(1), down_scales.stride(0), down_scales.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision, KIND=kind,
    )  # fmt: skip
    return out
