"""Weights as the checkpoint stores them (bf16 / fp16 / fp32): plain matmuls, and the CPU's prepacked form.

oneDNN runs a matmul against a weight already in its blocked layout without reordering it on every call;
for the small-batch GEMVs of decoding on a CPU that is up to ~1.7x faster per call (benchmarks/RESULTS.md).
The packed methods load exactly like the plain ones, then repack in `process_weights_after_loading`.
torch.compile does not lower oneDNN's packed ops: with --enable-torch-compile linear layers stay unpacked
and experts, packed, run eagerly inside the compiled step as one opaque op each (herd.layers.opaque).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from herd.layers.moe import grouped_experts, routed_swiglu
from herd.layers.parameters import new_parameter
from herd.layers.quantization.base import FusedMoEMethodBase, LinearMethodBase, QuantizationConfig

if TYPE_CHECKING:
    from herd.layers.linear import LinearBase
    from herd.layers.moe import FusedMoE

logger = logging.getLogger(__name__)

# Layers left unpacked on the CPU: the vision tower runs large batches, where oneDNN's default layout suits.
UNPACKED_PREFIXES = ("vision_model.", "multi_modal_projector.")


class UnquantizedLinearMethod(LinearMethodBase):
    def create_weights(self, layer: LinearBase) -> None:
        layer.weight = new_parameter((layer.output_size_per_rank, layer.input_size_per_rank), layer.weight_loader)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)


class UnquantizedFusedMoEMethod(FusedMoEMethodBase):
    def create_weights(self, layer: FusedMoE) -> None:
        experts, hidden, inter = layer.num_local_experts, layer.hidden_size, layer.intermediate_size_per_rank
        layer.gate_up_proj = new_parameter((experts, hidden, 2 * inter), layer.load_gate_up)
        layer.down_proj = new_parameter((experts, inter, hidden), layer.load_down)

    def apply(self, layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        return routed_swiglu(x, expert_ids, layer.gate_up_proj, layer.down_proj)


class TritonFusedMoEMethod(UnquantizedFusedMoEMethod):
    """The GPU's experts: one fused Triton MoE (on-device grouping, two grouped GEMMs, SiLU * up fused)."""

    def apply(self, layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        from herd.layers.triton_ops.fused_moe import fused_moe_swiglu  # triton only where this method is chosen

        return fused_moe_swiglu(x, expert_ids, layer.gate_up_proj, layer.down_proj)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] linear weight in oneDNN's layout (tuned for small batches: decoding)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def cpu_packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN packs `dtype` weights on this CPU."""
    return (
        device.type == "cpu"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and _packs(dtype)
    )


@functools.cache
def _packs(dtype: torch.dtype) -> bool:
    # oneDNN's bf16 packing needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which many CPUs lack (AMD before Zen 4,
    # most laptops): there it raises, and the plain matmul serves instead.
    try:
        packed_linear(torch.ones(1, 16, dtype=dtype), pack(torch.ones(16, 16, dtype=dtype)))
    except RuntimeError as e:
        logger.info("this CPU's oneDNN does not pack %s weights (%s); using plain matmuls", dtype, str(e).strip())
        return False
    return True


class CPUPackedLinearMethod(UnquantizedLinearMethod):
    def process_weights_after_loading(self, layer: LinearBase) -> None:
        packed = pack(layer.weight)
        del layer.weight  # the packed copy replaces it (a tied embedding keeps its own reference)
        layer.register_buffer("packed_weight", packed, persistent=False)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return packed_linear(x, layer.packed_weight, bias)


# Experts this small (all of a layer's, in bytes) cost per call, not per byte read: for a few rows one matmul over
# every expert beats one per expert chosen. The demo model's 4 bf16 experts of 256 x 384, 4 rows on 3 experts:
# 0.45 -> 0.23 ms per layer (one row on one expert: 0.11 ms). Large experts (Llama 4's) stay one matmul per
# chosen expert, and so do fp32 ones (oneDNN's packed fp32 matmul over all of them was slower than per expert).
SMALL_EXPERTS_BYTES = 16 * 2**20
FEW_ROWS = 16  # rows up to which the all-experts form runs (decode of a few sequences, speculative verify)


class CPUPackedFusedMoEMethod(UnquantizedFusedMoEMethod):
    """Each expert's two projections packed as linear weights; small experts also all in one pair of matmuls."""

    def process_weights_after_loading(self, layer: FusedMoE) -> None:
        gate_up, down = layer.gate_up_proj.detach(), layer.down_proj.detach()
        del layer.gate_up_proj, layer.down_proj
        layer.packed_gate_up = [pack(gate_up[e].t()) for e in range(layer.num_local_experts)]  # each [2I, H]
        layer.packed_down = [pack(down[e].t()) for e in range(layer.num_local_experts)]  # each [H, I]
        for e in range(layer.num_local_experts):  # buffers too, so that the module's memory counts them
            layer.register_buffer(f"packed_gate_up_{e}", layer.packed_gate_up[e], persistent=False)
            layer.register_buffer(f"packed_down_{e}", layer.packed_down[e], persistent=False)
        experts, hidden, inter = down.shape[0], down.shape[2], down.shape[1]
        size = (gate_up.numel() + down.numel()) * gate_up.element_size()
        if experts > 1 and gate_up.element_size() == 2 and size <= SMALL_EXPERTS_BYTES:
            # [E * 2I, H]: expert e's gate/up rows are block e; [H, E * I]: expert e's inputs are column block e.
            all_gate_up = pack(gate_up.transpose(1, 2).reshape(experts * 2 * inter, hidden))
            layer.register_buffer("packed_gate_up_all", all_gate_up, persistent=False)
            layer.register_buffer("packed_down_all", pack(down.reshape(experts * inter, hidden).t()), persistent=False)
            layer.register_buffer("expert_index", torch.arange(experts), persistent=False)

    def apply(self, layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        # Rows that all chose one expert (1 in 10 of the demo's 4-token verify steps) take that expert alone.
        if 1 < x.shape[0] <= FEW_ROWS and hasattr(layer, "packed_down_all") and len(set(expert_ids.tolist())) > 1:
            return _all_experts(layer, x, expert_ids)

        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            gate, up = packed_linear(rows, layer.packed_gate_up[e]).chunk(2, dim=-1)
            return packed_linear(F.silu(gate) * up, layer.packed_down[e])

        return grouped_experts(x, expert_ids, expert)


def _all_experts(layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Every row through every expert's gate/up, the other experts' activations zeroed, one down matmul over all:
    each row gets exactly its own expert's output (the zeroed blocks add nothing)."""
    n, inter = x.shape[0], layer.intermediate_size_per_rank
    gate_up = packed_linear(x, layer.packed_gate_up_all).view(n, -1, 2, inter)  # [n, E, 2, I]
    act = F.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]  # [n, E, I]
    act = act.masked_fill((expert_ids[:, None] != layer.expert_index)[..., None], 0.0)
    return packed_linear(act.view(n, -1), layer.packed_down_all)


class UnquantizedConfig(QuantizationConfig):
    name = "unquantized"

    def __init__(self, cpu_packed: bool = False, triton_moe: bool = False, compiled: bool = False) -> None:
        # compiled: the CPU decode step is compiled; linear layers then stay unpacked (herd's kernel or
        # PyTorch's matmul in the graph) while experts keep their packed eager methods (herd.layers.opaque).
        self.cpu_packed, self.triton_moe, self.compiled = cpu_packed, triton_moe, compiled

    def _packed(self, prefix: str) -> bool:
        return self.cpu_packed and not prefix.startswith(UNPACKED_PREFIXES)

    def linear_method(self, prefix: str) -> LinearMethodBase:
        if not self._packed(prefix):
            return UnquantizedLinearMethod()
        from herd.layers.quantization import cpu_gemv  # builds herd's CPU kernels on first use

        if self.compiled:
            return cpu_gemv.CPUGemvLinearMethod(compiled=True) if cpu_gemv.gemv_enabled() else UnquantizedLinearMethod()
        return cpu_gemv.CPUGemvLinearMethod() if cpu_gemv.gemv_enabled() else CPUPackedLinearMethod()

    def moe_method(self, prefix: str) -> FusedMoEMethodBase:
        if self.triton_moe:
            return TritonFusedMoEMethod()
        if not self._packed(prefix):
            return UnquantizedFusedMoEMethod()
        from herd.layers.quantization import cpu_gemv

        return cpu_gemv.CPUGemvFusedMoEMethod() if cpu_gemv.gemv_enabled() else CPUPackedFusedMoEMethod()
