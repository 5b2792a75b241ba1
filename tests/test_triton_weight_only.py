"""The weight-only Triton kernels (W4A16 GEMM, INT4 and FP8 fused MoE) against dequantize-then-matmul, under
Triton's interpreter on the CPU (conftest sets TRITON_INTERPRET=1 without a GPU; on a GPU they run compiled)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from herd.layers.moe import grouped_experts
from herd.layers.quantization.fp8 import quantize_fp8_rows
from herd.layers.quantization.int4 import dequantize_packed, pack_for_kernel, quantize_int4_groups
from herd.layers.triton_ops.weight_only import fused_moe_fp8, fused_moe_w4a16, w4a16_matmul

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def int4_weight(out: int, inp: int, group: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q, scales = quantize_int4_groups(torch.randn(out, inp, generator=gen) / inp**0.5, group)
    return pack_for_kernel(q, scales, torch.float32, cpu_layout=False)


@pytest.mark.parametrize(("rows", "out", "inp", "group"), [(1, 48, 64, 32), (19, 40, 96, 32), (5, 16, 128, 128)])
def test_w4a16_matmul_matches_dequantized_linear(rows: int, out: int, inp: int, group: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    packed, scales = int4_weight(out, inp, group, gen)
    x = torch.randn(rows, inp, generator=gen)
    expected = F.linear(x, dequantize_packed(packed, scales, group))
    got = w4a16_matmul(x.to(DEVICE), packed.to(DEVICE), scales.to(DEVICE), group)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_dequantize_packed_is_q_times_s() -> None:
    gen = torch.Generator().manual_seed(0)
    q, scales = quantize_int4_groups(torch.randn(8, 64, generator=gen), 32)
    packed, kernel_scales = pack_for_kernel(q, scales, torch.float32, cpu_layout=False)
    expected = (q.float().reshape(8, 2, 32) * scales[..., None]).reshape(8, 64)
    assert torch.equal(dequantize_packed(packed, kernel_scales, 32), expected)


@pytest.mark.parametrize(("rows", "experts", "hidden", "inter"), [(1, 4, 64, 32), (23, 4, 64, 64), (20, 16, 32, 32)])
def test_fused_moe_w4a16_matches_grouped_experts(rows: int, experts: int, hidden: int, inter: int) -> None:
    gen = torch.Generator().manual_seed(rows + experts)
    gate_up = [int4_weight(2 * inter, hidden, 32, gen) for _ in range(experts)]
    down = [int4_weight(hidden, inter, 32, gen) for _ in range(experts)]
    x = torch.randn(rows, hidden, generator=gen)
    ids = torch.randint(0, experts, (rows,), generator=gen)

    def expert(e: int, r: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(r, dequantize_packed(*gate_up[e], 32)).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, dequantize_packed(*down[e], 32))

    expected = grouped_experts(x, ids, expert)
    stacked = [torch.stack([t[i] for t in ws]).to(DEVICE) for ws in (gate_up, down) for i in (0, 1)]
    got = fused_moe_w4a16(x.to(DEVICE), ids.to(DEVICE), *stacked, 32, 32)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)


def test_fused_moe_fp8_matches_grouped_experts() -> None:
    rows, experts, hidden, inter = 21, 4, 64, 48
    gen = torch.Generator().manual_seed(1)
    weights = {
        name: [quantize_fp8_rows(torch.randn(out, inp, generator=gen) / inp**0.5) for _ in range(experts)]
        for name, out, inp in (("gate_up", 2 * inter, hidden), ("down", hidden, inter))
    }
    x = torch.randn(rows, hidden, generator=gen)
    ids = torch.randint(0, experts, (rows,), generator=gen)

    def linear(r: torch.Tensor, name: str, e: int) -> torch.Tensor:
        q, s = weights[name][e]
        return F.linear(r, q.float() * s[:, None])

    def expert(e: int, r: torch.Tensor) -> torch.Tensor:
        gate, up = linear(r, "gate_up", e).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, "down", e)

    expected = grouped_experts(x, ids, expert)
    stacked = [torch.stack([w[i] for w in weights[name]]).to(DEVICE) for name in ("gate_up", "down") for i in (0, 1)]
    got = fused_moe_fp8(x.to(DEVICE), ids.to(DEVICE), *stacked)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-5, rtol=1e-5)
