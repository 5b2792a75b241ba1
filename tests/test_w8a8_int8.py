"""--quantization w8a8_int8: INT8 weights per output channel, activations quantized to INT8 per token.

The kernel (herd.kernels.cpu int8_vnni.cpp) is checked for exact integer sums against `torch._int_mm` and for its
scaled output against a float64 computation written here from the definition; the model against transformers.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from test_weight_memory import meta_scout

from herd.kernels.cpu import int8_vnni
from herd.kernels.cpu.int8_vnni import pack_for_vnni, vnni_ops, w8a8_linear, w8a8_reference
from herd.launch_server import parse_args
from herd.layers.factory import LayerFactory
from herd.layers.quantization.compressed_tensors import UnsupportedQuantizationError
from herd.layers.quantization.select import select_quantization
from herd.layers.quantization.unquantized import UnquantizedConfig
from herd.layers.quantization.w8a8_int8 import W8A8Int8Config, quantize_weight
from herd.llm import LLM
from herd.models.loader import load_model
from herd.sampling import SamplingParams
from herd.worker.weight_memory import weight_bytes

from checkpoints import CHUNK, SCOUT_LIKE, reference_logits
from ct_fixtures import SHORT_IGNORE, make_ct_checkpoint
from paged import PagedRunner
from test_engine import hf_greedy
from test_quantization_int8 import dequantized_reference

needs_vnni = pytest.mark.skipif(vnni_ops() is None, reason="herd's CPU kernels did not build here (or no VNNI)")

# Weight rows by 4 (strips) and 1..3 left; K by 64 (VNNI steps) with every kind of remainder; rows of x by 4
# (passes over a strip) and past 64 (blocks of x).
SHAPES = [(1, 32), (7, 40), (33, 256), (130, 2050), (17, 100)]
ROWS = [1, 2, 3, 4, 5, 8, 9, 70]


def textbook(x: torch.Tensor, q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """W8A8 from its definition, in float64: s = max|x| / 127 per row, x_q = round(x / s), y = x_q q^T s s_w."""
    x = x.double()
    s = x.abs().amax(dim=-1, keepdim=True) / 127
    xq = torch.round(x / s.clamp(min=1e-300)).clamp(-127, 127)
    return (xq @ q.double().t()) * s * w_scale.double()


@needs_vnni
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_vnni_sums_are_exact(m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen)  # -128 too: x_q + 128 = 0
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    got = torch.ops.herd_cpu.int8_mm_vnni(xq, pack_for_vnni(q), q.sum(1, dtype=torch.int32))
    assert got.dtype == torch.int32
    assert torch.equal(got, torch._int_mm(xq, q.t()))


@needs_vnni
def test_vnni_sums_at_the_int32_limit() -> None:
    """The largest products over a long row: 65536 * 127 * 127 is about 2^30, still exact."""
    k = 65536
    xq = torch.full((2, k), -127, dtype=torch.int8)
    xq[1] = 127
    q = torch.full((3, k), 127, dtype=torch.int8)
    q[1] = -127
    got = torch.ops.herd_cpu.int8_mm_vnni(xq, pack_for_vnni(q), q.sum(1, dtype=torch.int32))
    assert torch.equal(got.long(), xq.long() @ q.long().t())


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_w8a8_linear_scales(dtype: torch.dtype, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m * 7 + n * 3 + k)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 10).to(dtype)
    q, w_scale, q_sum = quantize_weight(torch.randn(n, k, generator=gen))
    got = torch.ops.herd_cpu.w8a8_int8_linear(x, pack_for_vnni(q), w_scale, q_sum)
    assert got.dtype == dtype and got.shape == (m, n)
    # Bit for bit the PyTorch path (torch._int_mm), which CPUs without VNNI run.
    assert torch.equal(got, w8a8_reference(x, q, w_scale))
    # And the definition: fp32 scaling of exact sums (and the output dtype's rounding) is all that differs.
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    expected = textbook(x, q, w_scale)
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@needs_vnni
def test_w8a8_linear_zero_rows_and_leading_dims() -> None:
    q, w_scale, q_sum = quantize_weight(torch.randn(5, 70))
    q = pack_for_vnni(q)
    x = torch.randn(2, 3, 70)
    x[1, 2] = 0
    got = torch.ops.herd_cpu.w8a8_int8_linear(x, q, w_scale, q_sum)
    assert got.shape == (2, 3, 5)
    assert torch.equal(got[1, 2], torch.zeros(5))
    assert torch.ops.herd_cpu.w8a8_int8_linear(x[:, :0], q, w_scale, q_sum).shape == (2, 0, 5)


@needs_vnni
def test_w8a8_ops_refuse_bad_inputs() -> None:
    q, w_scale, q_sum = quantize_weight(torch.randn(5, 64))
    with pytest.raises(RuntimeError, match="packed by pack_for_vnni for 5 rows of 64"):
        torch.ops.herd_cpu.w8a8_int8_linear(torch.randn(1, 64), q, w_scale, q_sum)  # not packed: 5 rows, not 8
    q = pack_for_vnni(q)
    with pytest.raises(RuntimeError, match="contiguous int8"):
        torch.ops.herd_cpu.w8a8_int8_linear(torch.randn(1, 64), q.float(), w_scale, q_sum)
    with pytest.raises(RuntimeError, match="weight_sum must be int32"):
        torch.ops.herd_cpu.w8a8_int8_linear(torch.randn(1, 64), q, w_scale, q_sum.long())
    with pytest.raises(RuntimeError, match="for 5 rows of 128"):
        torch.ops.herd_cpu.w8a8_int8_linear(torch.randn(1, 128), q, w_scale, q_sum)
    big = torch.zeros(1, 65537, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="K = 65537"):
        torch.ops.herd_cpu.int8_mm_vnni(big, big, torch.zeros(1, dtype=torch.int32))


@needs_vnni
def test_w8a8_ops_pass_opcheck() -> None:
    """Schema, fake kernel (what torch.compile traces with) and the real kernel agree."""
    q, w_scale, q_sum = quantize_weight(torch.randn(6, 80))
    q = pack_for_vnni(q)
    torch.library.opcheck(torch.ops.herd_cpu.w8a8_int8_linear, (torch.randn(3, 80).bfloat16(), q, w_scale, q_sum))
    torch.library.opcheck(torch.ops.herd_cpu.int8_mm_vnni, (torch.randint(-127, 128, (3, 80)).to(torch.int8), q, q_sum))


def test_w8a8_without_vnni_falls_back_to_int_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 96)
    q, w_scale, q_sum = quantize_weight(torch.randn(9, 96))
    monkeypatch.setattr(int8_vnni, "vnni_enabled", lambda: False)
    got = w8a8_linear(x, q, w_scale, q_sum)
    expected = textbook(x, q, w_scale)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


# --- model ---------------------------------------------------------------------------------------------------


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    return torch.round(x / scale.clamp(min=1e-30)).clamp(-127, 127) * scale


def round_activations(ref: torch.nn.Module, quantized: Callable[[str], bool]) -> torch.nn.Module:
    """Rounds the input of each Linear and each block of experts whose weight `quantized(name)` names per token to
    255 levels, as W8A8 does (transformers' modules, changed in place)."""
    for name, module in ref.named_modules():
        if isinstance(module, torch.nn.Linear) and quantized(f"{name}.weight"):
            module.register_forward_pre_hook(lambda _, args: (fake_quantize_rows(args[0]),))
        if type(module).__name__ == "Llama4TextExperts" and quantized(f"{name}.gate_up_proj"):

            def forward(hidden: torch.Tensor, experts: torch.nn.Module = module) -> torch.Tensor:
                hidden = hidden.view(experts.num_experts, -1, experts.hidden_size)
                gate, up = torch.bmm(fake_quantize_rows(hidden), experts.gate_up_proj).chunk(2, dim=-1)
                out = torch.bmm(fake_quantize_rows(up * experts.act_fn(gate)), experts.down_proj)
                return out.view(-1, experts.hidden_size)

            module.forward = forward
    return ref


def w8a8_reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' model with W8A8 arithmetic, in plain PyTorch: the weights herd quantizes replaced by their
    dequantized INT8 values, and the input of each of those layers rounded per token."""
    return round_activations(dequantized_reference(model), lambda name: "router" not in name)


def test_w8a8_greedy_tokens_match_a_pytorch_w8a8_reference(scout_ckpt) -> None:
    path, model = scout_ckpt
    ref = w8a8_reference_model(model)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (2 * CHUNK + 3, 5)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm = LLM(str(path), dtype="float32", quantization="w8a8_int8", chunked_prefill_size=7)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outputs]
    assert got == [hf_greedy(ref, p, 32) for p in prompts]
    # The quantization is not a no-op: the unquantized model continues differently somewhere.
    assert got != [hf_greedy(model, p, 32) for p in prompts]


def test_w8a8_logits_follow_transformers(scout_ckpt) -> None:
    """Prefill and decode steps (the kernel at 1 row and at many) against transformers' float32 logits on the
    unquantized weights. Each layer's output carries the rounding of its weight and its input, each at most half a
    step of 255 levels of the row's largest value: a relative error of about 1% per layer, compounding over the
    tiny model's 4 layers (measured here: mean 1.8%, worst 11% of the logits' standard deviation, every top token
    the same). The bar: mean 5%, worst 25% and the same top token on most positions."""
    path, ref = scout_ckpt
    model = load_model(path, dtype="float32", factory=LayerFactory(W8A8Int8Config()))
    assert model.model.layers[0].feed_forward.experts.gate_up_int8.dtype == torch.int8
    ids, decoded = list(range(3, 23)), [5, 9, 11, 7, 13, 17]
    runner = PagedRunner(model, max_seqs=1, max_len=len(ids) + len(decoded))
    got = torch.cat([runner.step([(0, ids)]).float()] + [runner.step([(0, [t])]).float() for t in decoded])
    expected = reference_logits(ref, ids + decoded)
    assert got.shape == expected.shape
    spread = expected.std().item()
    assert (got - expected).abs().mean().item() < 0.05 * spread
    assert (got - expected).abs().max().item() < 0.25 * spread
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.75


def test_w8a8_stores_int8_weights_and_plans_their_bytes(scout_ckpt) -> None:
    path, model = scout_ckpt
    worker = LLM(str(path), dtype="float32", quantization="w8a8_int8").engine.core.workers[0]
    int8 = sum(b.numel() for _, b in worker.model.named_buffers() if b.dtype == torch.int8)
    quantized = sum(p.numel() for name, p in model.named_parameters() if "proj" in name or "lm_head" in name)
    # Attention, experts, shared expert, LM head; packed for the kernel, with rows padded to 4 and inputs to 64
    # (the tiny model's 32-wide expert inputs double; Llama 4's sizes are multiples of 64).
    assert quantized <= int8 <= 2 * quantized
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    assert worker.weight_bytes() < 0.5 * full


def test_memory_planning_counts_a_byte_per_weight() -> None:
    """Full-size Scout on the meta device: w8a8_int8 plans the bytes w8a16 does (INT8 weights, the router and
    embeddings as stored), half of bf16's for the quantized layers."""
    bf16, w8a16, w8a8 = (weight_bytes(meta_scout(q)) for q in (None, "w8a16", "w8a8_int8"))
    assert w8a8.total == w8a16.total
    # The layers it quantizes (all bf16's quantizable bytes but the routers', which stay) at one byte per element.
    quantized_bytes = bf16.quantizable - w8a8.quantizable
    quantized_elements = bf16.quantizable_elements - w8a8.quantizable_elements
    assert quantized_bytes == 2 * quantized_elements
    assert w8a8.total == bf16.total - quantized_bytes + quantized_elements


def test_compressed_tensors_w8a8_checkpoint(tmp_path) -> None:
    """llm-compressor's W8A8 layout (`int-quantized`: int8 `weight`, `weight_scale [out, 1]`, activations dynamic
    per token), written by compressed-tensors' own compressor: transformers' greedy tokens on the dequantized
    weights with the quantized layers' inputs rounded per token."""
    ref = make_ct_checkpoint(tmp_path, SCOUT_LIKE, "W8A8", SHORT_IGNORE, seed=4)
    ref = round_activations(ref, lambda name: name in ref.quantized_params)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (2 * CHUNK + 3, 5)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm = LLM(str(tmp_path), dtype="float32", chunked_prefill_size=7)
    layer = llm.engine.core.workers[0].model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight_int8.dtype == torch.int8
    assert layer.feed_forward.experts.gate_up_int8.dtype == torch.int8
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(ref, p, 32) for p in prompts]


def test_compressed_tensors_asymmetric_int8_activations_are_refused() -> None:
    quant = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
                "input_activations": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": False,
                    "strategy": "token",
                    "dynamic": True,
                },
            }
        },
    }
    with pytest.raises(UnsupportedQuantizationError, match=r"group_0 .*activations int 8-bit token dynamic.*W8A8"):
        select_quantization(quant, "", None, UnquantizedConfig())


def test_bad_quantization_flag_names_the_value_and_w8a8_int8(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "m", "--quantization", "w8a8-int8"])
    assert "--quantization 'w8a8-int8': not supported yet; supported: fp8, w8a16, w8a8_int8, w4a16" in (
        capsys.readouterr().err
    )
    with pytest.raises(UnsupportedQuantizationError, match=r"'w8a8'.*w8a8_int8"):
        select_quantization(None, "", "w8a8", UnquantizedConfig())
    assert isinstance(select_quantization(None, "", "w8a8_int8", UnquantizedConfig()), W8A8Int8Config)
