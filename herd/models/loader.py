"""Checkpoint -> model: sharded safetensors in Hugging Face layout, or random weights (`dummy`).

Accepts the multimodal layout (text weights under `language_model.`) and the text-only one,
and experts stored fused (`experts.gate_up_proj [E, H, 2I]`, `experts.down_proj [E, I, H]`)
or per expert (`experts.<e>.{gate,up,down}_proj.weight`). Anything that does not fit — a
missing or unexpected tensor, a wrong shape — fails with the offending names listed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from herd.config import ModelConfig
from herd.layers.attention import get_attention_backend
from herd.models.llama4_text import Llama4ForCausalLM

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# Tensors of a multimodal checkpoint that the text model does not use.
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")
_PER_EXPERT = re.compile(r"(model\.layers\.\d+\.feed_forward\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


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
) -> Llama4ForCausalLM:
    """Build the text model of the checkpoint at `path` and fill its weights."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load format {load_format!r}; accepted: {', '.join(LOAD_FORMATS)}")
    config = ModelConfig.from_hf(path)
    if config.quantization is not None and load_format != "dummy":
        method = config.quantization.get("quant_method", "?")
        raise CheckpointError(f"quantized checkpoints (quant_method {method!r}) are not supported yet")
    torch_dtype = resolve_dtype(dtype, config)
    model = _build_empty(config, torch_dtype, device, attention_backend)
    if load_format == "dummy":
        init_dummy_weights(model, config, seed)
    else:
        load_weights(model, config, Path(path))
    return model.eval()


def _build_empty(
    config: ModelConfig, dtype: torch.dtype, device: str | torch.device, attention_backend: str
) -> Llama4ForCausalLM:
    """The model with uninitialised storage of the final dtype: no init work, no float32 copy."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Llama4ForCausalLM(config, get_attention_backend(attention_backend))
    finally:
        torch.set_default_dtype(previous)
    return model.to_empty(device=device)


def init_dummy_weights(model: nn.Module, config: ModelConfig, seed: int = 0) -> None:
    """Random weights from the config alone, for benchmarks without a checkpoint."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                param.copy_(noise * config.initializer_range)


def load_weights(model: nn.Module, config: ModelConfig, path: Path) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    expert_parts: dict[str, set[tuple[int, str]]] = {}
    with ExitStack() as stack:
        tensors = list(_checkpoint_tensors(path, stack))
        for ckpt_name, get in tqdm(tensors, desc="Loading weights", unit="tensor", leave=False):
            name = _param_name(ckpt_name, config)
            if name is None:
                continue
            if match := _PER_EXPERT.fullmatch(name):
                prefix, expert, proj = match.group(1), int(match.group(2)), match.group(3)
                problem = _load_expert_part(params, prefix, expert, proj, get())
                if problem:
                    (unexpected if problem == "unknown" else mismatched).append(f"{ckpt_name} {problem}")
                else:
                    expert_parts.setdefault(prefix, set()).add((expert, proj))
                continue
            if name not in params:
                unexpected.append(ckpt_name)
                continue
            tensor = get()
            if tuple(tensor.shape) != tuple(params[name].shape):
                mismatched.append(f"{ckpt_name}: checkpoint {list(tensor.shape)} vs model {list(params[name].shape)}")
                continue
            with torch.no_grad():
                params[name].copy_(tensor)
            loaded.add(name)
    for prefix, parts in expert_parts.items():
        if len(parts) == 3 * config.num_experts:
            loaded.update({f"{prefix}.gate_up_proj", f"{prefix}.down_proj"})
    if config.tie_word_embeddings and "lm_head.weight" not in loaded:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    _raise_if_bad(path, missing, unexpected, mismatched, config.weight_prefix)
    logger.info("loaded %d tensors from %s", len(loaded), path)


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


def _param_name(ckpt_name: str, config: ModelConfig) -> str | None:
    """Model parameter name for a checkpoint tensor; None for tensors the text model skips."""
    prefix = config.weight_prefix
    if prefix:
        if ckpt_name.startswith(VISION_PREFIXES):
            return None
        if not ckpt_name.startswith(prefix):
            return ckpt_name  # reported as unexpected
        return ckpt_name[len(prefix) :]
    return ckpt_name


def _load_expert_part(
    params: dict[str, nn.Parameter], prefix: str, expert: int, proj: str, weight: torch.Tensor
) -> str | None:
    """Copy one per-expert nn.Linear weight into the fused tensors; a problem string on failure."""
    gate_up, down = params.get(f"{prefix}.gate_up_proj"), params.get(f"{prefix}.down_proj")
    if gate_up is None or down is None or expert >= gate_up.shape[0]:
        return "unknown"
    inter = down.shape[1]
    if proj == "down":
        target = down[expert]  # [I, H]; the linear weight is [H, I]
    else:
        target = gate_up[expert, :, :inter] if proj == "gate" else gate_up[expert, :, inter:]  # [H, I]
    if tuple(weight.t().shape) != tuple(target.shape):
        return f"checkpoint {list(weight.shape)} vs model {list(target.t().shape)}"
    with torch.no_grad():
        target.copy_(weight.t())
    return None


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
