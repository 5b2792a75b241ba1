"""Tiny compressed-tensors Llama 4 checkpoints in the published layouts, made with the compressed-tensors package.

As llm-compressor writes them: the experts unfused (`feed_forward.experts.<e>.{gate,up,down}_proj`, nn.Linear's
[out, in] each), every Linear that the scheme targets and the ignore list spares compressed by
compressed-tensors' own compressor (FP8: `weight` + `weight_scale [out, 1]`; W4A16: `weight_packed`,
`weight_scale`, `weight_shape`), with scales from its min-max rule (`calculate_qparams`); config.json carries
the package's `quantization_config`. The transformers model that comes back holds the dequantized weights
(w = q * s, computed in float32), the reference herd must match.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor, IntQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, preset_name_to_scheme
from compressed_tensors.quantization.utils import calculate_qparams
from compressed_tensors.utils.match import match_name
from safetensors.torch import save_file
from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

from checkpoints import widen

# Meta's Maverick FP8 list: only the routed experts are quantized.
MAVERICK_FP8_IGNORE = [
    "re:.*lm_head",
    "re:.*self_attn",
    "re:.*router",
    "re:.*vision_model",
    "re:.*multi_modal_projector",
    "re:.*shared_expert",
    "re:.*feed_forward.gate_proj",
    "re:.*feed_forward.up_proj",
    "re:.*feed_forward.down_proj",
]
# A shorter list (attention, shared expert and dense MLPs quantized too), as in RedHatAI's FP8-dynamic and
# W4A16 recipes: it exercises herd's fused q/k/v and gate/up layers in the quantized formats.
SHORT_IGNORE = ["re:.*lm_head", "re:.*router", "re:.*vision_model", "re:.*multi_modal_projector"]

FORMATS = {"FP8_DYNAMIC": "float-quantized", "W4A16": "pack-quantized", "W8A8": "int-quantized"}
COMPRESSORS = {
    "FP8_DYNAMIC": FloatQuantizationCompressor,
    "W4A16": PackedQuantizationCompressor,
    "W8A8": IntQuantizationCompressor,
}


def make_ct_checkpoint(
    path: Path, text_config: dict, preset: str, ignore: list[str], *, multimodal: bool = False, seed: int = 0
) -> torch.nn.Module:
    """Write the checkpoint to `path`; return transformers' model (fp32) on the dequantized weights, with
    `quantized_params`: the names of its parameters that the checkpoint holds quantized."""
    torch.manual_seed(seed)
    if multimodal:
        from checkpoints import VISION_LIKE

        model = Llama4ForConditionalGeneration(Llama4Config(text_config=text_config, vision_config=VISION_LIKE))
        prefix = "language_model."
    else:
        model, prefix = Llama4ForCausalLM(Llama4TextConfig(**text_config)), ""
    model = model.float().eval()
    widen(model, seed)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    tensors: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()  # transformers' names of the parameters the checkpoint holds quantized
    with torch.no_grad():
        for name, param in model.state_dict().items():
            for module, weight, fused in _linears(name, param):
                if any(match_name(module, ig) for ig in ignore):
                    tensors[f"{module}.weight"] = weight.contiguous()
                    continue
                compressed, dequantized = _compress(weight, scheme, preset)
                quantized.add(name)
                tensors.update({f"{module}.{k}": v.contiguous() for k, v in compressed.items()})
                fused(dequantized)
            if not _is_linear(name, param):
                tensors[name] = param.contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    quant = QuantizationConfig(
        config_groups={"group_0": scheme}, format=FORMATS[preset], ignore=ignore, quantization_status="compressed"
    )
    config["quantization_config"] = quant.model_dump()
    (path / "config.json").write_text(json.dumps(config, indent=2, default=str))
    assert prefix or not multimodal
    model.quantized_params = quantized
    return model


def _is_linear(name: str, param: torch.Tensor) -> bool:
    leaf = name.rpartition(".")[2]
    return (name.endswith(".weight") and param.dim() == 2 and "embed_tokens" not in name and "vision" not in name
            and "multi_modal" not in name) or (leaf in ("gate_up_proj", "down_proj") and param.dim() == 3)  # fmt: skip


def _linears(name: str, param: torch.Tensor):
    """(checkpoint module name, [out, in] weight, setter of the dequantized weight) for each Linear in `param`:
    one for a Linear's weight, three per expert for HF's fused experts (llm-compressor's unfused names)."""
    if not _is_linear(name, param):
        return
    if param.dim() == 2:
        yield name.removesuffix(".weight"), param, param.copy_
        return
    experts = name.rpartition(".")[0]
    for e in range(param.shape[0]):
        if name.endswith("gate_up_proj"):  # [E, H, 2I], gate first
            inter = param.shape[2] // 2
            for i, proj in enumerate(("gate_proj", "up_proj")):
                cols = slice(i * inter, (i + 1) * inter)
                yield f"{experts}.{e}.{proj}", param[e][:, cols].t(), lambda w, e=e, c=cols: param[e][:, c].copy_(w.t())
        else:  # down_proj [E, I, H]
            yield f"{experts}.{e}.down_proj", param[e].t(), lambda w, e=e: param[e].copy_(w.t())


def _compress(weight: torch.Tensor, scheme: QuantizationScheme, preset: str) -> tuple[dict, torch.Tensor]:
    args = scheme.weights
    w = weight.float()
    if args.strategy == "group":
        grouped = w.reshape(w.shape[0], -1, args.group_size)
        lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    else:  # channel
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    scale, _ = calculate_qparams(torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi)), args)
    scale = scale.to(torch.bfloat16)  # as the published checkpoints store them
    compressor = COMPRESSORS[preset]
    compressed = compressor.compress({"weight": w.to(torch.bfloat16), "weight_scale": scale}, scheme)
    # The reference weight: the package's own decompression, with the scale in float32 so that q * s is exact.
    restored = compressor.decompress({**compressed, "weight_scale": scale.float()}, scheme)["weight"]
    return compressed, restored.float()
