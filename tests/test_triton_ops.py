"""The fused Triton kernels against the PyTorch paths they replace, under Triton's interpreter on the CPU
(conftest sets TRITON_INTERPRET=1 without a GPU; on a GPU the same tests run compiled)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from herd.layers.moe import grouped_experts, swiglu_expert
from herd.layers.triton_ops.fused_moe import fused_moe_swiglu

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    ("rows", "experts", "hidden", "inter", "skew"),
    [
        (1, 4, 32, 48, False),  # one decoding token
        (37, 4, 40, 24, True),  # most rows to one expert, one expert idle, widths not multiples of a tile
        (20, 16, 24, 16, False),  # Scout's 16 experts, most with 1-2 rows
    ],
)
def test_fused_moe_matches_grouped_experts(rows: int, experts: int, hidden: int, inter: int, skew: bool) -> None:
    gen = torch.Generator().manual_seed(rows + experts)
    x = torch.randn(rows, hidden, generator=gen)
    gate_up = torch.randn(experts, hidden, 2 * inter, generator=gen) / hidden**0.5
    down = torch.randn(experts, inter, hidden, generator=gen) / inter**0.5
    ids = torch.randint(0, experts, (rows,), generator=gen)
    if skew:
        ids = torch.where(torch.rand(rows, generator=gen) < 0.7, 2, ids)
        ids[ids == 1] = 0
    expected = grouped_experts(x, ids, lambda e, r: swiglu_expert(r, gate_up[e], down[e]))
    got = fused_moe_swiglu(x.to(DEVICE), ids.to(DEVICE), gate_up.to(DEVICE), down.to(DEVICE))
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)
