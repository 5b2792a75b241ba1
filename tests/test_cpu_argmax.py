"""herd's CPU argmax for greedy sampling (herd/kernels/cpu/argmax.cpp) answers as torch.max(-1).indices does."""

from __future__ import annotations

import pytest
import torch

from herd.kernels.cpu import gemv_ops

pytestmark = pytest.mark.skipif(gemv_ops() is None, reason="herd's CPU kernels did not build here (or no AVX-512)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 2050, 32000])
def test_argmax_matches_torch_max_on_random_rows(n: int, dtype: torch.dtype) -> None:
    x = torch.randn(9, n, generator=torch.Generator().manual_seed(n)).to(dtype)  # bf16: ties among rounded values
    assert torch.equal(torch.ops.herd_cpu.argmax_rows(x), x.max(-1).indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_takes_the_first_of_tied_maxima_and_the_first_nan(dtype: torch.dtype) -> None:
    x = torch.zeros(5, 40, dtype=dtype)
    x[0, [7, 20, 39]] = 3.0  # ties: the first
    x[1, 33] = float("nan")  # a NaN wins, as in torch.max
    x[1, 34] = float("nan")
    x[1, 2] = 5.0
    x[2] = float("-inf")  # nothing but -inf: index 0
    x[3, 39] = float("nan")  # a NaN in the tail past the last 16
    x[4, 38] = float("inf")
    got = torch.ops.herd_cpu.argmax_rows(x)
    assert got.tolist() == [7, 33, 0, 39, 38]
    assert torch.equal(got, x.max(-1).indices)


def test_argmax_reads_a_strided_view() -> None:
    x = torch.randn(40, 6).t()  # [6, 40], not contiguous
    assert torch.equal(torch.ops.herd_cpu.argmax_rows(x), x.max(-1).indices)
