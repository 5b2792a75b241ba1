"""Do the weights fit? Checked on the model built on the meta device, before any weight is read.

A layer's bytes are those of its parameters as the method creates them (a quantized checkpoint's FP8 or
packed INT4 tensors are already their final size), except for the methods that quantize at load
(--quantization), whose `stored_bits` say what each weight element will take. The budget is the one the KV
planner uses (herd.worker.kv_sizing): on a GPU the memory free now less the (1 - --mem-fraction-static) share
kept for activations; on the CPU --mem-fraction-static x --cpu-memory-budget-gb, shared by the ranks.
When the weights do not fit, the error gives the bytes needed and available and the flags that would fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from herd.config import ArgumentError
from herd.layers.linear import LinearBase
from herd.layers.moe import FusedMoE
from herd.layers.quantization.unquantized import UnquantizedFusedMoEMethod, UnquantizedLinearMethod
from herd.worker.kv_sizing import CPU_MEM_FRACTION, GPU_MEM_FRACTION

GiB = 2**30
# Bits per weight element of each --quantization format, scales included (w4a16: a 16-bit scale per 128).
FORMAT_BITS = {"fp8": 8.0, "w8a16": 8.0, "w8a8_int8": 8.0, "w4a16": 4.125}


@dataclass(frozen=True)
class WeightBytes:
    total: int  # this rank's weights as the run will hold them
    quantizable: int  # bytes of full-precision weights that --quantization would quantize
    quantizable_elements: int


def weight_bytes(model: nn.Module) -> WeightBytes:
    total = quantizable = elements = 0
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        size = sum(p.numel() * p.element_size() for p in params)
        if isinstance(module, LinearBase | FusedMoE):
            bits = getattr(module.method, "stored_bits", None)
            weights = [p for p in params if p.dim() >= 2]  # not the bias
            if bits is not None:
                size = sum(p.numel() * p.element_size() for p in params if p.dim() < 2)
                size += sum(math.ceil(p.numel() * bits / 8) for p in weights)
            elif isinstance(module.method, UnquantizedLinearMethod | UnquantizedFusedMoEMethod):
                quantizable += sum(p.numel() * p.element_size() for p in weights)
                elements += sum(p.numel() for p in weights)
        total += size
    return WeightBytes(total, quantizable, elements)


def available_bytes(device: torch.device, mem_fraction: float | None, cpu_budget_gb: float, tp_size: int) -> int:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free - total * (1 - (mem_fraction or GPU_MEM_FRACTION)))
    return int(cpu_budget_gb * GiB / tp_size * (mem_fraction or CPU_MEM_FRACTION))


def check_weights_fit(
    model: nn.Module,
    *,
    device: torch.device,
    mem_fraction: float | None,
    cpu_budget_gb: float,
    tp_size: int,
    quantization: str | None,
) -> None:
    """Raise ArgumentError naming bytes needed, bytes available and flags that would fit."""
    need = weight_bytes(model)
    have = available_bytes(device, mem_fraction, cpu_budget_gb, tp_size)
    if need.total <= have:
        return
    fixes = []
    for name, bits in FORMAT_BITS.items():
        smaller = need.total - need.quantizable + math.ceil(need.quantizable_elements * bits / 8)
        if need.quantizable and smaller <= have and name != quantization:
            fixes.append(f"--quantization {name} ({smaller / GiB:.2f} GiB)")
    if device.type == "cuda":
        ranks = tp_size * 2 ** math.ceil(math.log2(need.total / max(have, 1)))
        fixes.append(f"--tp {ranks} (about {need.total * tp_size / ranks / GiB:.2f} GiB per GPU)")
        fixes.append("a larger --mem-fraction-static" if (mem_fraction or GPU_MEM_FRACTION) < 0.95 else "")
    else:
        fraction = mem_fraction or CPU_MEM_FRACTION
        budget = math.ceil(need.total * tp_size / fraction / GiB * 1.1)  # room for some KV cache too
        fixes.append(f"--cpu-memory-budget-gb {budget} if the machine has that much")
    raise ArgumentError(
        f"the weights need {need.total / GiB:.2f} GiB ({need.total} bytes) per rank but {have / GiB:.2f} GiB "
        f"({max(have, 0)} bytes) is available for them on {device}"
        f"{'' if quantization is None else f' (with --quantization {quantization})'}; would fit: "
        + "; ".join(f for f in fixes if f)
    )
