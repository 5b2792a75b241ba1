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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_torch(dtype: torch.dtype) -> None:
    from herd.layers.norm import RMSNorm
    from herd.layers.triton_ops.norm_rope import add_rms_norm

    gen = torch.Generator().manual_seed(3)
    x, delta = (torch.randn(5, 40, generator=gen).to(dtype) for _ in range(2))
    norm = RMSNorm(40, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(40, generator=gen))
        expected_sum = x + delta
        expected = norm(expected_sum)
    total, normed = add_rms_norm(x.to(DEVICE), delta.to(DEVICE), norm.weight.detach().to(DEVICE), 1e-5)
    # Exact on a GPU; Triton's interpreter truncates fp32 -> bf16 instead of rounding to nearest (one ulp).
    exact = dtype == torch.float32 or DEVICE.type == "cuda"
    torch.testing.assert_close(total.cpu(), expected_sum, atol=0, rtol=0 if exact else 2**-7)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(normed.cpu(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize(("use_rope", "use_norm"), [(True, True), (True, False), (False, True)])
def test_rope_qk_norm_matches_torch(use_rope: bool, use_norm: bool) -> None:
    from herd.layers.norm import rms_norm
    from herd.layers.rotary import apply_rope, rope_angles, rope_inv_freq
    from herd.layers.triton_ops.norm_rope import rope_qk_norm

    gen = torch.Generator().manual_seed(4)
    tokens, heads, dim = 6, 5, 16
    qkv = torch.randn(tokens, heads * dim + 24, generator=gen)  # q and k heads inside a wider row, as in the model
    qk = qkv[:, : heads * dim].unflatten(-1, (heads, dim))
    angles = rope_angles(torch.tensor([0, 1, 7, 8, 100, 5000]), rope_inv_freq(dim, 500000.0, None))
    expected = apply_rope(qk, angles) if use_rope else qk
    expected = rms_norm(expected, 1e-5) if use_norm else expected
    got = rope_qk_norm(qk.to(DEVICE), angles.to(DEVICE), use_rope, use_norm, 1e-5)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)
