"""Routed experts, computed only for the tokens that chose them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_experts(
    x: torch.Tensor,  # [T, H], already scaled by each token's router score, one row per (token, choice)
    expert_ids: torch.Tensor,  # [T] int64: the expert each row goes to
    gate_up: torch.Tensor,  # [E, H, 2I]: gate in the first I columns, up in the last I
    down: torch.Tensor,  # [E, I, H]
) -> torch.Tensor:  # [T, H]
    """SwiGLU experts, one matmul pair per expert that has rows: never all experts on all rows."""
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=gate_up.shape[0]).tolist()
    x_sorted = x[order]
    out_sorted = torch.empty_like(x_sorted)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        gate, up = (x_sorted[rows] @ gate_up[e]).chunk(2, dim=-1)
        out_sorted[rows] = (F.silu(gate) * up) @ down[e]
        start += count
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return out
