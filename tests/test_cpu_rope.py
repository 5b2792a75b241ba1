"""herd's CPU op for Llama 4's RoPE + qk-norm (herd/kernels/cpu/rope_qk_norm.cpp) against PyTorch's ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from herd.kernels.cpu import gemv_ops
from herd.layers.rotary import apply_rope, rope_angles, rope_inv_freq

pytestmark = pytest.mark.skipif(gemv_ops() is None, reason="herd's CPU kernels did not build here (or no AVX-512)")


def reference(qk: torch.Tensor, angles: torch.Tensor, rope: bool, norm: bool) -> torch.Tensor:
    out = apply_rope(qk, angles) if rope else qk
    return F.rms_norm(out.float(), (qk.shape[-1],), eps=1e-5).type_as(qk) if norm else out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rope", "norm"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize(("tokens", "heads", "head_dim"), [(1, 10, 32), (7, 48, 128), (64, 3, 64)])
def test_rope_qk_norm_matches_pytorch(
    tokens: int, heads: int, head_dim: int, rope: bool, norm: bool, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(tokens * heads + head_dim)
    qkv = (torch.randn(tokens, (heads + 3) * head_dim, generator=gen) * 3).to(dtype)
    qk = qkv[:, : heads * head_dim].unflatten(-1, (heads, head_dim))  # a view into a wider row, as in the model
    positions = torch.randint(0, 10_000, (tokens,), generator=gen)
    angles = rope_angles(positions, rope_inv_freq(head_dim, 500_000.0, None))
    got = torch.ops.herd_cpu.rope_qk_norm(qk, angles, rope, norm, 1e-5)
    expected = reference(qk, angles, rope, norm)
    assert got.dtype == dtype and got.shape == qk.shape and got.is_contiguous()
    # The same roundings at the same points; only the norm's sum may add up in another order (one ulp).
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    assert (got == expected).float().mean() > 0.999
    # Exactly what the unfused CPU path gives (PyTorch's RoPE, then herd's rms_norm op).
    unfused = apply_rope(qk, angles) if rope else qk
    if norm:
        unfused = torch.ops.herd_cpu.rms_norm(unfused, None, 1e-5)
    assert torch.equal(got, unfused)


def test_rope_qk_norm_refuses_what_it_does_not_take() -> None:
    angles = rope_angles(torch.arange(2), rope_inv_freq(32, 500_000.0, None))
    with pytest.raises(RuntimeError, match="bfloat16 or float16"):
        torch.ops.herd_cpu.rope_qk_norm(torch.randn(2, 4, 32), angles, True, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"complex64 \[tokens, head_dim / 2\]"):
        torch.ops.herd_cpu.rope_qk_norm(torch.randn(3, 4, 32).bfloat16(), angles, True, True, 1e-5)
