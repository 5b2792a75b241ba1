"""Parameters load through their weight_loaders: each tensor-parallel rank takes exactly its slice of every
checkpoint tensor (fused q/k/v and gate/up parts, experts, row- and column-parallel layers)."""

from __future__ import annotations

import pytest
import torch

from herd.layers.factory import LayerFactory
from herd.layers.moe import FusedMoE
from herd.models.loader import load_model


def rank_slices(full: torch.Tensor, tp_size: int, dim: int) -> list[torch.Tensor]:
    return list(full.chunk(tp_size, dim=dim))


@pytest.mark.parametrize("tp_size", [2, 4])
def test_every_rank_loads_its_slice(scout_ckpt, tp_size: int) -> None:
    path, ref = scout_ckpt  # 4 heads, 2 KV heads: at tp 4 each KV head is kept by two ranks
    hf = dict(ref.named_parameters())
    config = ref.config
    head_dim, kv_heads = config.head_dim, config.num_key_value_heads
    ranks = [
        load_model(path, dtype="float32", factory=LayerFactory(tp_rank=r, tp_size=tp_size)) for r in range(tp_size)
    ]
    layer = "model.layers.0"
    attn = f"{layer}.self_attn"
    for r, model in enumerate(ranks):
        params = dict(model.named_parameters())
        kv_head = r * kv_heads // tp_size  # the KV head this rank's query heads read
        kv = slice(kv_head * head_dim, (kv_head + 1) * head_dim) if tp_size > kv_heads else None

        def kv_rows(name: str, r: int = r, kv: slice | None = kv) -> torch.Tensor:
            full = hf[f"{attn}.{name}.weight"]
            return full[kv] if kv is not None else rank_slices(full, tp_size, 0)[r]

        expected_qkv = torch.cat(
            [rank_slices(hf[f"{attn}.q_proj.weight"], tp_size, 0)[r], kv_rows("k_proj"), kv_rows("v_proj")]
        )
        torch.testing.assert_close(params[f"{attn}.qkv_proj.weight"], expected_qkv, atol=0, rtol=0)
        o_proj = rank_slices(hf[f"{attn}.o_proj.weight"], tp_size, 1)[r]
        torch.testing.assert_close(params[f"{attn}.o_proj.weight"], o_proj, atol=0, rtol=0)

        shared = f"{layer}.feed_forward.shared_expert"
        gate_up = torch.cat([rank_slices(hf[f"{shared}.{p}.weight"], tp_size, 0)[r] for p in ("gate_proj", "up_proj")])
        torch.testing.assert_close(params[f"{shared}.gate_up_proj.weight"], gate_up, atol=0, rtol=0)
        down = rank_slices(hf[f"{shared}.down_proj.weight"], tp_size, 1)[r]
        torch.testing.assert_close(params[f"{shared}.down_proj.weight"], down, atol=0, rtol=0)

        experts = f"{layer}.feed_forward.experts"
        gate, up = hf[f"{experts}.gate_up_proj"].chunk(2, dim=2)  # [E, H, I] each
        expected = torch.cat([rank_slices(gate, tp_size, 2)[r], rank_slices(up, tp_size, 2)[r]], dim=2)
        torch.testing.assert_close(params[f"{experts}.gate_up_proj"], expected, atol=0, rtol=0)
        down = rank_slices(hf[f"{experts}.down_proj"], tp_size, 1)[r]
        torch.testing.assert_close(params[f"{experts}.down_proj"], down, atol=0, rtol=0)
        assert isinstance(model.get_submodule(experts), FusedMoE)

        # Vocab-parallel: the embedding and the LM head keep this rank's rows of the vocabulary.
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            torch.testing.assert_close(params[name], rank_slices(hf[name], tp_size, 0)[r], atol=0, rtol=0)
        # Replicated: the router is whole on every rank.
        name = f"{layer}.feed_forward.router.weight"
        torch.testing.assert_close(params[name], hf[name], atol=0, rtol=0)


def test_a_layer_that_does_not_split_is_named(scout_ckpt) -> None:
    with pytest.raises(ValueError, match="does not split across 3 ranks"):
        load_model(scout_ckpt[0], dtype="float32", factory=LayerFactory(tp_rank=0, tp_size=3))
