"""bf16 weights on the CPU through herd's own GEMV kernel (herd.kernels.cpu) at decode batch sizes.

At batch 1 a decode step is a chain of GEMVs that read every active weight once. herd's kernel streams the
weight as loaded, [out, in] row-major (experts transposed once to that orientation), as fast as oneDNN's packed
GEMV (benchmarks/gemv_cpu.py), without the packed copy: scout-mini decoded 3-11% faster in three pairs of
four (benchmarks/RESULTS.md). Batches above `GEMV_MAX_ROWS` rows go to PyTorch's matmul on the same weight. Small
weights (the demo model's) keep a oneDNN-packed copy too, for batches above `GEMV_MAX_ROWS`; weights that are not
bf16, a CPU where the kernel cannot be built or lacks AVX-512, and HERD_CPU_GEMV=0 keep the oneDNN-packed methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from herd.kernels.cpu import GEMV_MAX_ROWS, enabled
from herd.layers.moe import grouped_experts
from herd.layers.quantization.base import DecodeKernel, DecodeWeights
from herd.layers.quantization.unquantized import (
    SMALL_EXPERTS_BYTES,
    CPUPackedFusedMoEMethod,
    CPUPackedLinearMethod,
)

if TYPE_CHECKING:
    from herd.layers.linear import LinearBase
    from herd.layers.moe import FusedMoE


def gemv_enabled() -> bool:
    """Whether bf16 linear layers and experts take these methods (herd.kernels.cpu.enabled)."""
    return enabled()


# Rows up to which, with this many inputs or more, PyTorch's bf16 matmul is faster with the weight as its left
# operand, (weight @ x.T).T, than as F.linear's transposed right one: 1.0-1.7x at 9-64 rows for [1024-5120 in,
# 1024-32000 out] on the AVX512-BF16 EPYC of benchmarks/RESULTS.md, 1 or 2 threads, the transposing copy included;
# mixed at 128 rows and slower with 256 inputs (tiny's LM head), where the copy is the larger part.
WEIGHT_FIRST_MAX_ROWS = 64
WEIGHT_FIRST_MIN_INPUTS = 1024


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight [out, in].T in bf16, through the kernel when few rows."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows <= GEMV_MAX_ROWS and x.dtype == torch.bfloat16:
        return torch.ops.herd_cpu.gemv_bf16(x, weight)
    if rows <= WEIGHT_FIRST_MAX_ROWS and x.shape[-1] >= WEIGHT_FIRST_MIN_INPUTS and x.dtype == weight.dtype:
        x2 = x.reshape(rows, x.shape[-1])
        return torch.mm(weight, x2.t()).t().contiguous().view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


# Below this a weight is read in microseconds and a call's cost is its overhead. Such layers keep two copies: the
# kernel's (up to GEMV_MAX_ROWS rows: decoding a few sequences, a speculative verify step) and oneDNN's packed one
# for more rows, where its blocked matmul is up to 2x faster. A verify step between one-row steps then reads the
# weights the one-row steps keep in cache (with the experts alike, the demo model's 8-token NGRAM verify step took
# 4.0 ms instead of 5.2).
SMALL_LINEAR_BYTES = 4 * 2**20
# Layers with fewer inputs than WEIGHT_FIRST_MIN_INPUTS, where the weight-first matmul does not serve, keep the
# packed copy up to this size: tiny's LM head [32000, 256] at 64 rows took 1.4 ms packed against 2.1 through
# F.linear, which reorders the whole weight on every call (1 thread, the AMX Xeon of benchmarks/RESULTS.md).
NARROW_LINEAR_BYTES = 64 * 2**20


class CPUGemvLinearMethod(CPUPackedLinearMethod):
    """`compiled`: the decode step is compiled, so no weight is packed (a compiled graph cannot hold oneDNN's
    packed tensors): bf16 weights of any size take the kernel at decode rows, the rest PyTorch's matmul."""

    def __init__(self, compiled: bool = False) -> None:
        self.compiled = compiled

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        weight = layer.weight
        if self.compiled or weight.dtype != torch.bfloat16:
            if not self.compiled:
                super().process_weights_after_loading(layer)
            return
        size = weight.numel() * weight.element_size()
        if size < SMALL_LINEAR_BYTES or (weight.shape[1] < WEIGHT_FIRST_MIN_INPUTS and size <= NARROW_LINEAR_BYTES):
            # Both: a few rows through the kernel (oneDNN's call costs ~15-110 us whatever the size, 3-10x the
            # kernel's at one row on a router's [16, 2048]), more through the packed copy.
            row_weight = weight.detach()
            super().process_weights_after_loading(layer)
            layer.register_buffer("row_weight", row_weight, persistent=False)

    def swiglu(self, gate_up: LinearBase, down: LinearBase, x: torch.Tensor) -> torch.Tensor | None:
        """A few rows through both layers as one expert of `swiglu_experts_bf16`: the chunk, SiLU, product and
        second matmul in the kernel's call rather than four more ops (the demo model's shared expert)."""
        weights = kernel_weight(gate_up), kernel_weight(down)
        few = x.dtype == torch.bfloat16 and x.numel() <= GEMV_MAX_ROWS * x.shape[-1]
        if weights[0] is None or weights[1] is None or not few or down.tp_size > 1:
            return None
        rows = x.reshape(-1, x.shape[-1])
        one_expert = torch.zeros(rows.shape[0], dtype=torch.long)
        out = torch.ops.herd_cpu.swiglu_experts_bf16(rows, one_expert, weights[0][None], weights[1][None])
        return out.view(*x.shape[:-1], out.shape[-1])

    def decode_weights(self, layer: LinearBase) -> DecodeWeights | None:
        weight = kernel_weight(layer)
        return None if weight is None else (DecodeKernel.BF16, [weight])

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if "weight" in layer._parameters:
            out = bf16_linear(x, layer.weight)
        elif hasattr(layer, "row_weight") and x.numel() <= GEMV_MAX_ROWS * x.shape[-1]:
            out = torch.ops.herd_cpu.gemv_bf16(x, layer.row_weight)
        else:  # packed
            return super().apply(layer, x, bias)
        return out if bias is None else out + bias


def kernel_weight(layer: LinearBase) -> torch.Tensor | None:
    """The bf16 [out, in] weight the kernel reads for a few rows of this layer, if it takes them; no bias."""
    if not isinstance(layer.method, CPUGemvLinearMethod) or layer.bias is not None:
        return None
    weight = layer._parameters.get("weight")
    if weight is None:
        return getattr(layer, "row_weight", None)
    return weight if weight.dtype == torch.bfloat16 else None


class CPUGemvFusedMoEMethod(CPUPackedFusedMoEMethod):
    """Each expert's projections as linear weights: gate_up [E, 2I, H], down [E, H, I]. Experts small enough
    for the packed method's all-experts matmul (the demo model's, tiny's) keep that method for more than
    GEMV_MAX_ROWS rows and take the kernel, expert by expert, for fewer: there a step's cost is calls, and
    oneDNN's packed call costs ~70 us whatever the size where the kernel reads a small expert in a few (tiny's
    batch-1 step 2.4 -> 2.1 ms), and a verify step reads the copy that one-row steps keep in cache."""

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        weights = (layer.gate_up_proj, layer.down_proj)
        small = sum(w.numel() * w.element_size() for w in weights) <= SMALL_EXPERTS_BYTES
        if layer.gate_up_proj.dtype != torch.bfloat16:
            super().process_weights_after_loading(layer)
            return
        transposed = {}
        for name in ("gate_up_proj", "down_proj"):
            # One layer's experts at a time: a large expert's transposed copy replaces the loaded one before the
            # next is made.
            transposed[name] = getattr(layer, name).detach().transpose(1, 2).contiguous()
            if not small:
                delattr(layer, name)
        if small:
            super().process_weights_after_loading(layer)
        for name, weight in transposed.items():
            layer.register_buffer(f"{name}_t", weight, persistent=False)

    def apply(self, layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        # Small experts also hold the packed method's weights (`packed_gate_up`): they take it for more rows.
        if not hasattr(layer, "gate_up_proj_t") or (hasattr(layer, "packed_gate_up") and x.shape[0] > GEMV_MAX_ROWS):
            return super().apply(layer, x, expert_ids)
        if x.shape[0] <= GEMV_MAX_ROWS and x.dtype == torch.bfloat16:  # the grouping and each expert in one op
            return torch.ops.herd_cpu.swiglu_experts_bf16(x, expert_ids, layer.gate_up_proj_t, layer.down_proj_t)

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            gate, up = bf16_linear(rows, layer.gate_up_proj_t[e]).chunk(2, dim=-1)
            return bf16_linear(F.silu(gate) * up, layer.down_proj_t[e])

        return grouped_experts(x, expert_ids, expert)

    def decode_weights(self, layer: FusedMoE) -> tuple[DecodeWeights, DecodeWeights] | None:
        if not hasattr(layer, "gate_up_proj_t"):
            return None
        return (DecodeKernel.BF16, [layer.gate_up_proj_t]), (DecodeKernel.BF16, [layer.down_proj_t])
