"""Triton kernels for paged attention: split-K decode and ragged prefill/extend.

Both read K/V straight from a paged pool ([num_blocks, block_size, kv_heads, head_dim]) through a block
table, one token position at a time (slot = table[pos // block_size] * block_size + pos % block_size), so any
block size works and no context is gathered first. Inputs may be bf16/fp16/fp32; scores, softmax and the
output accumulate in fp32.

A query at position p sees keys in [window_start(p), p], where window_start(p) = (p // chunk) * chunk on a
chunked layer and 0 on a global one; a global layer passes a chunk larger than any position, which makes
the same formula give 0 without a branch.

Decode (one query per sequence) runs one program per (sequence, KV head, split): the program serves every
query head of that KV head's group at once (GQA), over its share of the visible keys, and writes a partial
output and its log-sum-exp; a second kernel merges the splits. The split count is a launch constant and
each program sizes its share from the sequence's own length, so a captured CUDA graph replays correctly for
any context length.

Extend runs one program per (sequence, query head, tile of BLOCK_M new tokens) over the keys the tile can
see, with the causal and chunk masks applied per (query, key).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A chunk no position reaches: global layers use it, so window_start(p) == 0.
NO_CHUNK = 1 << 30
# A finite "minus infinity" for running maxima: keeps exp(m_old - m_new) finite for rows that saw no key yet.
_NEG_BIG = -1.0e30
_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q,  # [B, H, D]
    K,  # [slots, KVH, D]
    V,
    block_table,  # [B, W] int32
    context_lens,  # [B] int32
    O_part,  # [B, H, S, D] fp32
    LSE_part,  # [B, H, S] fp32
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_bt,
    sm_scale_log2,
    chunk,
    PAGE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens + b)
    q_pos = ctx - 1
    lo = (q_pos // chunk) * chunk
    n = ctx - lo
    per_split = ((n + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_mask[:, None] & d_mask[None, :], other=0.0
    )

    m_i = tl.full([BLOCK_G], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n_start in range(start, end, BLOCK_N):
        pos = n_start + tl.arange(0, BLOCK_N)
        p_mask = pos < end
        page = tl.load(block_table + b * stride_bt + pos // PAGE, mask=p_mask, other=0)
        slot = page.to(tl.int64) * PAGE + pos % PAGE
        kv_mask = p_mask[:, None] & d_mask[None, :]
        k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # log-sum-exp in base 2 of the scaled scores; an empty split weighs nothing in the merge.
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    row = (b * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
    tl.store(O_part + row[:, None] * HEAD_DIM + d[None, :], out, mask=g_mask[:, None] & d_mask[None, :])
    tl.store(LSE_part + row, lse, mask=g_mask)


@triton.jit
def _decode_merge_kernel(
    O_part,  # [B, H, S, D] fp32
    LSE_part,  # [B, H, S]
    Out,  # [B, H, D]
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = b * tl.num_programs(1) + h
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    lse = tl.load(LSE_part + row * NUM_SPLITS + s, mask=s_mask, other=float("-inf"))
    w = tl.math.exp2(lse - tl.max(lse, 0))
    parts = tl.load(
        O_part + (row * NUM_SPLITS + s)[:, None] * HEAD_DIM + d[None, :],
        mask=s_mask[:, None] & (d < HEAD_DIM)[None, :],
        other=0.0,
    )
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _extend_kernel(
    Q,  # [T, H, D]
    K,  # [slots, KVH, D]
    V,
    Out,  # [T, H, D]
    block_table,  # [B, W] int32
    query_start_loc,  # [B + 1] int32
    context_lens,  # [B] int32
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    sm_scale_log2,
    chunk,
    PAGE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    if tile * BLOCK_M < q_len:
        ctx = tl.load(context_lens + b)
        kvh = h // GROUP
        m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < q_len
        q_pos = ctx - q_len + m
        d = tl.arange(0, BLOCK_D)
        d_mask = d < HEAD_DIM
        rows = (q_start + m).to(tl.int64)
        q_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + d[None, :], mask=q_mask, other=0.0)
        first_q = ctx - q_len + tile * BLOCK_M
        lo = (first_q // chunk) * chunk
        hi = tl.minimum(first_q + BLOCK_M, ctx)  # one past the tile's last query position
        q_lo = (q_pos // chunk) * chunk

        m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n_start in range(lo, hi, BLOCK_N):
            pos = n_start + tl.arange(0, BLOCK_N)
            p_mask = pos < hi
            page = tl.load(block_table + b * stride_bt + pos // PAGE, mask=p_mask, other=0)
            slot = page.to(tl.int64) * PAGE + pos % PAGE
            kv_mask = p_mask[:, None] & d_mask[None, :]
            k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2
            visible = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] >= q_lo[:, None]) & p_mask[None, :]
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            Out + rows[:, None] * stride_ot + h * stride_oh + d[None, :],
            out.to(Out.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


def _dot_shape(n: int) -> int:
    """Tile sizes tl.dot accepts: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n))


def _precision(dtype: torch.dtype) -> str:
    # fp32 models (the tests, the CPU reference) get exact fp32 products, not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [B, W] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
    chunk: int,
    num_splits: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    batch, heads, head_dim = q.shape
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    k_flat, v_flat = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    o_part = torch.empty((batch, heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((batch, heads, num_splits), dtype=torch.float32, device=q.device)
    block_d = _dot_shape(head_dim)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q,
        k_flat,
        v_flat,
        block_table,
        context_lens,
        o_part,
        lse_part,
        q.stride(0),
        q.stride(1),
        k_flat.stride(0),
        k_flat.stride(1),
        v_flat.stride(0),
        v_flat.stride(1),
        block_table.stride(0),
        scale * _LOG2E,
        chunk,
        PAGE=page,
        GROUP=group,
        BLOCK_G=_dot_shape(group),
        BLOCK_N=32 if q.is_cuda else 16,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        NUM_SPLITS=num_splits,
        PRECISION=_precision(q.dtype),
    )
    if out is None:
        out = torch.empty_like(q)
    _decode_merge_kernel[(batch, heads)](
        o_part,
        lse_part,
        out,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
    )
    return out


def extend_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [B, W] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    context_lens: torch.Tensor,  # [B] int32
    max_query_len: int,
    scale: float,
    chunk: int,
) -> torch.Tensor:
    _, heads, head_dim = q.shape
    page, kv_heads = k_cache.shape[1], k_cache.shape[2]
    k_flat, v_flat = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    out = torch.empty_like(q)
    block_m = 64 if q.is_cuda else 16
    grid = (context_lens.shape[0], heads, triton.cdiv(max_query_len, block_m))
    _extend_kernel[grid](
        q,
        k_flat,
        v_flat,
        out,
        block_table,
        query_start_loc,
        context_lens,
        q.stride(0),
        q.stride(1),
        k_flat.stride(0),
        k_flat.stride(1),
        v_flat.stride(0),
        v_flat.stride(1),
        out.stride(0),
        out.stride(1),
        block_table.stride(0),
        scale * _LOG2E,
        chunk,
        PAGE=page,
        GROUP=heads // kv_heads,
        BLOCK_M=block_m,
        BLOCK_N=64 if q.is_cuda else 16,
        HEAD_DIM=head_dim,
        BLOCK_D=_dot_shape(head_dim),
        PRECISION=_precision(q.dtype),
    )
    return out
