"""herd's W4A16 CPU kernel (herd/kernels/cpu/int4_bf16.cpp) against the dequantized matmul, on herd's layout."""

from __future__ import annotations

import pytest
import torch

from herd.kernels.cpu import gemv_ops
from herd.layers.factory import LayerFactory
from herd.layers.quantization import int4
from herd.layers.quantization.int4 import dequantize_packed, int4_linear, pack_for_kernel, quantize_int4_groups
from herd.layers.quantization.select import select_quantization
from herd.layers.quantization.unquantized import UnquantizedConfig
from herd.models.loader import load_model

from paged import PagedRunner

pytestmark = pytest.mark.skipif(
    gemv_ops() is None or not torch.ops.herd_cpu.int4_bf16_supported(),
    reason="herd's CPU kernels did not build here, or this CPU lacks AVX512-BF16",
)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize(("n", "k", "group"), [(1, 64, 64), (37, 256, 128), (130, 512, 256), (64, 384, 128)])
def test_w4a16_matches_the_dequantized_matmul(m: int, n: int, k: int, group: int) -> None:
    gen = torch.Generator().manual_seed(m * 100 + n + k)
    q, scales = quantize_int4_groups(torch.randn(n, k, generator=gen), group)
    packed, kernel_scales = pack_for_kernel(q, scales, torch.bfloat16)
    assert packed.shape == (n, k // 2) and kernel_scales.dtype == torch.float32  # herd's layout on this CPU
    x = torch.randn(2, m, k, generator=gen).bfloat16()

    got = int4_linear(x, packed, kernel_scales, group)

    expected = (x.float() @ dequantize_packed(packed, kernel_scales, group).t()).bfloat16()
    assert got.dtype == torch.bfloat16 and got.shape == (2, m, n)
    # Exact products, fp32 sums in another order: within a bf16 rounding step.
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2 * k**0.5)


@pytest.mark.parametrize("m", [1, 2])  # the int16 path (VNNI)
@pytest.mark.parametrize(("k", "group"), [(2048, 128), (1024, 256), (1024, 512)])
def test_decode_rows_are_the_exact_products_rounded_once(m: int, k: int, group: int) -> None:
    """One or two rows of x, with outliers 300 times the rest (as real activations have): the bf16 rounding of the
    exact product but for fp32's summation error, as the bf16 path gives."""
    gen = torch.Generator().manual_seed(k + group + m)
    q, scales = quantize_int4_groups(torch.randn(512, k, generator=gen), group)
    packed, kernel_scales = pack_for_kernel(q, scales, torch.bfloat16)
    x = torch.randn(m, k, generator=gen)
    x[:, ::97] *= 300
    x = x.bfloat16()
    weight = dequantize_packed(packed, kernel_scales, group).double()

    got = torch.ops.herd_cpu.w4a16_linear(x, packed, kernel_scales, group).double()

    exact = x.double() @ weight.t()
    bound = 2**-8 * exact.abs() + 1e-6 * (x.double().abs() @ weight.abs().t())  # a bf16 rounding + fp32 sums
    assert ((got - exact).abs() <= bound).all()
    assert (got == exact.bfloat16().double()).float().mean() > 0.999


def test_decode_rows_carry_infinities_as_the_bf16_path_does() -> None:
    q, scales = quantize_int4_groups(torch.randn(64, 256), 128)
    packed, kernel_scales = pack_for_kernel(q, scales, torch.bfloat16)
    x = torch.randn(3, 256).bfloat16()
    x[0, 5] = float("inf")
    three = torch.ops.herd_cpu.w4a16_linear(x, packed, kernel_scales, 128)  # the bf16 path
    one = torch.ops.herd_cpu.w4a16_linear(x[:1], packed, kernel_scales, 128)
    assert torch.equal(one.isfinite(), three[:1].isfinite()) and not one.isfinite().all()


def test_float32_models_keep_pytorchs_layout_and_float32_rows_meet_herds_dequantized() -> None:
    q, scales = quantize_int4_groups(torch.randn(16, 128), 64)
    assert pack_for_kernel(q, scales, torch.float32)[1].dim() == 3  # PyTorch's scales-and-zeros
    packed, kernel_scales = pack_for_kernel(q, scales, torch.float32, cpu_layout=False)
    x = torch.randn(3, 128)
    expected = x @ dequantize_packed(packed, kernel_scales, 64).t()
    torch.testing.assert_close(int4_linear(x, packed, kernel_scales, 64), expected)


def test_w4a16_refuses_groups_it_does_not_take() -> None:
    packed, scales = torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="groups of 32 over 64 inputs"):
        torch.ops.herd_cpu.w4a16_linear(torch.zeros(1, 64).bfloat16(), packed, scales, 32)


def test_bf16_model_decodes_as_on_pytorchs_kernel(maverick_ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    """--quantization w4a16 on a bf16 model: herd's kernel (experts and linear layers, prefill and decode) against
    PyTorch's on the same INT4 weights: logits within bf16 noise."""

    def quantized() -> torch.nn.Module:
        config = select_quantization(None, "", "w4a16", UnquantizedConfig(cpu_packed=True))
        return load_model(maverick_ckpt[0], dtype="bfloat16", factory=LayerFactory(config))

    herd_model = quantized()
    assert herd_model.model.layers[0].self_attn.qkv_proj.weight_int4_scale.dim() == 2  # herd's layout
    monkeypatch.setattr(int4, "herd_cpu_kernel_takes", lambda group: False)
    torch_model = quantized()
    assert torch_model.model.layers[0].self_attn.qkv_proj.weight_int4_scale.dim() == 3  # PyTorch's
    ids = list(range(3, 23))
    runners = [PagedRunner(model, max_seqs=1, max_len=len(ids) + 4) for model in (herd_model, torch_model)]
    for step in [[(0, ids)], *([(0, [t])] for t in (5, 9, 11, 7))]:
        got, expected = (runner.step(step).float() for runner in runners)
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.1)
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75
