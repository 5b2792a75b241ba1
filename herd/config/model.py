"""Model configuration read from a Hugging Face `config.json`.

`ModelConfig.from_hf(path)` accepts both checkpoint kinds Llama 4 ships in:
`Llama4ForConditionalGeneration` (a `text_config` + `vision_config`, text weights under
`language_model.`) and `Llama4ForCausalLM` / `llama4_text` (text only, no prefix). Per-layer
facts (RoPE + chunked attention or global NoPE, MoE or dense, qk-norm) are derived once here so
that the model code never re-derives them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.config.fields import ConfigError, read_config_json, read_float, read_int
from herd.config.vision import VisionConfig, vision_config_from

MULTIMODAL_ARCHITECTURES = ("Llama4ForConditionalGeneration",)
TEXT_ARCHITECTURES = ("Llama4ForCausalLM",)
SUPPORTED_ARCHITECTURES = MULTIMODAL_ARCHITECTURES + TEXT_ARCHITECTURES
SUPPORTED_MODEL_TYPES = ("llama4", "llama4_text")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (`rope_type: llama3`), as Scout uses."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LayerSpec:
    index: int
    # RoPE layers attend within their chunk; NoPE layers attend globally. Llama 4 ties the two.
    use_rope: bool
    chunked: bool
    is_moe: bool
    use_qk_norm: bool
    temperature_tuning: bool


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    # Prefix of the text model's tensors in the checkpoint ("language_model." or "").
    weight_prefix: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    intermediate_size_mlp: int
    num_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    attention_chunk_size: int | None
    floor_scale: float
    attn_scale: float
    attention_bias: bool
    hidden_act: str
    tie_word_embeddings: bool
    max_position_embeddings: int
    initializer_range: float
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    image_token_index: int | None  # `<|patch|>`: the positions that receive image features
    boi_token_index: int | None  # `<|image_start|>`
    eoi_token_index: int | None  # `<|image_end|>`
    layers: tuple[LayerSpec, ...]
    vision: VisionConfig | None
    quantization: dict[str, Any] | None
    # Divisors of the RoPE frequencies, as a GGUF file stores Llama 3 scaling (`rope_freqs.weight`).
    rope_freq_factors: tuple[float, ...] | None = None

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a checkpoint folder (or the file itself), or a GGUF file's metadata."""
        path = Path(path)
        if path.suffix == ".gguf":
            from herd.config.gguf import gguf_config_dict  # the gguf package loads only for GGUF files

            raw, factors = gguf_config_dict(path)
            return dataclasses.replace(cls.from_dict(raw), rope_freq_factors=factors)
        return cls.from_dict(read_config_json(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        architecture = _architecture(raw)
        if architecture in MULTIMODAL_ARCHITECTURES:
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{architecture} config needs a 'text_config' object")
            raw_vision = raw.get("vision_config")
            if raw_vision is not None and not isinstance(raw_vision, dict):
                raise ConfigError("'vision_config' must be an object")
            vision = vision_config_from(raw_vision) if raw_vision else None
            prefix = "language_model."
            image_tokens = tuple(read_int(raw, key, default) for key, default in _IMAGE_TOKENS)
        else:
            text, vision, prefix, image_tokens = raw, None, "", (None, None, None)
        return _text_config(text, architecture, prefix, vision, image_tokens, raw)


# Top-level ids of a multimodal config, with HF's defaults (those of the real Llama 4 vocabulary).
_IMAGE_TOKENS = (("image_token_index", 200092), ("boi_token_index", 200080), ("eoi_token_index", 200081))


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
            raise ConfigError("'architectures' must be a non-empty list of strings")
        for arch in archs:
            if arch in SUPPORTED_ARCHITECTURES:
                return arch
        raise ConfigError(
            f"unsupported architecture {archs[0]!r} in 'architectures'; herd runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = raw.get("model_type")
    if model_type == "llama4":
        return MULTIMODAL_ARCHITECTURES[0]
    if model_type == "llama4_text":
        return TEXT_ARCHITECTURES[0]
    raise ConfigError(
        f"unsupported model_type {model_type!r} (and no 'architectures'); "
        f"herd runs model_type {' or '.join(SUPPORTED_MODEL_TYPES)}"
    )


def _text_config(
    t: dict[str, Any],
    architecture: str,
    prefix: str,
    vision: VisionConfig | None,
    image_tokens: tuple[int | None, int | None, int | None],
    top: dict[str, Any],
) -> ModelConfig:
    hidden = read_int(t, "hidden_size", required=True)
    num_layers = read_int(t, "num_hidden_layers", required=True)
    num_heads = read_int(t, "num_attention_heads", required=True)
    num_kv_heads = read_int(t, "num_key_value_heads", num_heads)
    if num_heads % num_kv_heads:
        raise ConfigError(
            f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
        )
    head_dim = read_int(t, "head_dim", hidden // num_heads)
    num_experts = read_int(t, "num_local_experts", 16)
    top_k = read_int(t, "num_experts_per_tok", 1)
    if top_k > num_experts:
        raise ConfigError(f"num_experts_per_tok ({top_k}) exceeds num_local_experts ({num_experts})")
    # An explicit null means no chunking; an absent key means HF's default.
    chunk = read_int(t, "attention_chunk_size", 8192) if t.get("attention_chunk_size", 0) is not None else None
    hidden_act = t.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ConfigError(f"hidden_act {hidden_act!r} is not supported; Llama 4 uses 'silu'")
    layers = _layer_specs(t, num_layers, chunk)
    rope_theta, rope_scaling = _rope(t)
    quant = top.get("quantization_config") or t.get("quantization_config")
    eos = t.get("eos_token_id", top.get("eos_token_id"))
    eos_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
    return ModelConfig(
        architecture=architecture,
        weight_prefix=prefix,
        vocab_size=read_int(t, "vocab_size", required=True),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        intermediate_size=read_int(t, "intermediate_size", 8192),
        intermediate_size_mlp=read_int(t, "intermediate_size_mlp", 16384),
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        rms_norm_eps=read_float(t, "rms_norm_eps", 1e-5),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        attention_chunk_size=chunk,
        floor_scale=read_float(t, "floor_scale", 8192.0),
        attn_scale=read_float(t, "attn_scale", 0.1),
        attention_bias=bool(t.get("attention_bias", False)),
        hidden_act=hidden_act,
        tie_word_embeddings=bool(top.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
        max_position_embeddings=read_int(t, "max_position_embeddings", 131072),
        initializer_range=read_float(t, "initializer_range", 0.02),
        torch_dtype=top.get("torch_dtype") or top.get("dtype") or t.get("torch_dtype") or t.get("dtype"),
        bos_token_id=t.get("bos_token_id"),
        eos_token_ids=eos_ids,
        image_token_index=image_tokens[0],
        boi_token_index=image_tokens[1],
        eoi_token_index=image_tokens[2],
        layers=layers,
        vision=vision,
        quantization=quant,
    )


def _layer_specs(t: dict[str, Any], num_layers: int, chunk: int | None) -> tuple[LayerSpec, ...]:
    # `no_rope_layers[i] == 1` means layer i USES RoPE: the name is inverted. HF falls back to
    # "every `no_rope_layer_interval`-th layer is NoPE" when the list is absent or empty.
    no_rope = t.get("no_rope_layers")
    if not no_rope:
        interval = read_int(t, "no_rope_layer_interval", 4)
        no_rope = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if not isinstance(no_rope, list) or len(no_rope) < num_layers or any(v not in (0, 1) for v in no_rope):
        raise ConfigError(f"no_rope_layers must list 0 or 1 for each of the {num_layers} layers")

    moe_layers = t.get("moe_layers")
    if moe_layers is None:
        step = read_int(t, "interleave_moe_layer_step", 1)
        moe_layers = list(range(step - 1, num_layers, step))
    if not isinstance(moe_layers, list) or any(not isinstance(i, int) or not 0 <= i < num_layers for i in moe_layers):
        raise ConfigError(f"moe_layers must list layer indices in [0, {num_layers})")

    layer_types = t.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list)
        or len(layer_types) < num_layers
        or any(k not in ("chunked_attention", "full_attention") for k in layer_types)
    ):
        raise ConfigError(
            f"layer_types must name 'chunked_attention' or 'full_attention' for each of the {num_layers} layers"
        )

    use_qk_norm = bool(t.get("use_qk_norm", True))
    tuning = bool(t.get("attn_temperature_tuning", True))
    specs = []
    for i in range(num_layers):
        use_rope = bool(no_rope[i])
        chunked = layer_types[i] == "chunked_attention" if layer_types else use_rope
        specs.append(
            LayerSpec(
                index=i,
                use_rope=use_rope,
                chunked=chunked and chunk is not None,
                is_moe=i in moe_layers,
                use_qk_norm=use_qk_norm and use_rope,
                temperature_tuning=tuning and not use_rope,
            )
        )
    return tuple(specs)


def _rope(t: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (theta inside); released checkpoints carry
    # `rope_theta` + `rope_scaling`. Accept both.
    params = t.get("rope_parameters") or t.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError("rope_scaling / rope_parameters must be an object")
    theta = params.get("rope_theta", t.get("rope_theta", 500000.0))
    if not isinstance(theta, int | float) or theta <= 0:
        raise ConfigError(f"rope_theta must be a positive number, got {theta!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(f"rope_type {rope_type!r} is not supported; herd supports 'default' and 'llama3'")
    scaling = RopeScaling(
        factor=read_float(params, "factor", required=True, where="rope_scaling"),
        low_freq_factor=read_float(params, "low_freq_factor", required=True, where="rope_scaling"),
        high_freq_factor=read_float(params, "high_freq_factor", required=True, where="rope_scaling"),
        original_max_position_embeddings=read_int(
            params, "original_max_position_embeddings", required=True, where="rope_scaling"
        ),
    )
    return float(theta), scaling
