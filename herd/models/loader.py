"""Checkpoint -> model: sharded safetensors in Hugging Face layout, or random weights (`dummy`).

Accepts the multimodal layout (text weights under `language_model.`) and the text-only one, and experts
stored fused (`experts.gate_up_proj [E, H, 2I]`, `experts.down_proj [E, I, H]`) or per expert
(`experts.<e>.{gate,up,down}_proj.weight`). Every tensor goes through its parameter's `weight_loader`,
which knows the fused q/k/v and gate/up blocks, the rank's tensor-parallel slice and the weight format;
then each layer's method repacks what it loaded (`process_weights_after_loading`). The vision tower of a
multimodal checkpoint is built and loaded only with `enable_multimodal`; otherwise its tensors are never
read. Anything that does not fit (a missing or unexpected tensor, a wrong shape) fails with the offending
names listed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from herd.config import ModelConfig
from herd.config.engine import DTYPES, LOAD_FORMATS
from herd.config.gguf import is_gguf
from herd.layers.attention import AttentionBackend, get_attention_backend
from herd.layers.factory import LayerFactory
from herd.layers.linear import LinearBase
from herd.layers.moe import GATE, UP, FusedMoE
from herd.layers.parameters import WeightShapeError, materialize, weight_loader_of
from herd.layers.quantization.select import select_quantization
from herd.layers.quantization.unquantized import UnquantizedConfig
from herd.models.gguf_loader import gguf_tensors
from herd.models.llama4 import Llama4ForConditionalGeneration, text_model
from herd.models.llama4_text import Llama4ForCausalLM
from herd.models.safetensors_mmap import mapped_tensor, read_index

logger = logging.getLogger(__name__)

Model = Llama4ForCausalLM | Llama4ForConditionalGeneration

# Tensors of a multimodal checkpoint that the text model does not use.
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")
# (fused parameter, checkpoint tensor, shard id): the checkpoint's separate projections of a fused matmul.
STACKED_PARAMS = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
# `weight`, or a quantized format's `weight_<part>` (weight_scale, weight_packed, weight_shape): part <part>
# goes to the fused parameter `<param>_<part>` (gate_up_proj_scale, ...).
_PER_EXPERT = re.compile(
    r"^(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight(?P<part>_[a-z_]+)?$"
)
_EXPERT_SHARDS = {
    "gate_proj": ("gate_up_proj", GATE),
    "up_proj": ("gate_up_proj", UP),
    "down_proj": ("down_proj", None),
}

# (parameter name, shard id, expert id) of one checkpoint tensor loaded.
Loaded = tuple[str, Any, int | None]


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
    attention_backend: str | AttentionBackend = "torch_native",
    seed: int = 0,
    enable_multimodal: bool = False,
    factory: LayerFactory | None = None,
    config: ModelConfig | None = None,
    check_memory: Callable[[nn.Module], None] | None = None,
) -> Model:
    """Build the model of the checkpoint at `path` and fill its weights.

    The text model alone, unless `enable_multimodal` and the checkpoint has a vision tower. `factory` makes
    the linear layers and experts: this rank's tensor-parallel slice, in the weight format's method
    (default: one rank, the weights as stored). `check_memory` sees the model on the meta device, before
    any weight is read, and raises if it cannot fit.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load format {load_format!r}; accepted: {', '.join(LOAD_FORMATS)}")
    config = config or ModelConfig.from_hf(path)
    backend = (
        attention_backend
        if isinstance(attention_backend, AttentionBackend)
        else get_attention_backend(attention_backend)
    )
    if factory is None:  # one rank; a quantized checkpoint in its own format, the rest as stored
        checkpoint_quant = config.quantization if load_format != "dummy" else None
        factory = LayerFactory(select_quantization(checkpoint_quant, config.weight_prefix, None, UnquantizedConfig()))
    torch_dtype = resolve_dtype(dtype, config)
    multimodal = enable_multimodal and config.vision is not None
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # the dtype of every parameter built without one
    try:
        with torch.device("meta"):  # no storage and no init work until the weights are known
            model = (Llama4ForConditionalGeneration if multimodal else Llama4ForCausalLM)(config, factory, backend)
    finally:
        torch.set_default_dtype(previous)
    if check_memory is not None:
        check_memory(model)  # still on the meta device: a model that cannot fit fails before any weight is read
    if load_format == "dummy":
        init_dummy_weights(model, config, seed, device)
    else:
        materialize(model, device)
        load_weights(model, config, Path(path))
        process_weights_after_loading(model)
    return model.eval()


def init_dummy_weights(
    model: nn.Module, config: ModelConfig, seed: int = 0, device: str | torch.device = "cpu"
) -> None:
    """Random weights from the config alone, for benchmarks without a checkpoint.

    Each linear layer and block of experts gets storage, weights and its method's processing (quantization,
    packing) before the next one gets storage, so a run with --quantization never holds the whole model in
    full precision: Scout-shaped W4A16 dummy weights fit where bf16 ones would not.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    owners = [m for m in model.modules() if isinstance(m, LinearBase | FusedMoE)]
    owner_of = {id(p): m for m in owners for p in m.parameters(recurse=False)}
    left = {id(m): len(list(m.parameters(recurse=False))) for m in owners}
    with torch.no_grad():
        for name, param in list(model.named_parameters()):
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            materialize(module, device, recurse=False)
            real = module._parameters[leaf]
            assert real is not None
            if module_name.endswith("norm") or "layernorm" in module_name.rpartition(".")[2]:
                real.fill_(1.0 if leaf == "weight" else 0.0)
            elif real.dtype.is_floating_point:
                noise = torch.randn(real.shape, generator=gen, dtype=torch.float32)
                real.copy_(noise * config.initializer_range)
            owner = owner_of.get(id(param))
            if owner is not None:
                left[id(owner)] -= 1
                if left[id(owner)] == 0:
                    owner.method.process_weights_after_loading(owner)
    materialize(model, device)  # buffers


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every layer's method repack what was loaded (CPU packing, quantized layouts)."""
    for module in model.modules():
        if isinstance(module, LinearBase | FusedMoE):
            module.method.process_weights_after_loading(module)


def load_weights(model: Model, config: ModelConfig, path: Path) -> None:
    # The multimodal model's names are the checkpoint's own; the text model's lack the prefix.
    multimodal = isinstance(model, Llama4ForConditionalGeneration)
    params = dict(model.named_parameters())
    loaded: set[Loaded] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    tensors = list(gguf_tensors(path) if is_gguf(path) else _checkpoint_tensors(path))
    for ckpt_name, get in tqdm(tensors, desc="Loading weights", unit="tensor", leave=False):
        name = ckpt_name if multimodal else _strip_prefix(ckpt_name, config)
        if name is None:
            continue
        target = _target(name, params)
        if target is None:
            unexpected.append(ckpt_name)
            continue
        param_name, shard_id, expert_id = target
        param, tensor = params[param_name], get()
        extra = {} if expert_id is None else {"expert_id": expert_id}
        try:
            with torch.no_grad():
                weight_loader_of(param)(param, tensor, shard_id, **extra)
        except WeightShapeError as e:
            mismatched.append(f"{ckpt_name}: checkpoint {list(tensor.shape)} vs model {e.expected}")
            continue
        finally:
            del tensor  # its pages leave the process now, not when the next tensor replaces it
        loaded.add(target)
    missing = _missing(model, params, loaded)
    head = f"{config.weight_prefix if multimodal else ''}lm_head.weight"
    if config.tie_word_embeddings and head in missing:
        text = text_model(model)
        text.lm_head.weight = text.model.embed_tokens.weight
        missing.remove(head)
    missing_prefix = "" if multimodal else config.weight_prefix
    _raise_if_bad(path, missing, unexpected, mismatched, missing_prefix)
    logger.info("loaded %d tensors from %s", len(tensors), path)


def _target(name: str, params: dict[str, nn.Parameter]) -> Loaded | None:
    """The parameter (and its part) that checkpoint tensor `name` fills; None if the model has no place for it."""
    if name in params:
        return name, None, None
    per_expert = _PER_EXPERT.match(name)
    if per_expert is not None:
        param, shard_id = _EXPERT_SHARDS[per_expert["proj"]]
        param_name = f"{per_expert['experts']}.{param}{per_expert['part'] or ''}"
        return (param_name, shard_id, int(per_expert["expert"])) if param_name in params else None
    for fused, part, shard_id in STACKED_PARAMS:
        base, sep, leaf = name.rpartition(f".{part}.")
        if sep and f"{base}.{fused}.{leaf}" in params:
            return f"{base}.{fused}.{leaf}", shard_id, None
    return None


def _missing(model: nn.Module, params: dict[str, nn.Parameter], loaded: set[Loaded]) -> list[str]:
    """Checkpoint names of what no tensor filled. A fused parameter is complete when it was loaded whole or
    part by part; its missing parts are named as the checkpoint names them."""
    missing = []
    for name in params:
        if (name, None, None) in loaded:
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        if isinstance(owner, FusedMoE):
            shards = (GATE, UP) if name.rpartition(".")[2].startswith("gate_up_proj") else (None,)
            if not all((name, s, e) in loaded for e in range(owner.num_experts) for s in shards):
                missing.append(name)
        elif isinstance(owner, LinearBase) and owner.shard_ids is not None:
            base, fused, leaf = name.rsplit(".", 2)
            parts = {shard: part for f, part, shard in STACKED_PARAMS if f == fused}
            missing += [f"{base}.{parts[s]}.{leaf}" for s in owner.shard_ids if (name, s, None) not in loaded]
        else:
            missing.append(name)
    return sorted(missing)


def _checkpoint_tensors(path: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, lazy getter) for every tensor of the checkpoint. A getter maps just that tensor's bytes
    (herd.models.safetensors_mmap): a tensor-parallel rank's weight_loader copies out only its slice, so only
    those pages are ever read, and the mapping goes when the tensor is dropped."""
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
        for key, entry in read_index(path / file).items():
            yield key, (lambda e=entry: mapped_tensor(e))


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
