"""W4A16: INT4 weights with one scale per group of `group_size` inputs, activations in the model's dtype.

w = q * s, q in [-8, 7], s per (output row, group of inputs); symmetric (no zero point). Two ways in:
- a compressed-tensors `pack-quantized` checkpoint (RedHatAI's W4A16): `weight_packed` int32 [out, in / 8]
  (eight values per word, value i in bits 4i..4i+3, stored as q + 8), `weight_scale` [out, in / group] and
  `weight_shape` [2]; unpacked with compressed-tensors' own `unpack_from_int32`;
- `--quantization w4a16` on a bf16/fp16/fp32 checkpoint: s = max|w_group| / 7.5, q = clamp(round(w / s), -8, 7),
  the rule of compressed-tensors' symmetric min-max observer, with groups of 128.

Kernels: on a CPU with AVX512-BF16, herd's (herd/kernels/cpu/int4_bf16.cpp: bf16 activations, groups of a
multiple of 64; 1.1-1.2x PyTorch's at batch 1, benchmarks/RESULTS.md). Elsewhere on the CPU PyTorch's
`_weight_int4pack_mm_for_cpu` (its own packed layout, made at load; it computes (q_u - 8) * s + z with q_u = q + 8
and zero z = 0). On a GPU the Triton W4A16 GEMM (`herd.layers.triton_ops.weight_only`) reads two values per
byte, in herd's layout. Each reads a quarter of bf16's weight bytes.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from herd.kernels.cpu import enabled as cpu_kernels_enabled
from herd.layers.moe import grouped_experts
from herd.layers.parameters import WeightShapeError, new_parameter
from herd.layers.quantization.base import DecodeKernel, DecodeWeights, FusedMoEMethodBase, LinearMethodBase
from herd.layers.quantization.unquantized import UnquantizedFusedMoEMethod, UnquantizedLinearMethod

if TYPE_CHECKING:
    from herd.layers.linear import LinearBase
    from herd.layers.moe import FusedMoE

DEFAULT_GROUP = 128
CPU_GROUPS = (32, 64, 128, 256)  # the group sizes _weight_int4pack_mm_for_cpu takes


def group_for(inputs: int, preferred: int = DEFAULT_GROUP) -> int:
    """The group size --quantization w4a16 uses for rows of `inputs`: 128, or the largest of 64 and 32 that
    divides a narrower input (tiny test models)."""
    for group in (preferred, 64, 32):
        if inputs % group == 0:
            return group
    raise ValueError(f"an input of {inputs} columns does not split into INT4 groups of {preferred}, 64 or 32")


def quantize_int4_groups(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (q int8 [out, in] in [-8, 7], float32 scales [out, in / group])."""
    out, inp = weight.shape
    if inp % group:
        raise ValueError(f"an input of {inp} columns does not split into INT4 groups of {group}")
    w = weight.detach().float().reshape(out, inp // group, group)
    scales = w.abs().amax(dim=2).clamp(min=torch.finfo(torch.float32).tiny) / 7.5
    q = torch.round(w / scales[..., None]).clamp(-8, 7).to(torch.int8)
    return q.reshape(out, inp), scales


def unpack_checkpoint(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """compressed-tensors' int32 words [rows, cols / 8] -> q int8 [rows, cols]."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, 4, torch.Size([rows, cols]))


def herd_cpu_kernel_takes(group: int) -> bool:
    """Whether herd's AVX512-BF16 W4A16 kernel (herd/kernels/cpu/int4_bf16.cpp) serves groups of `group` here."""
    return group % 64 == 0 and cpu_kernels_enabled() and torch.ops.herd_cpu.int4_bf16_supported()


def pack_for_kernel(
    q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, cpu_layout: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [out, in], scales [out, groups]) -> the kernel's (weight, scales) on q's device.

    herd's layout, for the Triton kernels and for herd's CPU kernel where it runs (bf16 models on CPUs with
    AVX512-BF16): uint8 [out, in / 2], input 2j in the low nibble and 2j + 1 in the high one (each q + 8), and
    scales [out, groups] (in `dtype`; float32 on the CPU, which the kernel reads). Otherwise on the CPU (or with
    cpu_layout): `_convert_weight_to_int4pack_for_cpu`'s layout and scales-and-zeros [groups, out, 2] in `dtype`.
    """
    unsigned = q.to(torch.int32) + 8
    on_cpu = q.device.type == "cpu"
    if cpu_layout is None:  # herd's kernel takes bf16 activations: a bf16 model's
        cpu_layout = on_cpu and not (dtype == torch.bfloat16 and herd_cpu_kernel_takes(q.shape[1] // scales.shape[1]))
    if cpu_layout:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), 1)
        scales_zeros = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).to(dtype).contiguous()
        return packed, scales_zeros
    packed = (unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return packed, scales.to(torch.float32 if on_cpu else dtype).contiguous()


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """x [..., in] @ W.T -> [..., out] for W in `pack_for_kernel`'s layout."""
    rows = x.reshape(-1, x.shape[-1])
    if x.device.type == "cpu" and scales.dim() == 2:  # herd's layout (pack_for_kernel)
        if x.dtype == torch.bfloat16:
            out = torch.ops.herd_cpu.w4a16_linear(rows, packed, scales, group)
        else:  # float32 / float16 activations: the dequantized weight, exactly
            out = F.linear(rows, dequantize_packed(packed, scales, group).to(x.dtype))
    elif x.device.type == "cpu":
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, group, scales)
    elif x.is_cuda:
        from herd.layers.triton_ops.weight_only import w4a16_matmul  # triton only on GPUs

        out = w4a16_matmul(rows, packed, scales, group)
    else:
        out = F.linear(rows, dequantize_packed(packed, scales, group).to(x.dtype))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def dequantize_packed(packed: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The GPU layout back to float32 [out, in] (the reference the Triton kernel is tested against)."""
    low, high = (packed & 0xF).to(torch.int32) - 8, (packed >> 4).to(torch.int32) - 8
    q = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1).float()
    return (q.reshape(q.shape[0], -1, group) * scales.float()[..., None]).reshape(q.shape)


def _check_cpu_group(device: torch.device, group: int, inp: int) -> None:
    if device.type == "cpu" and (group not in CPU_GROUPS or inp % group):
        raise ValueError(f"INT4 groups of {group} over {inp} inputs: the CPU kernel takes groups of {CPU_GROUPS}")


class _Int4Linear:
    """Shared by both ways in: apply() on buffers `weight_int4`, `weight_int4_scale` and `group_size`."""

    @staticmethod
    def finish(layer: LinearBase, q: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype) -> None:
        _check_cpu_group(q.device, group, q.shape[1])
        packed, kernel_scales = pack_for_kernel(q, scales, dtype)
        layer.register_buffer("weight_int4", packed, persistent=False)
        layer.register_buffer("weight_int4_scale", kernel_scales, persistent=False)
        layer.group_size = group

    @staticmethod
    def apply(layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = int4_linear(x, layer.weight_int4, layer.weight_int4_scale, layer.group_size)
        return out if bias is None else out + bias

    @staticmethod
    def decode_weights(layer: LinearBase) -> DecodeWeights | None:
        if layer.weight_int4.device.type != "cpu" or layer.weight_int4_scale.dim() != 2:  # not herd's CPU layout
            return None
        return DecodeKernel.INT4, [layer.weight_int4, layer.weight_int4_scale]


def load_linear_shape(
    layer: LinearBase, param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: object = None
) -> None:
    """`weight_shape` holds a part's unpacked [out, in]: checked, not stored."""
    part = 0 if shard_id is None or layer.shard_ids is None else layer.shard_ids.index(shard_id)
    expected = [layer.output_sizes[part], layer.input_size]
    if loaded.tolist() != expected:
        raise WeightShapeError(expected)


class Int4CheckpointLinearMethod(LinearMethodBase):
    def __init__(self, group: int) -> None:
        self.group = group

    def create_weights(self, layer: LinearBase) -> None:
        out, inp = layer.output_size_per_rank, layer.input_size_per_rank
        if inp % self.group:
            raise ValueError(f"{inp} inputs per rank do not split into INT4 groups of {self.group}")
        layer.weight_packed = new_parameter((out, inp // 8), layer.weight_loader, dtype=torch.int32)
        layer.weight_packed.input_pack = 8  # type: ignore[attr-defined]
        layer.weight_scale = new_parameter((out, inp // self.group), layer.weight_loader)
        layer.weight_scale.input_pack = self.group  # type: ignore[attr-defined]
        shape_loader = partial(load_linear_shape, layer)
        layer.weight_shape = new_parameter((len(layer.output_sizes), 2), shape_loader, dtype=torch.int64)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        packed, scales = layer.weight_packed.detach(), layer.weight_scale.detach()
        del layer.weight_packed, layer.weight_scale, layer.weight_shape
        q = unpack_checkpoint(packed, layer.output_size_per_rank, layer.input_size_per_rank)
        _Int4Linear.finish(layer, q, scales.float(), self.group, scales.dtype)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _Int4Linear.apply(layer, x, bias)

    def decode_weights(self, layer: LinearBase) -> DecodeWeights | None:
        return _Int4Linear.decode_weights(layer)


class Int4OnlineLinearMethod(UnquantizedLinearMethod):
    """--quantization w4a16: loads as the unquantized method does, then quantizes per group."""

    stored_bits = 4.125  # per weight element once quantized (herd.worker.weight_memory)

    def __init__(self, group: int = DEFAULT_GROUP) -> None:
        self.group = group

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        weight = layer.weight.detach()
        del layer.weight  # a tied embedding keeps its own reference
        group = group_for(weight.shape[1], self.group)
        q, scales = quantize_int4_groups(weight, group)
        _Int4Linear.finish(layer, q, scales, group, weight.dtype)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _Int4Linear.apply(layer, x, bias)

    def decode_weights(self, layer: LinearBase) -> DecodeWeights | None:
        return _Int4Linear.decode_weights(layer)


def _finish_experts(layer: FusedMoE, name: str, parts: list[tuple[torch.Tensor, torch.Tensor]], group: int,
                    dtype: torch.dtype) -> None:  # fmt: skip
    """Per expert (q [rows, cols], scales [rows, groups]) -> stacked kernel buffers `<name>_int4[_scale]`."""
    _check_cpu_group(parts[0][0].device, group, parts[0][0].shape[1])
    packed = [pack_for_kernel(q, s, dtype) for q, s in parts]
    layer.register_buffer(f"{name}_int4", torch.stack([p for p, _ in packed]), persistent=False)
    layer.register_buffer(f"{name}_int4_scale", torch.stack([s for _, s in packed]), persistent=False)
    setattr(layer, f"{name}_group", group)


def _int4_experts(layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from herd.layers.triton_ops.weight_only import fused_moe_w4a16  # triton only on GPUs

        return fused_moe_w4a16(
            x, expert_ids, layer.gate_up_int4, layer.gate_up_int4_scale, layer.down_int4, layer.down_int4_scale,
            layer.gate_up_group, layer.down_group,
        )  # fmt: skip

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate_up = int4_linear(rows, layer.gate_up_int4[e], layer.gate_up_int4_scale[e], layer.gate_up_group)
        gate, up = gate_up.chunk(2, dim=-1)
        return int4_linear(F.silu(gate) * up, layer.down_int4[e], layer.down_int4_scale[e], layer.down_group)

    return grouped_experts(x, expert_ids, expert)


def _int4_decode_weights(layer: FusedMoE) -> tuple[DecodeWeights, DecodeWeights] | None:
    herd_layout = layer.gate_up_int4_scale.dim() == 3 and layer.down_int4_scale.dim() == 3  # each part chose its own
    if layer.gate_up_int4.device.type != "cpu" or not herd_layout:
        return None
    gate_up = DecodeKernel.INT4, [layer.gate_up_int4, layer.gate_up_int4_scale]
    return gate_up, (DecodeKernel.INT4, [layer.down_int4, layer.down_int4_scale])


def load_expert_shape(
    layer: FusedMoE, param: torch.nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None,
    expert_id: int | None = None,
) -> None:  # fmt: skip
    """An expert's `weight_shape`: [I, H] for gate and up, [H, I] for down; checked, not stored."""
    h, i = layer.hidden_size, layer.intermediate_size
    expected = [i, h] if shard_id is not None else [h, i]
    if loaded.tolist() != expected:
        raise WeightShapeError(expected)


class Int4CheckpointMoEMethod(FusedMoEMethodBase):
    """Experts stored one by one (`experts.<e>.{gate,up,down}_proj.weight_packed/_scale/_shape`)."""

    def __init__(self, group: int) -> None:
        self.group = group

    def create_weights(self, layer: FusedMoE) -> None:
        experts, hidden, inter = layer.num_local_experts, layer.hidden_size, layer.intermediate_size_per_rank
        if hidden % self.group or inter % self.group:
            raise ValueError(f"experts of {hidden} x {inter} per rank do not split into INT4 groups of {self.group}")
        for name, (rows, cols) in (("gate_up_proj", (2 * inter, hidden)), ("down_proj", (hidden, inter))):
            packed = new_parameter((experts, rows, cols // 8), layer.load_expert_linear, dtype=torch.int32)
            packed.input_pack = 8  # type: ignore[attr-defined]
            scale = new_parameter((experts, rows, cols // self.group), layer.load_expert_linear)
            scale.input_pack = self.group  # type: ignore[attr-defined]
            setattr(layer, f"{name}_packed", packed)
            setattr(layer, f"{name}_scale", scale)
            setattr(layer, f"{name}_shape", new_parameter((1,), partial(load_expert_shape, layer), dtype=torch.int64))

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        for name in ("gate_up", "down"):
            packed = getattr(layer, f"{name}_proj_packed").detach()
            scales = getattr(layer, f"{name}_proj_scale").detach()
            for leaf in ("packed", "scale", "shape"):
                delattr(layer, f"{name}_proj_{leaf}")
            rows, cols = packed.shape[1], packed.shape[2] * 8
            parts = [(unpack_checkpoint(packed[e], rows, cols), scales[e].float()) for e in range(packed.shape[0])]
            _finish_experts(layer, name, parts, self.group, scales.dtype)

    def apply(self, layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return _int4_experts(layer, x, expert_ids)

    def decode_weights(self, layer: FusedMoE) -> tuple[DecodeWeights, DecodeWeights] | None:
        return _int4_decode_weights(layer)


class Int4OnlineMoEMethod(UnquantizedFusedMoEMethod):
    """--quantization w4a16 for experts loaded in HF's fused layout (gate_up [E, H, 2I], down [E, I, H])."""

    stored_bits = 4.125  # per weight element once quantized (herd.worker.weight_memory)

    def __init__(self, group: int = DEFAULT_GROUP) -> None:
        self.group = group

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        gate_up, down = layer.gate_up_proj.detach(), layer.down_proj.detach()
        del layer.gate_up_proj, layer.down_proj
        for name, fused in (("gate_up", gate_up), ("down", down)):
            group = group_for(fused.shape[1], self.group)  # the input dimension: H for gate_up, I for down
            parts = [quantize_int4_groups(fused[e].t(), group) for e in range(layer.num_local_experts)]
            _finish_experts(layer, name, parts, group, fused.dtype)

    def apply(self, layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return _int4_experts(layer, x, expert_ids)

    def decode_weights(self, layer: FusedMoE) -> tuple[DecodeWeights, DecodeWeights] | None:
        return _int4_decode_weights(layer)
