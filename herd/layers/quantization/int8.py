"""W8A16: INT8 weights with one scale per output channel, activations in the model's dtype.

`--quantization w8a16` quantizes a bf16/fp16/fp32 checkpoint as it loads: every linear layer of the decoder
and every routed expert (the router, the embeddings and the vision tower stay as stored: the router's few
logits decide which expert runs, and a flipped choice costs more than its 2 MB save). A weight row w becomes
q = round(w / s) in [-127, 127] with s = max|w| / 127, so the weight's error is at most s / 2 per element.

On the CPU a decode step's few rows go through herd's AVX-512 kernel (herd.kernels.cpu.gemv_int8), larger
batches (or a CPU without it) through PyTorch's `_weight_int8pack_mm`; both read the INT8 weight directly, half
the bytes of bf16 (benchmarks/RESULTS.md). Elsewhere the weight is dequantized per call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from herd.kernels.cpu import GEMV_MAX_ROWS, enabled
from herd.layers.moe import grouped_experts
from herd.layers.quantization.base import (
    DecodeKernel,
    DecodeWeights,
    FusedMoEMethodBase,
    LinearMethodBase,
    QuantizationConfig,
)
from herd.layers.quantization.unquantized import UnquantizedFusedMoEMethod, UnquantizedLinearMethod

if TYPE_CHECKING:
    from herd.layers.linear import LinearBase
    from herd.layers.moe import FusedMoE

# Kept in the checkpoint's dtype (see the module docstring).
UNQUANTIZED_PREFIXES = ("vision_model.", "multi_modal_projector.")
UNQUANTIZED_SUFFIXES = (".router",)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (INT8 [out, in], scales [out] in the weight's dtype), symmetric per output channel."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales.to(weight.dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (q * scales[:, None]).T -> [..., out]."""
    if x.device.type != "cpu":
        return F.linear(x, q.to(x.dtype) * scales[:, None])
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= GEMV_MAX_ROWS and enabled():
        out = torch.ops.herd_cpu.gemv_int8(rows, q, scales)
    else:
        out = torch.ops.aten._weight_int8pack_mm(rows, q, scales)
    return out.reshape(*x.shape[:-1], q.shape[0])


class Int8LinearMethod(UnquantizedLinearMethod):
    """Loads as the unquantized method does (TP slices and fused parts included), then quantizes."""

    stored_bits = 8.0  # per weight element once quantized (herd.worker.weight_memory)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        q, scales = quantize_rows(layer.weight)
        del layer.weight  # a tied embedding keeps its own reference
        layer.register_buffer("weight_int8", q, persistent=False)
        layer.register_buffer("weight_scale", scales, persistent=False)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = int8_linear(x, layer.weight_int8, layer.weight_scale)
        return out if bias is None else out + bias

    def decode_weights(self, layer: LinearBase) -> DecodeWeights | None:
        if layer.weight_int8.device.type != "cpu" or not enabled():
            return None
        return DecodeKernel.W8A16, [layer.weight_int8, layer.weight_scale]


class Int8FusedMoEMethod(UnquantizedFusedMoEMethod):
    """Each expert's two projections as INT8 linear weights: gate_up [2I, H], down [H, I]."""

    stored_bits = 8.0  # per weight element once quantized (herd.worker.weight_memory)

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        gate_up, down = layer.gate_up_proj.detach(), layer.down_proj.detach()
        del layer.gate_up_proj, layer.down_proj
        for name, fused in (("gate_up", gate_up), ("down", down)):
            parts = [quantize_rows(fused[e].t()) for e in range(layer.num_experts)]
            layer.register_buffer(f"{name}_int8", torch.stack([q for q, _ in parts]), persistent=False)
            layer.register_buffer(f"{name}_scale", torch.stack([s for _, s in parts]), persistent=False)

    def apply(self, layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            gate, up = int8_linear(rows, layer.gate_up_int8[e], layer.gate_up_scale[e]).chunk(2, dim=-1)
            return int8_linear(F.silu(gate) * up, layer.down_int8[e], layer.down_scale[e])

        return grouped_experts(x, expert_ids, expert)

    def decode_weights(self, layer: FusedMoE) -> tuple[DecodeWeights, DecodeWeights] | None:
        if layer.gate_up_int8.device.type != "cpu" or not enabled():
            return None
        gate_up = DecodeKernel.W8A16, [layer.gate_up_int8, layer.gate_up_scale]
        return gate_up, (DecodeKernel.W8A16, [layer.down_int8, layer.down_scale])


class Int8Config(QuantizationConfig):
    name = "w8a16"

    def __init__(self, base: QuantizationConfig | None = None) -> None:
        # base: the methods of a full-precision run, for the layers left unquantized (the router, the vision
        # tower): on the CPU they then stay oneDNN-packed, where plain matmuls cost the router ~0.1 ms a layer.
        self.base = base

    def _quantized(self, prefix: str) -> bool:
        return not prefix.startswith(UNQUANTIZED_PREFIXES) and not prefix.endswith(UNQUANTIZED_SUFFIXES)

    def new_linear_method(self) -> LinearMethodBase:
        return Int8LinearMethod()

    def new_moe_method(self) -> FusedMoEMethodBase:
        return Int8FusedMoEMethod()

    def linear_method(self, prefix: str) -> LinearMethodBase:
        if self._quantized(prefix):
            return self.new_linear_method()
        return UnquantizedLinearMethod() if self.base is None else self.base.linear_method(prefix)

    def moe_method(self, prefix: str) -> FusedMoEMethodBase:
        if self._quantized(prefix):
            return self.new_moe_method()
        return UnquantizedFusedMoEMethod() if self.base is None else self.base.moe_method(prefix)
