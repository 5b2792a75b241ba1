"""Routed experts, computed only for the tokens that chose them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def grouped_experts(
    x: torch.Tensor,  # [T, H], already scaled by each token's router score, one row per (token, choice)
    expert_ids: torch.Tensor,  # [T] int64: the expert each row goes to
    expert: Callable[[int, torch.Tensor], torch.Tensor],  # (e, rows [n, H]) -> expert e's output [n, H]
) -> torch.Tensor:  # [T, H]
    """Run each expert once on the rows that chose it: never all experts on all rows."""
    if x.shape[0] == 1:  # one decoding sequence: skip the grouping
        return expert(int(expert_ids), x)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids).tolist()
    x_sorted = x[order]
    out_sorted = torch.empty_like(x_sorted)
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        out_sorted[rows] = expert(e, x_sorted[rows])
        start += count
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return out


def swiglu_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert in HF's fused layout: gate_up [H, 2I] (gate first), down [I, H]."""
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down
