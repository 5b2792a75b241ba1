"""W8A8 INT8 (`--quantization w8a8_int8`, SGLang's name): INT8 weights and INT8 activations, int32 sums.

The layers w8a16 quantizes (every decoder linear layer and routed expert; not the router, the embeddings or the
vision tower) are quantized as the checkpoint loads, by the same rule: symmetric, one scale per output channel,
q = round(w / s) in [-127, 127], s = max|w| / 127. Each call quantizes its activations per token (symmetric, one
scale per row), sums the products exactly in int32 and scales the sums by s_x * s_w in fp32 (the arithmetic is
herd.kernels.cpu.int8_vnni's). On a CPU with AVX-512 VNNI this runs herd's kernel, which reads the INT8 weight
with one `vpdpbusd` per 64 bytes and row of x; elsewhere `torch._int_mm` gives the same numbers.

Besides the weight, each output row keeps an fp32 scale and the int32 sum of its weights (the kernel biases x by
+128 to use VNNI's unsigned-by-signed product and takes 128 * that sum off again).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from herd.kernels.cpu.int8_vnni import prepare_weight, vnni_enabled, w8a8_linear
from herd.layers.moe import grouped_experts
from herd.layers.parameters import new_parameter
from herd.layers.quantization.base import (
    DecodeKernel,
    DecodeWeights,
    FusedMoEMethodBase,
    LinearMethodBase,
    create_per_channel_expert_weights,
)
from herd.layers.quantization.int8 import Int8Config
from herd.layers.quantization.unquantized import (
    UnquantizedFusedMoEMethod,
    UnquantizedLinearMethod,
)

if TYPE_CHECKING:
    from herd.layers.linear import LinearBase
    from herd.layers.moe import FusedMoE

# Per weight element once quantized (herd.worker.weight_memory); a row's fp32 scale and int32 sum add 64 bits per
# row, under 0.02 bits per element for rows of 4096 or more, and are left out.
STORED_BITS = 8.0


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] -> (INT8 [out, in], fp32 scales [out], int32 row sums [out]), symmetric per output channel."""
    # One float32 copy, worked on in place (never the weight itself: a tied embedding may share it); the same
    # values as round(w / s).clamp(-127, 127).
    w = weight.detach().to(torch.float32, copy=True)
    lo, hi = torch.aminmax(w, dim=1)
    scales = torch.maximum(hi, -lo).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    q = w.div_(scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scales, q.sum(dim=1, dtype=torch.int32)


class W8A8Int8LinearMethod(UnquantizedLinearMethod):
    """Loads as the unquantized method does (TP slices and fused parts included), then quantizes."""

    stored_bits = STORED_BITS

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        q, scales, _ = quantize_weight(layer.weight)
        del layer.weight  # a tied embedding keeps its own reference
        _register(layer, "weight_", q, scales)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = w8a8_linear(x, layer.weight_int8, layer.weight_scale, layer.weight_sum)
        return out if bias is None else out + bias

    def decode_weights(self, layer: LinearBase) -> DecodeWeights | None:
        if layer.weight_int8.device.type != "cpu" or not vnni_enabled():  # the weight as is, for torch._int_mm
            return None
        return DecodeKernel.W8A8, [layer.weight_int8, layer.weight_scale, layer.weight_sum]


class W8A8Int8FusedMoEMethod(UnquantizedFusedMoEMethod):
    """Each expert's two projections as W8A8 linear weights: gate_up [E, 2I, H], down [E, H, I]."""

    stored_bits = STORED_BITS

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        gate_up, down = layer.gate_up_proj.detach(), layer.down_proj.detach()
        del layer.gate_up_proj, layer.down_proj
        for name, fused in (("gate_up", gate_up), ("down", down)):
            # Loaded as [E, in, out]; the kernel reads [out, in] rows.
            _register_experts(layer, f"{name}_", layer.num_experts, lambda e, f=fused: quantize_weight(f[e].t())[:2])

    def apply(self, layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            gate_up = w8a8_linear(rows, layer.gate_up_int8[e], layer.gate_up_scale[e], layer.gate_up_sum[e])
            gate, up = gate_up.chunk(2, dim=-1)
            return w8a8_linear(F.silu(gate) * up, layer.down_int8[e], layer.down_scale[e], layer.down_sum[e])

        return grouped_experts(x, expert_ids, expert)

    def decode_weights(self, layer: FusedMoE) -> tuple[DecodeWeights, DecodeWeights] | None:
        if layer.gate_up_int8.device.type != "cpu" or not vnni_enabled():
            return None
        gate_up = DecodeKernel.W8A8, [layer.gate_up_int8, layer.gate_up_scale, layer.gate_up_sum]
        return gate_up, (DecodeKernel.W8A8, [layer.down_int8, layer.down_scale, layer.down_sum])


def _register(layer: torch.nn.Module, prefix: str, q: torch.Tensor, scales: torch.Tensor) -> None:
    """q [N, K] int8 as the kernel takes it, its scales and row sums."""
    layer.register_buffer(f"{prefix}int8", prepare_weight(q), persistent=False)
    layer.register_buffer(f"{prefix}scale", scales.float().contiguous(), persistent=False)
    layer.register_buffer(f"{prefix}sum", q.sum(dim=-1, dtype=torch.int32), persistent=False)


def _register_experts(
    layer: torch.nn.Module, prefix: str, count: int, expert: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Experts 0..count-1 (`expert(e)`: q [N, K] int8 and its scales [N]) stacked as `_register` stores one,
    written expert by expert into the final buffers (a stacked copy and a packed one were held at once)."""
    q, s = expert(0)
    p = prepare_weight(q)
    packed = p.new_empty((count, *p.shape))
    scales = torch.empty((count, q.shape[0]), dtype=torch.float32, device=q.device)
    sums = torch.empty((count, q.shape[0]), dtype=torch.int32, device=q.device)
    for e in range(count):
        if e:
            q, s = expert(e)
            p = prepare_weight(q)
        packed[e], scales[e], sums[e] = p, s, q.sum(dim=-1, dtype=torch.int32)
    layer.register_buffer(f"{prefix}int8", packed, persistent=False)
    layer.register_buffer(f"{prefix}scale", scales, persistent=False)
    layer.register_buffer(f"{prefix}sum", sums, persistent=False)


class W8A8Int8CheckpointLinearMethod(LinearMethodBase):
    """A compressed-tensors W8A8 layer (llm-compressor's W8A8 preset, format `int-quantized`): `weight` int8
    [out, in] and `weight_scale` [out, 1], activations quantized per token at run time (no `input_scale`)."""

    def create_weights(self, layer: LinearBase) -> None:
        out, inp = layer.output_size_per_rank, layer.input_size_per_rank
        layer.weight = new_parameter((out, inp), layer.weight_loader, dtype=torch.int8)
        layer.weight_scale = new_parameter((out, 1), layer.weight_loader, dtype=torch.float32)
        layer.weight_scale.input_pack = None  # type: ignore[attr-defined]  (one scale covers the whole row)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        q, scales = layer.weight.detach(), layer.weight_scale.detach().view(-1)
        del layer.weight, layer.weight_scale
        _register(layer, "weight_", q, scales)

    apply = W8A8Int8LinearMethod.apply
    decode_weights = W8A8Int8LinearMethod.decode_weights


class W8A8Int8CheckpointMoEMethod(FusedMoEMethodBase):
    """Experts stored one by one (`experts.<e>.{gate,up,down}_proj.weight` int8 + `.weight_scale [out, 1]`),
    kept as gate_up [E, 2I, H] and down [E, H, I] with a scale and a weight sum per row."""

    def create_weights(self, layer: FusedMoE) -> None:
        create_per_channel_expert_weights(layer, torch.int8)

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        for name in ("gate_up", "down"):
            q, scales = getattr(layer, f"{name}_proj").detach(), getattr(layer, f"{name}_proj_scale").detach()
            delattr(layer, f"{name}_proj")
            delattr(layer, f"{name}_proj_scale")
            _register_experts(layer, f"{name}_", q.shape[0], lambda e, q=q, s=scales: (q[e], s[e, :, 0]))

    apply = W8A8Int8FusedMoEMethod.apply
    decode_weights = W8A8Int8FusedMoEMethod.decode_weights


class W8A8Int8Config(Int8Config):
    """The layers w8a16 quantizes, as W8A8."""

    name = "w8a8_int8"

    def new_linear_method(self) -> LinearMethodBase:
        return W8A8Int8LinearMethod()

    def new_moe_method(self) -> FusedMoEMethodBase:
        return W8A8Int8FusedMoEMethod()
