"""Checkpoint -> model: sharded safetensors in Hugging Face layout, or random weights (`dummy`).

Accepts the multimodal layout (text weights under `language_model.`) and the text-only one,
and experts stored fused (`experts.gate_up_proj [E, H, 2I]`, `experts.down_proj [E, I, H]`)
or per expert (`experts.<e>.{gate,up,down}_proj.weight`). The vision tower of a multimodal
checkpoint is built and loaded only with `enable_multimodal`; otherwise its tensors are never read.
Anything that does not fit — a missing or unexpected tensor, a wrong shape — fails with the
offending names listed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from herd.config import ModelConfig
from herd.layers.attention import get_attention_backend
from herd.models.llama4 import Llama4ForConditionalGeneration, text_model
from herd.models.llama4_text import Llama4ForCausalLM

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
Model = Llama4ForCausalLM | Llama4ForConditionalGeneration

# Tensors of a multimodal checkpoint that the text model does not use.
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: the message lists the offending tensors."""


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES.get(config.torch_dtype or "", torch.bfloat16)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    load_format: str = "auto",
    attention_backend: str = "torch_native",
    seed: int = 0,
    enable_multimodal: bool = False,
) -> Model:
    """Build the model of the checkpoint at `path` and fill its weights.

    The text model alone, unless `enable_multimodal` and the checkpoint has a vision tower.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load format {load_format!r}; accepted: {', '.join(LOAD_FORMATS)}")
    config = ModelConfig.from_hf(path)
    if config.quantization is not None and load_format != "dummy":
        method = config.quantization.get("quant_method", "?")
        raise CheckpointError(f"quantized checkpoints (quant_method {method!r}) are not supported yet")
    torch_dtype = resolve_dtype(dtype, config)
    multimodal = enable_multimodal and config.vision is not None
    model = _build_empty(config, torch_dtype, device, attention_backend, multimodal)
    if load_format == "dummy":
        init_dummy_weights(model, config, seed)
    else:
        load_weights(model, config, Path(path))
    return model.eval()


def _build_empty(
    config: ModelConfig, dtype: torch.dtype, device: str | torch.device, attention_backend: str, multimodal: bool
) -> Model:
    """The model with uninitialised storage of the final dtype: no init work, no float32 copy."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    kind = Llama4ForConditionalGeneration if multimodal else Llama4ForCausalLM
    try:
        with torch.device("meta"):
            model = kind(config, get_attention_backend(attention_backend))
    finally:
        torch.set_default_dtype(previous)
    return model.to_empty(device=device)


def init_dummy_weights(model: nn.Module, config: ModelConfig, seed: int = 0) -> None:
    """Random weights from the config alone, for benchmarks without a checkpoint."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            module, _, leaf = name.rpartition(".")
            if module.endswith("norm") or "layernorm" in module.rpartition(".")[2]:
                param.fill_(1.0 if leaf == "weight" else 0.0)
            else:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.copy_(noise * config.initializer_range)


def load_weights(model: Model, config: ModelConfig, path: Path) -> None:
    # The multimodal model's names are the checkpoint's own; the text model's lack the prefix.
    multimodal = isinstance(model, Llama4ForConditionalGeneration)
    text_prefix = config.weight_prefix if multimodal else ""
    slots = checkpoint_slots(model)
    expert_slots = per_expert_slots(model)
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    with ExitStack() as stack:
        tensors = list(_checkpoint_tensors(path, stack))
        for ckpt_name, get in tqdm(tensors, desc="Loading weights", unit="tensor", leave=False):
            name = ckpt_name if multimodal else _strip_prefix(ckpt_name, config)
            if name is None:
                continue
            target = slots.get(name)
            transpose = False
            if target is None and name in expert_slots:
                (target, fused), transpose = expert_slots[name], True
            if target is None:
                unexpected.append(ckpt_name)
                continue
            tensor = get()
            shape = tuple(tensor.t().shape if transpose else tensor.shape)
            if shape != tuple(target.shape):
                want = list(target.t().shape if transpose else target.shape)
                mismatched.append(f"{ckpt_name}: checkpoint {list(tensor.shape)} vs model {want}")
                continue
            with torch.no_grad():
                target.copy_(tensor.t() if transpose else tensor)
            loaded.add(fused if transpose else name)
    # A fused expert tensor counts as loaded once every expert's slice of it was.
    for fused in {f for _, f in expert_slots.values()}:
        parts = [n for n, (_, f) in expert_slots.items() if f == fused]
        if sum(p in loaded for p in parts) == len(parts) or fused in loaded:
            loaded.add(fused)
    loaded = {n for n in loaded if n in slots}
    if config.tie_word_embeddings and f"{text_prefix}lm_head.weight" not in loaded:
        text = text_model(model)
        text.lm_head.weight = text.model.embed_tokens.weight
        loaded.add(f"{text_prefix}lm_head.weight")
    missing_prefix = "" if multimodal else config.weight_prefix
    _raise_if_bad(path, sorted(set(slots) - loaded), unexpected, mismatched, missing_prefix)
    logger.info("loaded %d tensors from %s", len(tensors), path)


def checkpoint_slots(model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name (HF, without prefix) -> the parameter, or the slice of a fused one, it fills."""
    slots: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        base, _, leaf = name.rpartition(".")
        if base.endswith("qkv_proj"):
            attn = model.get_submodule(base.removesuffix(".qkv_proj"))
            parts = param.split([attn.q_dim, attn.kv_dim, attn.kv_dim], dim=0)
            prefix = base.removesuffix("qkv_proj")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                slots[f"{prefix}{proj}.{leaf}"] = part
        elif base.endswith("gate_up_proj") and leaf == "weight":
            prefix = base.removesuffix("gate_up_proj")
            gate, up = param.chunk(2, dim=0)
            slots[f"{prefix}gate_proj.weight"], slots[f"{prefix}up_proj.weight"] = gate, up
        else:
            slots[name] = param
    return slots


def per_expert_slots(model: nn.Module) -> dict[str, tuple[torch.Tensor, str]]:
    """Per-expert checkpoint names (`experts.<e>.gate_proj.weight` ...) -> (transposed target, fused name)."""
    slots: dict[str, tuple[torch.Tensor, str]] = {}
    for name, param in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            prefix, inter = name.removesuffix("gate_up_proj"), param.shape[2] // 2
            for e in range(param.shape[0]):
                slots[f"{prefix}{e}.gate_proj.weight"] = (param[e, :, :inter], name)
                slots[f"{prefix}{e}.up_proj.weight"] = (param[e, :, inter:], name)
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(param.shape[0]):
                slots[f"{prefix}{e}.down_proj.weight"] = (param[e], name)
    return slots


def _checkpoint_tensors(path: Path, stack: ExitStack) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, lazy getter) for every tensor of the checkpoint, memory-mapped."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files (or model.safetensors.index.json) in {path}")
    for file in files:
        if not (path / file).is_file():
            raise CheckpointError(f"shard {file} named in model.safetensors.index.json is missing from {path}")
        handle = stack.enter_context(safe_open(path / file, framework="pt", device="cpu"))
        for key in handle.keys():  # noqa: SIM118  (safe_open handles are not iterable)
            yield key, (lambda h=handle, k=key: h.get_tensor(k))


def _strip_prefix(ckpt_name: str, config: ModelConfig) -> str | None:
    """Name without the multimodal prefix; None for tensors the text model skips."""
    prefix = config.weight_prefix
    if not prefix:
        return ckpt_name
    if ckpt_name.startswith(VISION_PREFIXES):
        return None
    return ckpt_name[len(prefix) :] if ckpt_name.startswith(prefix) else ckpt_name


def _raise_if_bad(path: Path, missing: list[str], unexpected: list[str], mismatched: list[str], prefix: str) -> None:
    problems = []
    for what, names in (("missing", [prefix + n for n in missing]), ("unexpected", unexpected)):
        if names:
            problems.append(f"{len(names)} {what} tensor(s): {_first(names)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) with the wrong shape: {_first(mismatched)}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its config.json: " + "; ".join(problems))


def _first(names: list[str], n: int = 8) -> str:
    more = f", ... (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
