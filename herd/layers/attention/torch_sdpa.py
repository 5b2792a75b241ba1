"""Paged attention in plain PyTorch: gather each sequence's visible KV, then SDPA.

The CPU default and the reference every other backend is tested against. Sequences with
one new token (decode) are gathered into one padded batch and served by a single SDPA call;
sequences with several new tokens (prefill) are served one at a time with a causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.layers.attention.base import AttentionBackend, register_backend
from herd.layers.attention.metadata import AttentionMetadata, PoolView


@register_backend("torch_native")
class TorchSDPABackend(AttentionBackend):
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        chunk_size: int | None,
        scale: float,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        pool = meta.pool(chunk_size is not None)
        # Scatter this step's K/V into their slots: [num_blocks * block_size, kv_heads, head_dim] views.
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, pool.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, pool.slot_mapping, v)

        out = torch.empty_like(q)
        decode = []
        for i in range(meta.num_seqs):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if end - start == 1:
                decode.append(i)
                continue
            first_q, ctx = meta.context_lens[i] - (end - start), meta.context_lens[i]
            # Chunked layers: no query of this step can see anything before its own chunk.
            kv_start = (first_q // chunk_size) * chunk_size if chunk_size else 0
            keys, values = _gather(k_cache, v_cache, pool.block_tables[i], kv_start, ctx, meta.block_size)
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1),
                keys.transpose(0, 1),
                values.transpose(0, 1),
                attn_mask=_causal_mask(first_q, ctx, kv_start, chunk_size, q.device),
                scale=scale,
                enable_gqa=True,
            )
            out[start:end] = o.transpose(0, 1)
        if decode:
            if ("rows", None) not in meta.derived:
                meta.derived[("rows", None)] = torch.tensor([meta.query_start_loc[i] for i in decode], device=q.device)
            rows = meta.derived[("rows", None)]
            out[rows] = _decode_batch(q[rows], k_cache, v_cache, pool, meta, decode, chunk_size, scale)
        return out


def _gather(
    k_cache: torch.Tensor, v_cache: torch.Tensor, table: list[int], kv_start: int, ctx: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of context positions [kv_start, ctx): each [ctx - kv_start, kv_heads, head_dim]."""
    first_block = kv_start // block_size
    idx = torch.tensor(table[first_block : (ctx + block_size - 1) // block_size], device=k_cache.device)
    offset = kv_start - first_block * block_size
    span = slice(offset, offset + ctx - kv_start)
    return k_cache[idx].flatten(0, 1)[span], v_cache[idx].flatten(0, 1)[span]


def _causal_mask(first_q: int, ctx: int, kv_start: int, chunk_size: int | None, device: torch.device) -> torch.Tensor:
    """Boolean [queries, ctx - kv_start] mask, True where a query may attend."""
    q_pos = torch.arange(first_q, ctx, device=device)[:, None]
    k_pos = torch.arange(kv_start, ctx, device=device)[None, :]
    mask = k_pos <= q_pos
    if chunk_size is not None:
        mask &= k_pos >= (q_pos // chunk_size) * chunk_size
    return mask


def _decode_batch(
    q: torch.Tensor,  # [B, n_heads, D], one query per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pool: PoolView,
    meta: AttentionMetadata,
    seqs: list[int],
    chunk_size: int | None,
    scale: float,
) -> torch.Tensor:  # [B, n_heads, D]
    key = ("decode", chunk_size)
    if key not in meta.derived:
        meta.derived[key] = _decode_layout(pool, meta, seqs, chunk_size, q.device)
    table, valid = meta.derived[key]
    # Masked slots hold finite values (blocks are zeroed on first use; padding repeats the row's own
    # last block), so the mask alone excludes them.
    keys = k_cache[table].flatten(1, 2)  # [B, width * block_size, kv_heads, D]
    values = v_cache[table].flatten(1, 2)
    o = F.scaled_dot_product_attention(
        q[:, :, None, :],  # [B, n_heads, 1, D]
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return o[:, :, 0, :]


def _decode_layout(
    pool: PoolView, meta: AttentionMetadata, seqs: list[int], chunk_size: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded block table [B, width] of the visible blocks, and which of their slots are visible."""
    bs = meta.block_size
    rows, offsets, lengths = [], [], []
    for i in seqs:
        ctx = meta.context_lens[i]
        kv_start = ((ctx - 1) // chunk_size) * chunk_size if chunk_size else 0
        first = kv_start // bs
        rows.append(pool.block_tables[i][first : (ctx + bs - 1) // bs])
        offsets.append(kv_start - first * bs)
        lengths.append(ctx - kv_start)
    width = max(map(len, rows))
    table = torch.tensor([row + row[-1:] * (width - len(row)) for row in rows], dtype=torch.long, device=device)
    pos = torch.arange(width * bs, device=device)[None, :]
    start = torch.tensor(offsets, device=device)[:, None]
    valid = (pos >= start) & (pos < start + torch.tensor(lengths, device=device)[:, None])
    return table, valid
