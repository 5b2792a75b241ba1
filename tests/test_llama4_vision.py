"""The vision tower and projector: exact to transformers in float32; config parsing; loading on and off."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from herd.config import ConfigError, ModelConfig
from herd.models.llama4 import Llama4ForConditionalGeneration
from herd.models.llama4_text import Llama4ForCausalLM
from herd.models.loader import CheckpointError, load_model

from checkpoints import VISION_LIKE


@pytest.fixture(scope="module")
def herd_vision(vision_ckpt) -> Llama4ForConditionalGeneration:
    model = load_model(vision_ckpt[0], dtype="float32", enable_multimodal=True)
    assert isinstance(model, Llama4ForConditionalGeneration)
    return model


def tiles(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_tiles", [1, 5], ids=["one-tile", "2x2-tiles+global"])
@torch.no_grad()
def test_encoder_and_projector_match_transformers(vision_ckpt, herd_vision, num_tiles: int) -> None:
    _, ref = vision_ckpt
    pixels = tiles(num_tiles, seed=num_tiles)
    ours = herd_vision.vision_model(pixels)
    expected = ref.vision_model(pixels).last_hidden_state
    assert ours.shape == (num_tiles, 4, 48)
    assert expected.abs().mean() > 0.1  # features of order 1: a wrong tower could not pass by being near zero
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    projected = ref.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(herd_vision.encode_images(pixels), projected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_tiles_are_independent_of_their_batch(herd_vision) -> None:
    pixels = tiles(3, seed=7)
    batched = herd_vision.encode_images(pixels)
    alone = torch.cat([herd_vision.encode_images(pixels[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_vision_config_parsed(vision_ckpt) -> None:
    config = ModelConfig.from_hf(vision_ckpt[0])
    vision = config.vision
    assert vision is not None
    assert (vision.image_size, vision.patch_size, vision.tokens_per_tile) == (28, 7, 4)
    assert vision.rope_theta == 1000.0 and vision.num_layers == 2 and vision.head_dim == 16
    assert (config.image_token_index, config.boi_token_index, config.eoi_token_index) == (200092, 200080, 200081)


def test_scout_tile_has_144_tokens() -> None:
    raw = {
        "architectures": ["Llama4ForConditionalGeneration"],
        "text_config": {"vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2},
        "vision_config": {"hidden_size": 1408, "image_size": 336, "patch_size": 14, "rope_theta": 10000},
    }
    vision = ModelConfig.from_dict(raw).vision
    assert vision is not None and vision.tokens_per_tile == 144 and vision.rope_theta == 10000.0


def _with_vision(**fields) -> dict:
    text = {"vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}
    return {"architectures": ["Llama4ForConditionalGeneration"], "text_config": text, "vision_config": fields}


@pytest.mark.parametrize(
    ("vision", "field"),
    [
        ({"image_size": "336"}, "vision_config.image_size"),
        ({"image_size": 30, "patch_size": 14}, "patch_size"),
        ({"pixel_shuffle_ratio": 0.3}, "pixel_shuffle_ratio"),
        ({"image_size": 42, "patch_size": 14}, "pixel_shuffle_ratio"),  # 3 patches a side: no 2 x 2 shuffle
        ({"rope_parameters": {"rope_theta": -1}}, "rope_theta"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"norm_eps": "small"}, "norm_eps"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ],
)
def test_malformed_vision_config_is_one_line_naming_the_field(vision: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(_with_vision(**vision))
    assert field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"intermediate_size": 64}, "intermediate_size"),
        ({"vision_output_dim": 40}, "vision_output_dim"),
        ({"num_attention_heads": 3}, "num_attention_heads"),
    ],
)
def test_inconsistent_widths_fail_when_the_tower_is_built(change: dict, field: str) -> None:
    config = ModelConfig.from_dict(_with_vision(**{**VISION_LIKE, **change}))
    assert config.vision is not None  # a text-only run never builds the tower, so parsing accepts it
    with pytest.raises(ConfigError, match=field):
        config.vision.check_shapes(8)


def test_multimodal_off_skips_vision_weights(vision_ckpt, monkeypatch: pytest.MonkeyPatch) -> None:
    from herd.models import loader

    read: list[str] = []
    tensors = loader._checkpoint_tensors

    def recording(path):
        for name, get in tensors(path):
            yield name, (lambda n=name, g=get: (read.append(n), g())[1])

    monkeypatch.setattr(loader, "_checkpoint_tensors", recording)
    model = load_model(vision_ckpt[0], dtype="float32")
    assert isinstance(model, Llama4ForCausalLM)
    vision = ("vision_model.", "multi_modal_projector.")
    assert not any(name.startswith(vision) for name, _ in model.named_parameters())
    assert read and not any(name.startswith(vision) for name in read)  # never even read from disk


def test_missing_vision_tensor_is_named(vision_ckpt, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path, _ = vision_ckpt
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(path / "config.json", bad / "config.json")
    gone = "vision_model.model.layers.1.self_attn.k_proj.bias"
    tensors = {k: v for k, v in load_file(path / "model.safetensors").items() if k != gone}
    save_file(tensors, bad / "model.safetensors")
    load_model(bad, dtype="float32")  # the text model does not need it
    with pytest.raises(
        CheckpointError, match=r"1 missing tensor\(s\): vision_model\.model\.layers\.1\.self_attn\.k_proj"
    ):
        load_model(bad, dtype="float32", enable_multimodal=True)


def test_dummy_weights_with_vision(vision_ckpt, tmp_path: Path) -> None:
    shutil.copy(vision_ckpt[0] / "config.json", tmp_path / "config.json")
    model = load_model(tmp_path, load_format="dummy", enable_multimodal=True)
    assert isinstance(model, Llama4ForConditionalGeneration)
    assert next(model.vision_model.parameters()).dtype == torch.bfloat16
    assert torch.equal(model.vision_model.layernorm_pre.weight, torch.ones(32))
    with torch.no_grad():
        features = model.encode_images(tiles(2, seed=0))
    assert features.shape == (2, 4, 32) and features.dtype == torch.bfloat16  # float32 pixels, cast on entry
    assert torch.isfinite(features).all()


def test_text_checkpoint_with_multimodal_on_is_the_text_model(scout_ckpt) -> None:
    assert isinstance(load_model(scout_ckpt[0], dtype="float32", enable_multimodal=True), Llama4ForCausalLM)


def test_config_json_of_real_scout_shape(tmp_path: Path) -> None:
    """Scout's released vision_config (rope_theta at the top level, no rope_parameters)."""
    scout_vision = {
        "attention_dropout": 0.0,
        "hidden_act": "gelu",
        "hidden_size": 1408,
        "image_size": 336,
        "intermediate_size": 5632,
        "model_type": "llama4_vision_model",
        "multi_modal_projector_bias": False,
        "norm_eps": 1e-05,
        "num_attention_heads": 16,
        "num_channels": 3,
        "num_hidden_layers": 34,
        "patch_size": 14,
        "pixel_shuffle_ratio": 0.5,
        "projector_dropout": 0.0,
        "projector_input_dim": 4096,
        "projector_output_dim": 4096,
        "rope_theta": 10000,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
        "vision_output_dim": 4096,
    }
    raw = _with_vision(**scout_vision)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    vision = ModelConfig.from_hf(tmp_path).vision
    assert vision is not None
    vision.check_shapes(5120)
    assert vision.head_dim == 88 and vision.tokens_per_tile == 144
