"""Random EAGLE-3 drafts written in the layout SGLang and SpecForge publish for Llama 4.

config.json is a Llama config with `architectures: [LlamaForCausalLMEagle3]` and `draft_vocab_size`
(SpecForge configs/llama4-scout-17B-16E-eagle3.json); model.safetensors has `fc`, `midlayer.*`, `norm`,
`lm_head`, `d2t` (offsets: target id = draft id + d2t) and `t2d`, and no `embed_tokens`: the published
Llama 4 drafts share the target's embedding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _text(target: Any) -> dict[str, Any]:
    if not isinstance(target, dict):
        target = target.to_dict()
    return target.get("text_config", target)


def draft_config(target_hf_text_config: Any, draft_vocab_size: int | None = None, **overrides: Any) -> dict[str, Any]:
    t = _text(target_hf_text_config)
    hidden = t["hidden_size"]
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "num_hidden_layers": 1,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        # llama3 scaling with a short original length, so the scaled band is exercised at test lengths.
        "rope_theta": 10000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "vocab_size": t["vocab_size"],
        "draft_vocab_size": draft_vocab_size or t["vocab_size"],
    }
    return {**config, **overrides}


def draft_tensors(config: dict[str, Any], seed: int = 0, with_embedding: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, heads, kv, d = (
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["head_dim"],
    )
    inter, vocab, draft_vocab = config["intermediate_size"], config["vocab_size"], config["draft_vocab_size"]

    def w(rows: int, cols: int) -> torch.Tensor:  # wide enough that the argmax differs token to token
        return torch.randn(rows, cols, generator=g) / cols**0.5

    def norm() -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(h, generator=g)

    tensors = {
        "fc.weight": w(h, 3 * h),
        "midlayer.input_layernorm.weight": norm(),
        "midlayer.hidden_norm.weight": norm(),
        "midlayer.post_attention_layernorm.weight": norm(),
        "midlayer.self_attn.q_proj.weight": w(heads * d, 2 * h),
        "midlayer.self_attn.k_proj.weight": w(kv * d, 2 * h),
        "midlayer.self_attn.v_proj.weight": w(kv * d, 2 * h),
        "midlayer.self_attn.o_proj.weight": w(h, heads * d),
        "midlayer.mlp.gate_proj.weight": w(inter, h),
        "midlayer.mlp.up_proj.weight": w(inter, h),
        "midlayer.mlp.down_proj.weight": w(h, inter),
        "norm.weight": norm(),
        "lm_head.weight": w(draft_vocab, h) * 4,
    }
    hot = torch.sort(torch.randperm(vocab, generator=g)[:draft_vocab]).values if draft_vocab < vocab else None
    if hot is not None:
        tensors["d2t"] = hot - torch.arange(draft_vocab)
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[hot] = True
        tensors["t2d"] = t2d
    if with_embedding:
        tensors["embed_tokens.weight"] = torch.randn(vocab, h, generator=g)
    return tensors


def write_eagle3_draft(
    tmp_dir: Path,
    target_hf_text_config: Any,
    seed: int = 0,
    draft_vocab_size: int | None = None,
    with_embedding: bool = False,
    **config_overrides: Any,
) -> Path:
    """A random draft for the target described by `target_hf_text_config` (dict or transformers config)."""
    path = Path(tmp_dir)
    path.mkdir(parents=True, exist_ok=True)
    config = draft_config(target_hf_text_config, draft_vocab_size, **config_overrides)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(draft_tensors(config, seed, with_embedding), str(path / "model.safetensors"))
    return path
