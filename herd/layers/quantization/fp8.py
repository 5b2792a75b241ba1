"""FP8 weights (float8_e4m3fn) with one scale per output channel: w = q * s.

Two ways in: a compressed-tensors FP8 checkpoint stores q (`weight`) and s (`weight_scale [out, 1]`), and the
methods below load them as stored; `--quantization fp8` quantizes a bf16/fp16/fp32 checkpoint at load with
s = max|w| / 448 per row (e4m3's largest normal), as llm-compressor's FP8_DYNAMIC scheme does.

Compute:
- Hopper and newer GPUs (compute capability >= 8.9) with bf16/fp16 activations: the checkpoint's scheme,
  dynamic per-token activation scales (x = q_x * s_x, s_x = max|x_row| / 448) and `torch._scaled_mm` with
  row-wise scales on both sides.
- Elsewhere (the CPU above all): the weight is dequantized per call, a tile of rows at a time, to the
  activations' dtype and multiplied there (weight-only: activations are not quantized). In fp32 the
  dequantized weight is exactly q * s (q has 4 significant bits, s 8 if bf16: the product fits in fp32's 24).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from herd.layers.moe import grouped_experts
from herd.layers.parameters import new_parameter
from herd.layers.quantization.base import FusedMoEMethodBase, LinearMethodBase, create_per_channel_expert_weights
from herd.layers.quantization.int8 import Int8FusedMoEMethod, Int8LinearMethod, quantize_rows
from herd.layers.quantization.unquantized import UnquantizedFusedMoEMethod, UnquantizedLinearMethod

if TYPE_CHECKING:
    from herd.layers.linear import LinearBase
    from herd.layers.moe import FusedMoE

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
ROW_TILE = 4096  # rows dequantized at once on the CPU: bounds the temporary to ROW_TILE x in


def quantize_fp8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (FP8 [out, in], float32 scales [out]): symmetric, one scale per output channel."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX
    q = (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.contiguous(), scales


def scaled_mm_supported(x: torch.Tensor) -> bool:
    return (
        x.is_cuda
        and x.dtype in (torch.bfloat16, torch.float16)
        and torch.cuda.get_device_capability(x.device) >= (8, 9)
    )


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (q * scales[:, None]).T -> [..., out]; q FP8 [out, in], scales float32 [out]."""
    rows = x.reshape(-1, x.shape[-1])
    if scaled_mm_supported(x):
        out = _scaled_mm_rowwise(rows, q, scales)
    else:
        out = torch.cat(
            [F.linear(rows, q[r : r + ROW_TILE].to(x.dtype) * scales[r : r + ROW_TILE, None].to(x.dtype))
             for r in range(0, q.shape[0], ROW_TILE)],
            dim=-1,
        )  # fmt: skip
    return out.reshape(*x.shape[:-1], q.shape[0])


def _scaled_mm_rowwise(rows: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # Dynamic per-token activation scales, as the checkpoints' `input_activations` (strategy token) ask.
    x_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [M, 1]
    x_q = (rows.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return torch._scaled_mm(x_q, q.t(), scale_a=x_scale, scale_b=scales[None, :], out_dtype=rows.dtype)


def _register(layer: torch.nn.Module, prefix: str, q: torch.Tensor, scales: torch.Tensor) -> None:
    layer.register_buffer(f"{prefix}fp8", q, persistent=False)
    layer.register_buffer(f"{prefix}fp8_scale", scales, persistent=False)


class Fp8CheckpointLinearMethod(LinearMethodBase):
    """A compressed-tensors FP8 layer: `weight` FP8 [out, in] and `weight_scale` [out, 1], as stored."""

    def create_weights(self, layer: LinearBase) -> None:
        out, inp = layer.output_size_per_rank, layer.input_size_per_rank
        layer.compute_dtype = torch.get_default_dtype()  # the model's dtype (the loader sets it while building)
        layer.weight = new_parameter((out, inp), layer.weight_loader, dtype=FP8)
        layer.weight_scale = new_parameter((out, 1), layer.weight_loader, dtype=torch.float32)
        layer.weight_scale.input_pack = None  # type: ignore[attr-defined]  (one scale covers the whole row)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        q, scales = layer.weight.detach(), layer.weight_scale.detach().view(-1)
        del layer.weight, layer.weight_scale
        _register(layer, "weight_", q, scales)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = fp8_linear(x, layer.weight_fp8, layer.weight_fp8_scale)
        return out if bias is None else out + bias


class Fp8OnlineLinearMethod(UnquantizedLinearMethod):
    """--quantization fp8: loads as the unquantized method does, then quantizes each row."""

    stored_bits = 8.0  # per weight element once quantized (herd.worker.weight_memory)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        q, scales = quantize_fp8_rows(layer.weight)
        del layer.weight  # a tied embedding keeps its own reference
        _register(layer, "weight_", q, scales)

    apply = Fp8CheckpointLinearMethod.apply


def _fp8_experts(layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:  # grouped on the device: nothing waits for the host, the step stays capturable
        from herd.layers.triton_ops.weight_only import fused_moe_fp8

        return fused_moe_fp8(
            x, expert_ids, layer.gate_up_fp8, layer.gate_up_fp8_scale, layer.down_fp8, layer.down_fp8_scale
        )

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = fp8_linear(rows, layer.gate_up_fp8[e], layer.gate_up_fp8_scale[e]).chunk(2, dim=-1)
        return fp8_linear(F.silu(gate) * up, layer.down_fp8[e], layer.down_fp8_scale[e])

    return grouped_experts(x, expert_ids, expert)


class Fp8CheckpointMoEMethod(FusedMoEMethodBase):
    """Experts stored one by one (`experts.<e>.{gate,up,down}_proj.weight` FP8 + `.weight_scale [out, 1]`),
    kept as gate_up [E, 2I, H] and down [E, H, I] FP8 with a scale per row."""

    def create_weights(self, layer: FusedMoE) -> None:
        layer.compute_dtype = torch.get_default_dtype()
        create_per_channel_expert_weights(layer, FP8)

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        for name in ("gate_up", "down"):
            q, scales = getattr(layer, f"{name}_proj").detach(), getattr(layer, f"{name}_proj_scale").detach()
            delattr(layer, f"{name}_proj")
            delattr(layer, f"{name}_proj_scale")
            _register(layer, f"{name}_", q, scales[..., 0].contiguous())

    def apply(self, layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return _fp8_experts(layer, x, expert_ids)


class Fp8OnlineMoEMethod(UnquantizedFusedMoEMethod):
    """--quantization fp8 for experts loaded in HF's fused layout (gate_up [E, H, 2I], down [E, I, H])."""

    stored_bits = 8.0  # per weight element once quantized (herd.worker.weight_memory)

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        gate_up, down = layer.gate_up_proj.detach(), layer.down_proj.detach()
        del layer.gate_up_proj, layer.down_proj
        for name, fused in (("gate_up", gate_up), ("down", down)):
            parts = [quantize_fp8_rows(fused[e].t()) for e in range(layer.num_local_experts)]
            _register(layer, f"{name}_", torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts]))

    def apply(self, layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return _fp8_experts(layer, x, expert_ids)


# --quantization w8a16 on an FP8 checkpoint: PyTorch's INT8 CPU GEMM instead of a dequantization per call.
# w = q * s is requantized per output channel, adding about 0.8% relative RMS error to the FP8 weight
# (benchmarks/RESULTS.md, "FP8 checkpoints as INT8").


def _fp8_rows_to_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    q8, s8 = quantize_rows(q.float() * scales.float()[:, None])
    return q8, s8.to(dtype)


class Fp8AsInt8LinearMethod(Fp8CheckpointLinearMethod):
    def process_weights_after_loading(self, layer: LinearBase) -> None:
        q, scales = layer.weight.detach(), layer.weight_scale.detach().view(-1)
        del layer.weight, layer.weight_scale
        q8, s8 = _fp8_rows_to_int8(q, scales, layer.compute_dtype)
        layer.register_buffer("weight_int8", q8, persistent=False)
        layer.register_buffer("weight_scale", s8, persistent=False)

    apply = Int8LinearMethod.apply


class Fp8AsInt8MoEMethod(Fp8CheckpointMoEMethod):
    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        for name in ("gate_up", "down"):
            q, scales = getattr(layer, f"{name}_proj").detach(), getattr(layer, f"{name}_proj_scale").detach()
            delattr(layer, f"{name}_proj")
            delattr(layer, f"{name}_proj_scale")
            parts = [_fp8_rows_to_int8(q[e], scales[e, :, 0], layer.compute_dtype) for e in range(q.shape[0])]
            layer.register_buffer(f"{name}_int8", torch.stack([p for p, _ in parts]), persistent=False)
            layer.register_buffer(f"{name}_scale", torch.stack([p for _, p in parts]), persistent=False)

    def apply(self, layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return Int8FusedMoEMethod.apply(self, layer, x, expert_ids)  # type: ignore[arg-type]
