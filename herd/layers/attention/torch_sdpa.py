"""Paged attention in plain PyTorch: gather each sequence's visible KV, then SDPA.

The CPU default and the reference every other backend is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.layers.attention.base import AttentionBackend, register_backend
from herd.layers.attention.metadata import AttentionMetadata


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
        block_size = meta.block_size
        # Scatter this step's K/V into their slots: [num_blocks * block_size, kv_heads, head_dim] views.
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, pool.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, pool.slot_mapping, v)

        out = torch.empty_like(q)
        for i in range(meta.num_seqs):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            n_new, ctx = end - start, meta.context_lens[i]
            first_q = ctx - n_new
            # Chunked layers: no query of this step can see anything before its own chunk.
            kv_start = (first_q // chunk_size) * chunk_size if chunk_size else 0
            first_block = kv_start // block_size
            blocks = pool.block_tables[i][first_block : (ctx + block_size - 1) // block_size]
            idx = torch.tensor(blocks, dtype=torch.long, device=q.device)
            offset = kv_start - first_block * block_size
            keys = k_cache[idx].flatten(0, 1)[offset : offset + ctx - kv_start]  # [L, kv_heads, D]
            values = v_cache[idx].flatten(0, 1)[offset : offset + ctx - kv_start]
            mask = _mask(first_q, n_new, kv_start, ctx, chunk_size, q.device)
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1),
                keys.transpose(0, 1),
                values.transpose(0, 1),
                attn_mask=mask,
                scale=scale,
                enable_gqa=True,
            )
            out[start:end] = o.transpose(0, 1)
        return out


def _mask(
    first_q: int, n_new: int, kv_start: int, ctx: int, chunk_size: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean [n_new, ctx - kv_start] mask (True = may attend), or None when all may."""
    if n_new == 1:  # a lone query sees everything gathered for it
        return None
    q_pos = torch.arange(first_q, ctx, device=device)[:, None]
    k_pos = torch.arange(kv_start, ctx, device=device)[None, :]
    mask = k_pos <= q_pos
    if chunk_size is not None:
        mask &= k_pos >= (q_pos // chunk_size) * chunk_size
    return mask
