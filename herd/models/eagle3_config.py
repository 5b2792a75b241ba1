"""The config.json of an EAGLE-3 draft model, in the layout SGLang and SpecForge publish.

A Llama 4 draft (`lmsys/sglang-EAGLE3-Llama-4-Maverick-17B-128E-Instruct-v1`, NVIDIA's
`Llama-4-Maverick-17B-128E-Eagle3`, SpecForge's `configs/llama4-scout-17B-16E-eagle3.json`) is a plain
Llama config (`model_type: llama`, `architectures: [LlamaForCausalLMEagle3]`, one hidden layer) plus
`draft_vocab_size`, optionally `target_hidden_size`, and NVIDIA's `eagle_config` with
`eagle_aux_hidden_state_layer_ids`. Being a Llama config, its RoPE defaults are Llama's (theta 10000,
rotate-half pairs), not Llama 4's; SGLang reads it with `LlamaConfig` (python/sglang/srt/models/llama_eagle3.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.config import RopeScaling
from herd.config.fields import ConfigError, read_config_json, read_float, read_int

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


def default_target_layer_ids(num_target_layers: int) -> tuple[int, int, int]:
    """SGLang's default for Llama targets, as outputs of target layers.

    SGLang's `set_eagle3_layers_to_capture` captures the INPUTS of layers [2, L // 2, L - 3] (llama4.py appends
    `hidden_states + residual` before running layer i), that is the outputs of layers 1, L // 2 - 1 and L - 4;
    NVIDIA ModelOpt's default `[1, L // 2 - 1, L - 4]` says the same in output terms. Clamped into the model
    for targets of fewer than four layers (tiny test models), where the formula would go negative.
    """
    last = num_target_layers - 1
    ids = (1, num_target_layers // 2 - 1, num_target_layers - 4)
    return tuple(min(max(i, 0), last) for i in ids)  # type: ignore[return-value]


@dataclass(frozen=True)
class Eagle3Config:
    hidden_size: int
    vocab_size: int  # the target's vocabulary: embed_tokens and the d2t map's image
    draft_vocab_size: int  # rows of lm_head
    target_hidden_size: int  # width of each captured target hidden state (fc takes 3 of them)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool
    # Outputs (before the final norm) of these target layers, concatenated in this order, feed `fc`.
    # None: the config does not say; `resolve_layer_ids` applies SGLang's default for the target's depth.
    target_layer_ids: tuple[int, int, int] | None
    num_hidden_layers: int = 1
    torch_dtype: str | None = None

    def resolve_layer_ids(self, num_target_layers: int) -> tuple[int, int, int]:
        ids = self.target_layer_ids or default_target_layer_ids(num_target_layers)
        if any(not 0 <= i < num_target_layers for i in ids):
            raise ValueError(f"draft target layer ids {list(ids)} are outside the target's {num_target_layers} layers")
        return ids

    @classmethod
    def from_hf(cls, path: str | Path) -> Eagle3Config:
        """Read a draft checkpoint's config.json (a folder or the file itself)."""
        path = Path(path)
        return cls.from_dict(read_config_json(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Eagle3Config:
        archs = raw.get("architectures") or []
        if not any(a in EAGLE3_ARCHITECTURES for a in archs):
            raise ConfigError(f"architectures {archs} is not an EAGLE-3 draft (expected one of {EAGLE3_ARCHITECTURES})")
        hidden = read_int(raw, "hidden_size", required=True)
        heads = read_int(raw, "num_attention_heads", required=True)
        vocab = read_int(raw, "vocab_size", required=True)
        # SGLang: no draft_vocab_size means the draft predicts over the whole target vocabulary.
        draft_vocab = read_int(raw, "draft_vocab_size", vocab)
        if draft_vocab > vocab:
            raise ConfigError(f"draft_vocab_size {draft_vocab} exceeds vocab_size {vocab}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported; EAGLE-3 Llama drafts use 'silu'")
        # SGLang sizes the MLP by intermediate_size_mlp when the draft config is a llama4_text one.
        inter_key = "intermediate_size_mlp" if raw.get("model_type") == "llama4_text" else "intermediate_size"
        theta, scaling = _rope(raw)
        return cls(
            hidden_size=hidden,
            vocab_size=vocab,
            draft_vocab_size=draft_vocab,
            target_hidden_size=read_int(raw, "target_hidden_size", hidden),
            num_heads=heads,
            num_kv_heads=read_int(raw, "num_key_value_heads", heads),
            head_dim=read_int(raw, "head_dim", hidden // heads),
            intermediate_size=read_int(raw, inter_key, required=True),
            rms_norm_eps=read_float(raw, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            target_layer_ids=_layer_ids(raw),
            num_hidden_layers=read_int(raw, "num_hidden_layers", 1),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        )


def _layer_ids(raw: dict[str, Any]) -> tuple[int, int, int] | None:
    # NVIDIA/ModelOpt (and SGLang reading them) keep the ids in `eagle_config`; vLLM's speculators lift them
    # to the top level. Either way they name target layers whose OUTPUT is captured.
    eagle = raw.get("eagle_config") or {}
    ids = eagle.get("eagle_aux_hidden_state_layer_ids") or raw.get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or len(ids) != 3 or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ConfigError(f"eagle_aux_hidden_state_layer_ids must list three layer indices, got {ids!r}")
    return (ids[0], ids[1], ids[2])


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes `rope_parameters` (theta inside); published drafts carry `rope_theta` + `rope_scaling`.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError("rope_scaling / rope_parameters must be an object")
    theta = read_float({"t": params.get("rope_theta", raw.get("rope_theta", 10000.0))}, "t", where="rope_theta")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"draft rope_type {rope_type!r} is not supported; herd supports 'default' and 'llama3'")
    return theta, RopeScaling(
        factor=read_float(params, "factor", required=True, where="rope_scaling"),
        low_freq_factor=read_float(params, "low_freq_factor", required=True, where="rope_scaling"),
        high_freq_factor=read_float(params, "high_freq_factor", required=True, where="rope_scaling"),
        original_max_position_embeddings=read_int(
            params, "original_max_position_embeddings", required=True, where="rope_scaling"
        ),
    )
