"""Fused MoE for routed SwiGLU experts: on-device grouping of rows by expert, then two grouped GEMMs.

Rows are sorted by expert on the device and each expert's rows padded to a multiple of BLOCK_M, so every
BLOCK_M tile of the sorted order belongs to one expert (SGLang's and vLLM's "align block size" idea). The
padded length has a bound known without reading the expert ids (N + E * (BLOCK_M - 1)), so the grid is
fixed and the step stays capturable; tiles past the last expert's rows exit at once.

Kernel 1 multiplies each tile by its expert's gate and up columns together and writes SiLU(gate) * up in
sorted order; kernel 2 multiplies that by the expert's down projection and scatters the rows back to their
original order. Weights in Hugging Face's fused layout: gate_up [E, H, 2I] (gate first), down [E, I, H].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_up_silu_kernel(
    X,  # [N, H]
    W,  # [E, H, 2I]
    Act,  # [P, I] sorted, padded order
    sorted_rows,  # [P] int32: source row of each sorted slot (N: padding)
    tile_expert,  # [P // BLOCK_M] int32: expert of each tile (E: no rows)
    num_rows,
    num_experts,
    hidden,
    inter,
    stride_xn,
    stride_we,
    stride_wk,
    stride_an,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    col = tl.program_id(1)
    expert = tl.load(tile_expert + tile)
    if expert < num_experts:
        slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(sorted_rows + slots)
        row_ok = rows < num_rows
        n = col * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < inter
        w_base = W + expert.to(tl.int64) * stride_we
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < hidden
            x_ptrs = X + rows[:, None].to(tl.int64) * stride_xn + k[None, :]
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            w_gate = tl.load(w_base + k[:, None] * stride_wk + n[None, :], mask=w_mask, other=0.0)
            w_up = tl.load(w_base + k[:, None] * stride_wk + inter + n[None, :], mask=w_mask, other=0.0)
            acc_gate = tl.dot(x, w_gate, acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(x, w_up, acc_up, input_precision=PRECISION)
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up
        tl.store(
            Act + slots[:, None].to(tl.int64) * stride_an + n[None, :],
            act.to(Act.dtype.element_ty),
            mask=row_ok[:, None] & n_ok[None, :],
        )


@triton.jit
def _down_kernel(
    Act,  # [P, I]
    W,  # [E, I, H]
    Out,  # [N, H]
    sorted_rows,
    tile_expert,
    num_rows,
    num_experts,
    hidden,
    inter,
    stride_an,
    stride_we,
    stride_wk,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    col = tl.program_id(1)
    expert = tl.load(tile_expert + tile)
    if expert < num_experts:
        slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(sorted_rows + slots)
        row_ok = rows < num_rows
        n = col * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        w_base = W + expert.to(tl.int64) * stride_we
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < inter
            a = tl.load(
                Act + slots[:, None].to(tl.int64) * stride_an + k[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(w_base + k[:, None] * stride_wk + n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        tl.store(
            Out + rows[:, None].to(tl.int64) * stride_on + n[None, :],
            acc.to(Out.dtype.element_ty),
            mask=row_ok[:, None] & n_ok[None, :],
        )


def align_rows_by_expert(expert_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_rows [P], tile_expert [P // block_m]) with P = N + E * (block_m - 1) rounded up to block_m.

    All on the device: no value is read back to the host, so the shapes depend on N and E alone.
    """
    n = expert_ids.shape[0]
    device = expert_ids.device
    padded_len = triton.cdiv(n + num_experts * (block_m - 1), block_m) * block_m
    order = torch.argsort(expert_ids, stable=True)
    # not bincount: its output size depends on the largest id, which it reads back to the host
    counts = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts.index_add_(0, expert_ids, torch.ones_like(expert_ids))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)
    padded_starts = padded_ends - padded
    starts = torch.cumsum(counts, 0) - counts
    sorted_experts = expert_ids[order]
    rank = torch.arange(n, device=device) - starts[sorted_experts]
    sorted_rows = torch.full((padded_len,), n, dtype=torch.int32, device=device)
    sorted_rows[padded_starts[sorted_experts] + rank] = order.to(torch.int32)
    tile_starts = torch.arange(0, padded_len, block_m, device=device)
    tile_expert = torch.searchsorted(padded_ends, tile_starts, right=True).to(torch.int32)  # E past the end
    return sorted_rows, tile_expert


def fused_moe_swiglu(
    x: torch.Tensor,  # [N, H]
    expert_ids: torch.Tensor,  # [N] int64
    gate_up: torch.Tensor,  # [E, H, 2I]
    down: torch.Tensor,  # [E, I, H]
) -> torch.Tensor:  # [N, H]
    n, hidden = x.shape
    num_experts, inter = gate_up.shape[0], gate_up.shape[2] // 2
    out = torch.empty((n, down.shape[2]), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    on_gpu = x.is_cuda
    # Decode batches are small: a 16-row tile wastes less of each expert's padding.
    block_m = 16 if (not on_gpu or n <= 64 * num_experts) else 64
    block_n, block_k = (64, 64) if on_gpu else (16, 16)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    sorted_rows, tile_expert = align_rows_by_expert(expert_ids, num_experts, block_m)
    gate_up, down, x = gate_up.contiguous(), down.contiguous(), x.contiguous()
    act = torch.empty((sorted_rows.shape[0], inter), dtype=x.dtype, device=x.device)
    tiles = tile_expert.shape[0]
    _gate_up_silu_kernel[(tiles, triton.cdiv(inter, block_n))](
        x, gate_up, act, sorted_rows, tile_expert, n, num_experts, hidden, inter,
        x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
    )  # fmt: skip
    hidden_out = down.shape[2]
    _down_kernel[(tiles, triton.cdiv(hidden_out, block_n))](
        act, down, out, sorted_rows, tile_expert, n, num_experts, hidden_out, inter,
        act.stride(0), down.stride(0), down.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
    )  # fmt: skip
    return out
