"""A CPU decode step's decoder layers as one op each (herd/kernels/cpu/decode_layer.cpp,
herd/models/llama4_cpu_decode.py): the same logits as the modules, bit for bit, where it serves a step; the
modules where it does not."""

from __future__ import annotations

import pytest
import torch

from herd.kernels.cpu import gemv_ops
from herd.layers.factory import LayerFactory
from herd.layers.quantization import cpu_gemv
from herd.layers.quantization.select import select_quantization
from herd.layers.quantization.unquantized import UnquantizedConfig
from herd.models import llama4_text
from herd.models.llama4_cpu_decode import fused_layers, fused_step
from herd.models.loader import load_model

from paged import PagedRunner

pytestmark = pytest.mark.skipif(gemv_ops() is None, reason="herd's CPU kernels did not build here (or no AVX-512)")

# Prefills (spans: the modules), one-token decodes of three sequences, a 3-token chain (a verify step: decode
# queries), and decodes past the 8-token chunk and the 4-slot blocks.
STEPS = [
    [(0, list(range(3, 14))), (1, list(range(40, 46)))],
    [(0, [5]), (1, [9])],
    [(2, [17, 19])],
    [(0, [21]), (1, [23]), (2, [25])],
    [(1, [27, 29, 31])],
    *[[(0, [33 + i]), (1, [50 + i]), (2, [70 + i])] for i in range(8)],
]


def _count_fused(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    op = torch.ops.herd_cpu.decode_layer_bf16

    def counted(*args: object) -> torch.Tensor:
        calls[0] += 1
        return op(*args)

    monkeypatch.setattr(torch.ops.herd_cpu, "decode_layer_bf16", counted)
    return calls


@pytest.mark.parametrize("ckpt", ["scout_ckpt", "maverick_ckpt"])  # MoE in every layer, qk-norm; dense and MoE
@pytest.mark.parametrize("small", [True, False])  # small weights keep oneDNN's packed copy too, or the kernel's only
def test_fused_layers_give_the_modules_logits(ckpt: str, small: bool, request, monkeypatch) -> None:
    path, _ = request.getfixturevalue(ckpt)
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: True)
    if not small:
        monkeypatch.setattr(cpu_gemv, "SMALL_EXPERTS_BYTES", 0)
        monkeypatch.setattr(cpu_gemv, "SMALL_LINEAR_BYTES", 0)
    models = [
        load_model(path, dtype="bfloat16", factory=LayerFactory(UnquantizedConfig(cpu_packed=True))) for _ in range(2)
    ]
    assert fused_layers(models[0]) is not None
    runners = [PagedRunner(model, max_seqs=3, max_len=40) for model in models]
    calls = _count_fused(monkeypatch)
    layers = len(models[0].model.layers)
    for step in STEPS:
        before = calls[0]
        fused = runners[0].step(step)
        decoding = all(len(tokens) <= 8 for _, tokens in step) and sum(len(t) for _, t in step) <= 8
        assert calls[0] - before == (layers if decoding else 0), step
        with monkeypatch.context() as m:
            m.setattr(llama4_text, "fused_step", lambda *args: None)
            modules = runners[1].step(step)
        assert torch.equal(fused, modules), step
        for pool in ("full", "local"):  # released local blocks hold NaN in both
            torch.testing.assert_close(
                getattr(runners[0].kv, pool), getattr(runners[1].kv, pool), rtol=0, atol=0, equal_nan=True
            )


def test_other_methods_and_dtypes_keep_the_modules(scout_ckpt, monkeypatch) -> None:
    """Quantized experts, float32, or no CPU kernels: no fused layers (the modules run every step)."""
    path, _ = scout_ckpt
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: True)
    base = UnquantizedConfig(cpu_packed=True)
    w8a16 = load_model(path, dtype="bfloat16", factory=LayerFactory(select_quantization(None, "", "w8a16", base)))
    assert fused_layers(w8a16) is None
    fp32 = load_model(path, dtype="float32", factory=LayerFactory(base))
    runner = PagedRunner(fp32, max_seqs=1, max_len=16)
    calls = _count_fused(monkeypatch)
    runner.step([(0, [3, 4, 5])])
    runner.step([(0, [6])])
    assert calls[0] == 0
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: False)
    packed = load_model(path, dtype="bfloat16", factory=LayerFactory(base))
    assert fused_layers(packed) is None


def test_the_op_refuses_a_wrong_weight_list() -> None:
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16)
    ids = torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="5 \\(MoE\\) or 2 \\(dense\\)"):
        torch.ops.herd_cpu.decode_layer_bf16(
            x, torch.ones(1, 8, dtype=torch.complex64), None, [x[0]] * 3, cache, cache.clone(), ids,
            torch.zeros(1, 2, dtype=torch.long), ids, ids + 1, [4, 2, 16, 1, 1], 0.25, 1e-5,
        )  # fmt: skip


def test_a_cache_the_op_cannot_write_keeps_the_modules(scout_ckpt, monkeypatch) -> None:
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: True)
    model = load_model(scout_ckpt[0], dtype="bfloat16", factory=LayerFactory(UnquantizedConfig(cpu_packed=True)))
    layers = fused_layers(model)
    assert layers is not None
    x, positions = torch.zeros(1, model.config.hidden_size, dtype=torch.bfloat16), torch.tensor([0])
    assert fused_step(model, x, positions, None) is None  # no KV cache bound yet
    runner = PagedRunner(model, max_seqs=1, max_len=16)
    runner.step([(0, [3, 4, 5])])
    k, v = layers[0].paged.kv_cache
    layers[0].paged.kv_cache = (k.transpose(1, 2).contiguous().transpose(1, 2), v)  # same values, other strides
    assert fused_step(model, x, positions, None) is None
