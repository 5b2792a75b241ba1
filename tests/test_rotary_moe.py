"""RoPE frequencies and MoE routing, against transformers and by counting FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Llama4TextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from herd.config import ModelConfig
from herd.layers.factory import LayerFactory
from herd.layers.moe import grouped_experts, swiglu_expert
from herd.layers.quantization.unquantized import CPUPackedFusedMoEMethod, cpu_packing_available
from herd.layers.rotary import rope_inv_freq
from herd.models.llama4_text import Llama4MoE


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        # Llama 3.1's band (smoothing between low and high), and Scout's low == high.
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
        {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
         "original_max_position_embeddings": 8192},
    ],
)  # fmt: skip
def test_rope_frequencies_match_transformers(scaling) -> None:
    hf = Llama4TextConfig(head_dim=128, rope_scaling=scaling)
    if scaling is None:
        expected = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    ours = ModelConfig.from_dict({**hf.to_dict(), "architectures": ["Llama4ForCausalLM"]})
    got = rope_inv_freq(ours.head_dim, ours.rope_theta, ours.rope_scaling)
    torch.testing.assert_close(got, expected, atol=0, rtol=1e-6)


def tiny_moe(num_experts: int = 8, hidden: int = 32, inter: int = 48) -> Llama4MoE:
    config = ModelConfig.from_dict(
        {
            "architectures": ["Llama4ForCausalLM"],
            "vocab_size": 16,
            "hidden_size": hidden,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": inter,
            "num_local_experts": num_experts,
        }
    )
    torch.manual_seed(0)
    moe = Llama4MoE(config, LayerFactory(), prefix="feed_forward")
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def test_moe_computes_only_chosen_experts() -> None:
    moe, tokens, hidden, inter, experts = tiny_moe(), 10, 32, 48, 8
    x = torch.randn(tokens, hidden)
    with FlopCounterMode(display=False) as counter:
        moe(x)
    matmul = 2 * tokens * hidden  # 2 FLOPs per multiply-add, per output element below
    router = matmul * experts
    shared = matmul * 2 * inter + 2 * tokens * inter * hidden
    routed_top1 = matmul * 2 * inter + 2 * tokens * inter * hidden  # each token through ONE expert
    assert counter.get_total_flops() == router + shared + routed_top1
    # Running every expert on every token (as transformers does) would cost `experts` times more.
    assert counter.get_total_flops() < router + shared + experts * routed_top1


def test_moe_matches_dense_reference() -> None:
    """Same output as Llama 4's definition: shared(x) + sum_e expert_e(score_e * x) over chosen e."""
    moe = tiny_moe()
    x = torch.randn(20, 32)
    logits = moe.router(x)
    top = logits.argmax(-1)
    expected = moe.shared_expert(x)
    for t in range(x.shape[0]):
        e = int(top[t])
        xin = x[t] * torch.sigmoid(logits[t, e])
        gate, up = (xin @ moe.experts.gate_up_proj[e]).chunk(2)
        expected[t] += (torch.nn.functional.silu(gate) * up) @ moe.experts.down_proj[e]
    torch.testing.assert_close(moe(x), expected, atol=1e-5, rtol=1e-5)


def test_grouped_experts_when_every_row_chose_one_expert() -> None:
    gate_up, down = torch.randn(4, 8, 12), torch.randn(4, 6, 8)
    x, ids = torch.randn(3, 8), torch.tensor([2, 2, 2])
    out = grouped_experts(x, ids, lambda e, rows: swiglu_expert(rows, gate_up[e], down[e]))
    torch.testing.assert_close(out, swiglu_expert(x, gate_up[2], down[2]))


def test_grouped_experts_with_idle_experts() -> None:
    gate_up, down = torch.randn(4, 8, 12), torch.randn(4, 6, 8)
    x, ids = torch.randn(5, 8), torch.tensor([3, 3, 0, 3, 0])
    out = grouped_experts(x, ids, lambda e, rows: swiglu_expert(rows, gate_up[e], down[e]))
    for t in range(5):
        gate, up = (x[t] @ gate_up[ids[t]]).chunk(2)
        torch.testing.assert_close(out[t], (torch.nn.functional.silu(gate) * up) @ down[ids[t]])


@pytest.mark.skipif(not cpu_packing_available(torch.device("cpu"), torch.bfloat16), reason="needs oneDNN's packed bf16")
def test_small_experts_in_one_matmul_match_one_matmul_per_expert() -> None:
    """The CPU's all-experts form for a few rows (a verify step) gives each row exactly its own expert's output."""
    from herd.layers.moe import FusedMoE

    method = CPUPackedFusedMoEMethod()
    moe = FusedMoE(4, 64, 96, method=method)
    g = torch.Generator().manual_seed(0)
    moe.gate_up_proj = torch.nn.Parameter((0.1 * torch.randn(4, 64, 192, generator=g)).bfloat16(), requires_grad=False)
    moe.down_proj = torch.nn.Parameter((0.1 * torch.randn(4, 96, 64, generator=g)).bfloat16(), requires_grad=False)
    gate_up, down = moe.gate_up_proj.detach().clone(), moe.down_proj.detach().clone()
    method.process_weights_after_loading(moe)
    assert hasattr(moe, "packed_down_all")
    x, ids = torch.randn(4, 64, generator=g).bfloat16(), torch.tensor([2, 0, 2, 3])
    out = moe(x, ids)  # 4 rows: the all-experts form
    for t in range(4):
        row = moe(x[t : t + 1], ids[t : t + 1])  # one row: its expert's own matmuls
        torch.testing.assert_close(out[t : t + 1], row, atol=0, rtol=0)
        expected = swiglu_expert(x[t : t + 1].float(), gate_up[ids[t]].float(), down[ids[t]].float())
        torch.testing.assert_close(out[t : t + 1].float(), expected, atol=0.02, rtol=0.05)
    same = torch.tensor([1, 1, 1, 1])  # one expert for every row: that expert's matmuls over all rows
    torch.testing.assert_close(moe(x, same), torch.cat([moe(x[t : t + 1], same[:1]) for t in range(4)]), atol=0, rtol=0)
