"""ModelConfig.from_hf on both checkpoint kinds; per-layer facts agree with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import Llama4TextConfig

from herd.config import ConfigError, ModelConfig

# The text_config of the released Scout and Maverick checkpoints, in their (pre-v5) key layout.
SCOUT_TEXT = {
    "attention_chunk_size": 8192,
    "attn_temperature_tuning": 4,
    "bos_token_id": 200000,
    "eos_token_id": [200001, 200007, 200008],
    "floor_scale": 8192,
    "attn_scale": 0.1,
    "head_dim": 128,
    "hidden_size": 5120,
    "intermediate_size": 8192,
    "intermediate_size_mlp": 16384,
    "interleave_moe_layer_step": 1,
    "max_position_embeddings": 10485760,
    "model_type": "llama4_text",
    "no_rope_layers": [],
    "num_attention_heads": 40,
    "num_experts_per_tok": 1,
    "num_hidden_layers": 48,
    "num_key_value_heads": 8,
    "num_local_experts": 16,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 16.0,
        "high_freq_factor": 1.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "use_qk_norm": True,
    "vocab_size": 202048,
}
MAVERICK_TEXT = {
    **SCOUT_TEXT,
    "interleave_moe_layer_step": 2,
    "num_local_experts": 128,
    "use_qk_norm": False,
    "rope_scaling": None,
    "max_position_embeddings": 1048576,
}


def multimodal(text: dict) -> dict:
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "image_token_index": 200092,
        "text_config": text,
        "vision_config": {"hidden_size": 1408, "image_size": 336, "patch_size": 14},
        "torch_dtype": "bfloat16",
    }


@pytest.mark.parametrize("text", [SCOUT_TEXT, MAVERICK_TEXT], ids=["scout", "maverick"])
def test_layer_facts_agree_with_transformers(text: dict) -> None:
    ours = ModelConfig.from_dict(multimodal(text))
    # transformers 5 is strict where older releases wrote an int for this flag.
    hf_args = {k: v for k, v in text.items() if k != "model_type"} | {"attn_temperature_tuning": True}
    hf = Llama4TextConfig(**hf_args)
    assert [s.use_rope for s in ours.layers] == [bool(v) for v in hf.no_rope_layers]
    assert [s.chunked for s in ours.layers] == [t == "chunked_attention" for t in hf.layer_types]
    assert [s.index for s in ours.layers if s.is_moe] == hf.moe_layers
    assert all(s.use_qk_norm == (hf.use_qk_norm and s.use_rope) for s in ours.layers)
    assert all(s.temperature_tuning == (not s.use_rope) for s in ours.layers)


def test_scout_and_maverick_facts() -> None:
    scout = ModelConfig.from_dict(multimodal(SCOUT_TEXT))
    assert scout.weight_prefix == "language_model." and scout.is_multimodal
    assert [s.index for s in scout.layers if not s.use_rope] == list(range(3, 48, 4))
    assert all(s.is_moe for s in scout.layers)
    assert scout.rope_scaling is not None and scout.rope_scaling.factor == 16.0
    assert scout.eos_token_ids == (200001, 200007, 200008)
    maverick = ModelConfig.from_dict(multimodal(MAVERICK_TEXT))
    assert [s.index for s in maverick.layers if s.is_moe] == list(range(1, 48, 2))
    assert not any(s.use_qk_norm for s in maverick.layers)
    assert maverick.rope_scaling is None and maverick.num_experts == 128


def test_text_only_checkpoint_has_no_prefix(scout_ckpt) -> None:
    path, _ = scout_ckpt
    config = ModelConfig.from_hf(path)
    assert config.architecture == "Llama4ForCausalLM"
    assert config.weight_prefix == "" and not config.is_multimodal
    assert config.attention_chunk_size == 8 and config.floor_scale == 4


def test_multimodal_checkpoint_from_transformers(multimodal_ckpt) -> None:
    path, _ = multimodal_ckpt
    config = ModelConfig.from_hf(path)
    assert config.weight_prefix == "language_model."
    assert config.vision is not None and config.image_token_index == 200092


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"architectures": ["MistralForCausalLM"], "hidden_size": 8}, "MistralForCausalLM"),
        ({"model_type": "llama"}, "model_type"),
        ({"architectures": ["Llama4ForConditionalGeneration"]}, "text_config"),
        ({**SCOUT_TEXT, "hidden_size": "big"}, "hidden_size"),
        ({k: v for k, v in SCOUT_TEXT.items() if k != "num_hidden_layers"}, "num_hidden_layers"),
        ({**SCOUT_TEXT, "num_key_value_heads": 7}, "num_key_value_heads"),
        ({**SCOUT_TEXT, "no_rope_layers": [1, 0]}, "no_rope_layers"),
        ({**SCOUT_TEXT, "moe_layers": [0, 99]}, "moe_layers"),
        ({**SCOUT_TEXT, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({**SCOUT_TEXT, "rope_scaling": {"rope_type": "llama3", "factor": 16.0}}, "low_freq_factor"),
        ({**SCOUT_TEXT, "num_experts_per_tok": 32}, "num_experts_per_tok"),
    ],
)
def test_malformed_config_is_one_line_naming_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(raw)
    message = str(err.value)
    assert field in message and "\n" not in message


def test_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SCOUT_TEXT))
    assert ModelConfig.from_hf(tmp_path / "config.json").architecture == "Llama4ForCausalLM"
