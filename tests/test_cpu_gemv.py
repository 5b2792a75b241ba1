"""herd's CPU kernels (herd.kernels.cpu: bf16 and INT8 weight-streaming matmuls, RMSNorm) and the linear/expert
methods that use them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from herd.kernels.cpu import gemv_ops
from herd.layers.factory import LayerFactory
from herd.layers.moe import grouped_experts
from herd.layers.quantization import cpu_gemv
from herd.layers.quantization.select import select_quantization
from herd.layers.quantization.unquantized import UnquantizedConfig
from herd.models.loader import load_model

from checkpoints import reference_logits
from paged import PagedRunner

pytestmark = pytest.mark.skipif(gemv_ops() is None, reason="herd's CPU kernels did not build here (or no AVX-512)")

# Every remainder: weight rows by 4, columns by 16/32; the last is over 1 MiB, read row after row at one row of x.
SHAPES = [(1, 32), (7, 40), (33, 256), (130, 2050), (301, 1800)]


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_gemv_matches_an_fp32_matmul(m: int, n: int, k: int, x_dtype: torch.dtype) -> None:
    """Every blocking remainder: rows of the weight (by 4), rows of x (by 4), columns (by 32). bf16 x takes the
    AVX512-BF16 dot products where the CPU has them, float32 x the widening kernel."""
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    w = torch.randn(n, k, generator=gen).bfloat16()
    got = torch.ops.herd_cpu.gemv_bf16(x, w)
    expected = (x.float() @ w.float().t()).to(x_dtype)
    assert got.dtype == x_dtype and got.shape == (m, n)
    # fp32 accumulation in another order: within a bf16 rounding step of the fp32 result.
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2 * k**0.5)


@pytest.mark.parametrize("rows", [1, 9, 64, 65])
def test_bf16_linear_matches_an_fp32_matmul_on_each_path(rows: int) -> None:
    """The kernel (few rows), the weight-first matmul (9-64 rows of >= 1024 inputs) and F.linear (more rows)."""
    gen = torch.Generator().manual_seed(rows)
    k = cpu_gemv.WEIGHT_FIRST_MIN_INPUTS
    x = torch.randn(rows, 1, k, generator=gen).bfloat16()  # leading dims kept
    w = torch.randn(96, k, generator=gen).bfloat16()
    got = cpu_gemv.bf16_linear(x, w)
    assert got.shape == (rows, 1, 96) and got.dtype == torch.bfloat16 and got.is_contiguous()
    torch.testing.assert_close(got.float(), x.float() @ w.float().t(), rtol=1e-2, atol=1e-2 * k**0.5)


def test_gemv_keeps_leading_dims() -> None:
    x, w = torch.randn(2, 3, 64).bfloat16(), torch.randn(5, 64).bfloat16()
    assert torch.ops.herd_cpu.gemv_bf16(x, w).shape == (2, 3, 5)
    assert torch.ops.herd_cpu.gemv_bf16(x[:, :0], w).shape == (2, 0, 5)


def test_gemv_refuses_other_dtypes() -> None:
    with pytest.raises(RuntimeError, match="contiguous bf16"):
        torch.ops.herd_cpu.gemv_bf16(torch.randn(1, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        torch.ops.herd_cpu.gemv_bf16(torch.ones(1, 8, dtype=torch.int32), torch.randn(4, 8).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_int8_gemv_matches_the_dequantized_matmul(dtype: torch.dtype, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=gen).to(dtype)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n, generator=gen) * 0.01).to(dtype)
    got = torch.ops.herd_cpu.gemv_int8(x, q, scales)
    expected = x.float() @ (q.float() * scales.float()[:, None]).t()
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol * k**0.5)


def test_gemv_model_decodes_as_the_packed_one(scout_ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bf16 checkpoint through the GEMV methods and through oneDNN's packed ones: a prefill (the
    matmul path), decode steps and a 3-token step (a verify's few rows: the kernel) give logits within bf16 noise
    of each other."""
    path, _ = scout_ckpt
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: True)
    small = load_model(path, dtype="bfloat16", factory=LayerFactory(UnquantizedConfig(cpu_packed=True)))
    tiny_experts = small.model.layers[0].feed_forward.experts
    assert hasattr(tiny_experts, "packed_down_all") and hasattr(tiny_experts, "gate_up_proj_t")  # by rows, as linears
    qkv = small.model.layers[0].self_attn.qkv_proj
    assert hasattr(qkv, "packed_weight") and hasattr(qkv, "row_weight")  # tiny linear layers: both, by rows
    monkeypatch.setattr(cpu_gemv, "SMALL_EXPERTS_BYTES", 0)
    monkeypatch.setattr(cpu_gemv, "SMALL_LINEAR_BYTES", 0)
    monkeypatch.setattr(cpu_gemv, "NARROW_LINEAR_BYTES", 0)
    fast = load_model(path, dtype="bfloat16", factory=LayerFactory(UnquantizedConfig(cpu_packed=True)))
    assert hasattr(fast.model.layers[0].feed_forward.experts, "gate_up_proj_t")
    assert "weight" in fast.model.layers[0].self_attn.qkv_proj._parameters
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: False)
    packed = load_model(path, dtype="bfloat16", factory=LayerFactory(UnquantizedConfig(cpu_packed=True)))
    assert hasattr(packed.model.layers[0].feed_forward.experts, "packed_gate_up_0")
    ids = list(range(3, 23))
    runners = [PagedRunner(model, max_seqs=1, max_len=len(ids) + 5) for model in (fast, small, packed)]
    for step in [[(0, ids)], [(0, [5])], [(0, [9, 11, 7])], [(0, [13])]]:
        *got, expected = (runner.step(step).float() for runner in runners)
        for logits in got:
            torch.testing.assert_close(logits, expected, rtol=0.05, atol=0.1)
            assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


def test_quantized_runs_keep_the_base_methods_for_unquantized_layers(scout_ckpt, monkeypatch) -> None:
    """--quantization leaves the router in bf16; it takes the methods a bf16 run would (packed, and the kernel
    at one row), not a plain matmul."""
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: True)
    base = UnquantizedConfig(cpu_packed=True)
    model = load_model(
        scout_ckpt[0], dtype="bfloat16", factory=LayerFactory(select_quantization(None, "", "w8a8_int8", base))
    )
    router = model.model.layers[0].feed_forward.router
    assert hasattr(router, "row_weight") and hasattr(router, "packed_weight")
    assert hasattr(model.model.layers[0].self_attn.qkv_proj, "weight_int8")


@pytest.mark.parametrize("weight_first", [False, True])
def test_gemv_model_follows_transformers(scout_ckpt, monkeypatch: pytest.MonkeyPatch, weight_first: bool) -> None:
    """Every bf16 linear layer and expert through the kernel (size thresholds off): the prefill and each decode
    step agree with transformers' float32 logits as bf16 does (test_llama4_text's bar). weight_first: the prefill's
    20 rows take the `(W @ x.T).T` matmul, which the tiny model's few inputs would otherwise leave to F.linear."""
    path, ref = scout_ckpt
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: True)
    monkeypatch.setattr(cpu_gemv, "SMALL_EXPERTS_BYTES", 0)
    monkeypatch.setattr(cpu_gemv, "SMALL_LINEAR_BYTES", 0)
    monkeypatch.setattr(cpu_gemv, "NARROW_LINEAR_BYTES", 0)
    if weight_first:
        monkeypatch.setattr(cpu_gemv, "WEIGHT_FIRST_MIN_INPUTS", 1)
    model = load_model(path, dtype="bfloat16", factory=LayerFactory(UnquantizedConfig(cpu_packed=True)))
    assert hasattr(model.model.layers[0].feed_forward.experts, "gate_up_proj_t")
    ids, decoded = list(range(3, 23)), [5, 9, 11, 7, 13, 17]
    runner = PagedRunner(model, max_seqs=1, max_len=len(ids) + len(decoded))
    got = [runner.step([(0, ids)]).float()] + [runner.step([(0, [t])]).float() for t in decoded]
    expected = reference_logits(ref, ids + decoded)
    assert torch.cat(got).shape == expected.shape
    agree = (torch.cat(got).argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree >= 0.75


def _composed_experts(x: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Python's grouping and ops, as the experts' method ran them before the fused op."""

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = torch.ops.herd_cpu.gemv_bf16(rows, gate_up[e]).chunk(2, dim=-1)
        return torch.ops.herd_cpu.gemv_bf16(F.silu(gate) * up, down[e])

    return grouped_experts(x, ids, expert)


@pytest.mark.parametrize("ids", [[2], [0, 3, 3, 1, 0, 3, 1, 3], [1, 1, 1]])  # one row; 3 experts of 4; one for all
def test_swiglu_experts_equal_the_composed_ops(ids: list[int]) -> None:
    gen = torch.Generator().manual_seed(len(ids))
    experts, hidden, inter = 4, 96, 80
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.1).bfloat16()
    down = (torch.randn(experts, hidden, inter, generator=gen) * 0.1).bfloat16()
    x = torch.randn(len(ids), hidden, generator=gen).bfloat16()
    expert_ids = torch.tensor(ids)
    got = torch.ops.herd_cpu.swiglu_experts_bf16(x, expert_ids, gate_up, down)
    # The same roundings; SiLU's exp is glibc's, PyTorch's vectorised one may differ by an ulp before rounding.
    torch.testing.assert_close(got, _composed_experts(x, expert_ids, gate_up, down), rtol=2**-7, atol=1e-3)


def test_swiglu_experts_refuse_what_does_not_fit() -> None:
    gate_up, down = torch.zeros(2, 8, 16).bfloat16(), torch.zeros(2, 16, 4).bfloat16()
    x = torch.zeros(1, 16).bfloat16()
    with pytest.raises(RuntimeError, match="expert 2 of 2"):
        torch.ops.herd_cpu.swiglu_experts_bf16(x, torch.tensor([2]), gate_up, down)
    with pytest.raises(RuntimeError, match="do not fit"):
        torch.ops.herd_cpu.swiglu_experts_bf16(torch.zeros(1, 8).bfloat16(), torch.tensor([0]), gate_up, down)


@pytest.mark.parametrize("small", [True, False])
def test_mlp_swiglu_in_one_call_for_a_few_rows(small: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared expert's MLP as one kernel call for up to GEMV_MAX_ROWS bf16 rows, on the small layers' row copy
    or on the weight itself, equal to running its two layers; more rows or float32 run the layers."""
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: True)
    if not small:
        monkeypatch.setattr(cpu_gemv, "SMALL_LINEAR_BYTES", 0)
        monkeypatch.setattr(cpu_gemv, "NARROW_LINEAR_BYTES", 0)
    factory = LayerFactory(UnquantizedConfig(cpu_packed=True))
    gate_up, down = (
        factory.column("mlp.gate_up_proj", 64, [48, 48], shard_ids=(0, 1)),
        factory.row("mlp.down_proj", 48, 64),
    )
    gen = torch.Generator().manual_seed(1)
    for layer in (gate_up, down):
        layer.weight.data = (torch.randn(layer.weight.shape, generator=gen) * 0.1).bfloat16()
        layer.method.process_weights_after_loading(layer)
    assert hasattr(gate_up, "row_weight") == small
    method = gate_up.method
    for rows in (1, cpu_gemv.GEMV_MAX_ROWS):
        x = torch.randn(rows, 64, generator=gen).bfloat16()
        gate, up = gate_up(x).chunk(2, dim=-1)
        torch.testing.assert_close(method.swiglu(gate_up, down, x), down(F.silu(gate) * up), rtol=2**-7, atol=1e-3)
    assert method.swiglu(gate_up, down, torch.randn(cpu_gemv.GEMV_MAX_ROWS + 1, 64).bfloat16()) is None
    assert method.swiglu(gate_up, down, torch.randn(1, 64)) is None
