"""Tiny Llama 4 checkpoints in real Hugging Face layout, made by `transformers` itself.

Small, but with every feature live: chunks shorter than the prompts, a global NoPE layer,
`floor_scale` small enough for temperature tuning to matter, GQA, all-MoE (Scout-like) and
interleaved dense/MoE (Maverick-like), and weights wide enough that routing differs per token.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from transformers import (
    Llama4Config,
    Llama4ForCausalLM,
    Llama4ForConditionalGeneration,
    Llama4TextConfig,
)

CHUNK = 8

SCOUT_LIKE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=32,
    intermediate_size_mlp=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=1,
    interleave_moe_layer_step=1,
    use_qk_norm=True,
    # Scout's shape of llama3 scaling (low == high), with an original length tests can exceed.
    rope_scaling={
        "rope_type": "llama3",
        "factor": 16.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,
        "original_max_position_embeddings": 64,
    },
    attention_chunk_size=CHUNK,
    floor_scale=4,
    attn_scale=0.1,
    no_rope_layer_interval=4,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

MAVERICK_LIKE = {
    **SCOUT_LIKE,
    "interleave_moe_layer_step": 2,
    "use_qk_norm": False,
    "rope_scaling": None,
}

# A vision tower small enough for CPU tests with everything live: 4 x 4 patches per 28 px tile, pixel
# shuffle to 4 tokens per tile, 2D RoPE with a non-default theta, projector widths unlike the text width.
VISION_LIKE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    image_size=28,
    patch_size=7,
    pixel_shuffle_ratio=0.5,
    projector_input_dim=48,
    projector_output_dim=48,
    vision_output_dim=48,
    rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
)


def widen(model: torch.nn.Module, seed: int) -> None:
    """Re-draw weights at ~1/sqrt(fan_in) so activations and logits are of order 1.

    HF's 0.02 init leaves every logit near zero (any model would "match"), and its router
    sends all tokens to the same expert.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("vision_model", "multi_modal_projector")):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                fan_in = p.shape[1] if name.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3 else p.shape[-1]
                gain = 3.0 if "router" in name else 1.0
                p.copy_(noise * gain / math.sqrt(fan_in))


def make_text_checkpoint(path: Path, text_config: dict, seed: int = 0) -> Llama4ForCausalLM:
    torch.manual_seed(seed)
    model = Llama4ForCausalLM(Llama4TextConfig(**text_config)).float().eval()
    widen(model, seed)
    model.save_pretrained(path)
    return model


def make_multimodal_checkpoint(path: Path, text_config: dict, seed: int = 0) -> Llama4ForConditionalGeneration:
    torch.manual_seed(seed)
    config = Llama4Config(text_config=text_config, vision_config=VISION_LIKE)
    model = Llama4ForConditionalGeneration(config).float().eval()
    widen(model, seed)
    model.save_pretrained(path)
    return model


def widen_vision(model: torch.nn.Module, seed: int) -> None:
    """`widen` for the vision tower and projector: HF's init would make every image feature near zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("vision_model", "multi_modal_projector")):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if "layernorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1 and not name.endswith("class_embedding"):
                p.copy_(0.1 * noise)  # biases
            elif name.endswith(("class_embedding", "positional_embedding_vlm")):
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))


def make_vision_checkpoint(path: Path, seed: int = 0) -> Llama4ForConditionalGeneration:
    """A multimodal checkpoint over the real Llama 4 vocabulary (its image tokens), tokenizer.model beside it."""
    torch.manual_seed(seed)
    config = Llama4Config(text_config=REAL_VOCAB_LIKE, vision_config=VISION_LIKE)
    model = Llama4ForConditionalGeneration(config).float().eval()
    widen(model, seed)
    widen_vision(model, seed + 1)
    model.save_pretrained(path)
    shutil.copy(llama4_tokenizer_model(), path / "tokenizer.model")
    return model


@torch.no_grad()
def reference_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """transformers' logits for one sequence, [len(ids), vocab]."""
    return model(input_ids=torch.tensor([ids])).logits[0].float()


LLAMA4_VOCAB = 202048
# SCOUT_LIKE over the real Llama 4 vocabulary and its special-token ids, for tests that use Meta's tokenizer.
REAL_VOCAB_LIKE = {
    **SCOUT_LIKE,
    "vocab_size": LLAMA4_VOCAB,
    "hidden_size": 32,
    "head_dim": 8,
    "bos_token_id": 200000,
    "eos_token_id": [200001, 200007, 200008],
    "pad_token_id": 200018,
}


def llama4_tokenizer_model() -> Path:
    """Meta's Llama 4 tokenizer.model, shipped in the llama-models package."""
    import llama_models

    return Path(llama_models.__file__).parent / "llama4" / "tokenizer.model"


def make_real_vocab_checkpoint(path: Path, seed: int = 0) -> Llama4ForCausalLM:
    """A tiny Scout-like model over the real Llama 4 vocabulary, with Meta's tokenizer.model beside it."""
    model = make_text_checkpoint(
        path,
        REAL_VOCAB_LIKE,
        seed=seed,
    )
    shutil.copy(llama4_tokenizer_model(), path / "tokenizer.model")
    return model
