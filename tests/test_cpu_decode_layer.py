"""A CPU decode step's text model as one op (herd/kernels/cpu/decode_layer.cpp, herd/models/llama4_cpu_decode.py):
the same logits as the modules, bit for bit, where it serves a step; the modules where it does not."""

from __future__ import annotations

import json

import pytest
import torch
from test_quantization_ct import W4A16_LIKE

from herd.kernels.cpu import gemv_ops
from herd.kernels.cpu.int8_vnni import vnni_enabled
from herd.layers.factory import LayerFactory
from herd.layers.quantization import cpu_gemv
from herd.layers.quantization.select import select_quantization
from herd.layers.quantization.unquantized import UnquantizedConfig
from herd.models import llama4_text
from herd.models.llama4_cpu_decode import fused_model, fused_step
from herd.models.loader import load_model

from checkpoints import MAVERICK_LIKE, make_text_checkpoint
from ct_fixtures import SHORT_IGNORE, make_ct_checkpoint
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
    op = torch.ops.herd_cpu.decode_model_bf16

    def counted(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls[0] += 1
        return op(*args)

    monkeypatch.setattr(torch.ops.herd_cpu, "decode_model_bf16", counted)
    return calls


def _assert_fused_equals_modules(path, factory: LayerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two copies of the model over STEPS: the fused layers where they serve, against the modules every step."""
    models = [load_model(path, dtype="bfloat16", factory=factory) for _ in range(2)]
    assert fused_model(models[0]) is not None
    for model in models:  # EAGLE-3's auxiliary hidden states come out of the op as well
        model.aux_layer_ids = (0, len(model.model.layers) - 1)
    runners = [PagedRunner(model, max_seqs=3, max_len=40) for model in models]
    calls = _count_fused(monkeypatch)
    for step in STEPS:
        before = calls[0]
        fused = runners[0].step(step)
        decoding = all(len(tokens) <= 8 for _, tokens in step) and sum(len(t) for _, t in step) <= 8
        assert calls[0] - before == int(decoding), step
        with monkeypatch.context() as m:
            m.setattr(llama4_text, "fused_step", lambda *args: None)
            modules = runners[1].step(step)
        assert torch.equal(fused, modules), step
        assert torch.equal(models[0].aux_hidden, models[1].aux_hidden), step
        for pool in ("full", "local"):  # released local blocks hold NaN in both
            torch.testing.assert_close(
                getattr(runners[0].kv, pool), getattr(runners[1].kv, pool), rtol=0, atol=0, equal_nan=True
            )


@pytest.mark.parametrize("ckpt", ["scout_ckpt", "maverick_ckpt"])  # MoE in every layer, qk-norm; dense and MoE
@pytest.mark.parametrize("small", [True, False])  # small weights keep oneDNN's packed copy too, or the kernel's only
def test_fused_layers_give_the_modules_logits(ckpt: str, small: bool, request, monkeypatch) -> None:
    path, _ = request.getfixturevalue(ckpt)
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: True)
    if not small:
        monkeypatch.setattr(cpu_gemv, "SMALL_EXPERTS_BYTES", 0)
        monkeypatch.setattr(cpu_gemv, "SMALL_LINEAR_BYTES", 0)
        monkeypatch.setattr(cpu_gemv, "NARROW_LINEAR_BYTES", 0)
    _assert_fused_equals_modules(path, LayerFactory(UnquantizedConfig(cpu_packed=True)), monkeypatch)


def _int4_kernel() -> bool:
    return torch.ops.herd_cpu.int4_bf16_supported()


# Wide enough for herd's INT4 kernel (groups of 128 over every input): Scout-like, and Maverick-like with dense layers.
WIDE = {"scout": W4A16_LIKE, "maverick": {**W4A16_LIKE, **{k: MAVERICK_LIKE[k] for k in ("interleave_moe_layer_step",
        "use_qk_norm", "rope_scaling")}}}  # fmt: skip
NEEDS = {"w4a16": _int4_kernel, "w8a8_int8": vnni_enabled, "w8a16": lambda: True}


@pytest.fixture(scope="module", params=list(WIDE))
def wide_ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(f"wide_{request.param}")
    make_text_checkpoint(path, WIDE[request.param], seed=6)
    return path


@pytest.mark.parametrize("quantization", list(NEEDS))
def test_quantized_layers_fused_give_the_modules_logits(wide_ckpt, quantization: str, monkeypatch) -> None:
    """--quantization w4a16, w8a8_int8 and w8a16: each layer's INT4 / INT8 kernels inside the op, the router bf16."""
    if not NEEDS[quantization]():
        pytest.skip(f"this CPU lacks the instructions of herd's {quantization} kernel")
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: True)
    base = UnquantizedConfig(cpu_packed=True)
    _assert_fused_equals_modules(
        wide_ckpt, LayerFactory(select_quantization(None, "", quantization, base)), monkeypatch
    )


@pytest.mark.parametrize("preset", ["W4A16", "W8A8"])
def test_compressed_tensors_checkpoints_fused_give_the_modules_logits(preset, tmp_path, monkeypatch) -> None:
    """RedHatAI's layouts (pack-quantized W4A16, int-quantized W8A8) as loaded from the checkpoint."""
    if not (_int4_kernel() if preset == "W4A16" else vnni_enabled()):
        pytest.skip(f"this CPU lacks the instructions of herd's {preset} kernel")
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: True)
    make_ct_checkpoint(tmp_path, W4A16_LIKE, preset, SHORT_IGNORE, seed=7)
    quant = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    factory = LayerFactory(select_quantization(quant, "", None, UnquantizedConfig(cpu_packed=True)))
    _assert_fused_equals_modules(tmp_path, factory, monkeypatch)


def test_other_methods_and_dtypes_keep_the_modules(scout_ckpt, monkeypatch) -> None:
    """Experts without a kernel of the op (INT4 groups of 32, FP8), float32, or no CPU kernels: no fused layers
    (the modules run every step)."""
    path, _ = scout_ckpt
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: True)
    base = UnquantizedConfig(cpu_packed=True)
    for quantization in ("w4a16", "fp8"):  # tiny's experts: 32 inputs, PyTorch's INT4 layout
        factory = LayerFactory(select_quantization(None, "", quantization, base))
        assert fused_model(load_model(path, dtype="bfloat16", factory=factory)) is None, quantization
    fp32 = load_model(path, dtype="float32", factory=LayerFactory(base))
    runner = PagedRunner(fp32, max_seqs=1, max_len=16)
    calls = _count_fused(monkeypatch)
    runner.step([(0, [3, 4, 5])])
    runner.step([(0, [6])])
    assert calls[0] == 0
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: False)
    packed = load_model(path, dtype="bfloat16", factory=LayerFactory(base))
    assert fused_model(packed) is None


def test_the_op_refuses_a_wrong_weight_list() -> None:
    embed = torch.zeros(10, 64, dtype=torch.bfloat16)
    cache = torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16)
    ids = torch.zeros(1, dtype=torch.long)
    pool = [ids, torch.zeros(1, 2, dtype=torch.long), ids, ids + 1]

    def call(weights: int, kernels: list[int], layer_kernels: list[int]) -> None:
        torch.ops.herd_cpu.decode_model_bf16(
            ids, ids, embed, torch.ones(8), [embed[0]] * weights, kernels, layer_kernels, [cache, cache.clone()],
            pool, [0], [4, 2, 16, 1, 1, 0], [0.25], [], embed[0], 1e-5, [],
        )  # fmt: skip

    with pytest.raises(RuntimeError, match="5 \\(MoE\\) or 2 \\(dense\\)"):
        call(5, [0, 0, 0], [3])
    with pytest.raises(RuntimeError, match="5 weights for kernels \\[0, 0, 1, 0\\]"):
        call(5, [0, 0, 1, 0], [4])
    with pytest.raises(RuntimeError, match="unknown kernel 7"):
        call(6, [0, 0, 7, 0], [4])
    with pytest.raises(RuntimeError, match="4 kernels for layers of \\[5\\]"):
        call(6, [0, 0, 0, 0], [5])


def test_a_cache_the_op_cannot_write_keeps_the_modules(scout_ckpt, monkeypatch) -> None:
    monkeypatch.setattr(cpu_gemv, "gemv_enabled", lambda: True)
    model = load_model(scout_ckpt[0], dtype="bfloat16", factory=LayerFactory(UnquantizedConfig(cpu_packed=True)))
    fused = fused_model(model)
    assert fused is not None
    attention, input_ids = fused.attention, torch.tensor([0])
    assert fused_step(model, input_ids, None) is None  # no KV cache bound yet
    runner = PagedRunner(model, max_seqs=1, max_len=16)
    runner.step([(0, [3, 4, 5])])
    k, v = attention[0].kv_cache
    attention[0].kv_cache = (k.transpose(1, 2).contiguous().transpose(1, 2), v)  # same values, other strides
    assert fused_step(model, input_ids, None) is None
