"""The method seam: how a linear layer or a block of experts stores its weights and computes with them.

A layer owns its shapes and how checkpoint tensors map onto them (its `weight_loader`s); its method owns
the storage and the kernel. A new weight format (FP8, INT4, GGUF, a CPU-packed layout) is a new method and
a new `QuantizationConfig`, never a branch in the model: the `LayerFactory` asks the config for the method
of each layer it builds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from enum import IntEnum
from typing import TYPE_CHECKING, ClassVar

import torch

from herd.layers.parameters import new_parameter

if TYPE_CHECKING:
    from herd.layers.linear import LinearBase
    from herd.layers.moe import FusedMoE


class DecodeKernel(IntEnum):
    """The kernels through which herd's fused CPU decode layer (herd/kernels/cpu/decode_layer.cpp, the same codes)
    computes a layer for a few bf16 rows, and the tensors each reads, in this order."""

    BF16 = 0  # weight [out, in] bf16: herd_cpu::gemv_bf16
    INT4 = 1  # uint8 [out, in / 2] (herd's INT4 layout), fp32 scales [out, groups]: herd_cpu::w4a16_linear
    W8A8 = 2  # VNNI-packed int8, fp32 scales [out], int32 row sums [out]: herd_cpu::w8a8_int8_linear
    W8A16 = 3  # int8 [out, in], scales [out]: herd_cpu::gemv_int8


DecodeWeights = tuple[DecodeKernel, list[torch.Tensor]]


class LinearMethodBase(ABC):
    @abstractmethod
    def create_weights(self, layer: LinearBase) -> None:
        """Register the layer's weight parameters for this rank (`layer.input_size_per_rank`,
        `layer.output_size_per_rank`), each with a `weight_loader` (usually `layer.weight_loader`)."""

    @abstractmethod
    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] -> [..., out] for this rank's part of the layer."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:  # noqa: B027  (optional hook)
        """Repack loaded weights for the kernel (called once, after every tensor is loaded)."""

    def swiglu(self, gate_up: LinearBase, down: LinearBase, x: torch.Tensor) -> torch.Tensor | None:
        """down(silu(gate) * up) of an MLP whose gate_up layer has this method, in one call where the method has
        one for these rows; None: the caller runs the two layers."""
        return None

    def decode_weights(self, layer: LinearBase) -> DecodeWeights | None:
        """The kernel and tensors with which the fused CPU decode layer computes this layer for a few bf16 rows
        exactly as apply() does; None where it cannot (the layer then keeps its modules)."""
        return None


class FusedMoEMethodBase(ABC):
    @abstractmethod
    def create_weights(self, layer: FusedMoE) -> None:
        """Register the experts' parameters for this rank, each with a `weight_loader`."""

    @abstractmethod
    def apply(self, layer: FusedMoE, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Rows x [N, H] (already scaled by their router scores) through expert expert_ids[i] each: [N, H].

        Only the chosen expert of each row runs; no result may depend on reading expert_ids on the host
        when x lives on a GPU (the step must stay capturable).
        """

    def process_weights_after_loading(self, layer: FusedMoE) -> None:  # noqa: B027  (optional hook)
        """Repack loaded weights for the kernel (called once, after every tensor is loaded)."""

    def decode_weights(self, layer: FusedMoE) -> tuple[DecodeWeights, DecodeWeights] | None:
        """As `LinearMethodBase.decode_weights`, for the experts' gate_up and down projections, each tensor with
        a leading expert dimension; apply() must run each expert as down(silu(gate) * up) on the rows that chose
        it, rows independent of each other."""
        return None


class QuantizationConfig(ABC):
    """Picks the method of each layer, by the layer's checkpoint name (`prefix`), for one weight format."""

    name: ClassVar[str]

    @abstractmethod
    def linear_method(self, prefix: str) -> LinearMethodBase: ...

    @abstractmethod
    def moe_method(self, prefix: str) -> FusedMoEMethodBase: ...


def create_per_channel_expert_weights(layer: FusedMoE, dtype: torch.dtype) -> None:
    """Parameters for experts stored one by one with a scale per output channel (`experts.<e>.{gate,up,down}_proj.
    weight` + `.weight_scale [out, 1]`, as llm-compressor writes them): gate_up_proj [E, 2I, H], down_proj [E, H, I]
    in `dtype` and an fp32 `<name>_scale [E, rows, 1]` beside each."""
    experts, hidden, inter = layer.num_local_experts, layer.hidden_size, layer.intermediate_size_per_rank
    for name, (rows, cols) in (("gate_up_proj", (2 * inter, hidden)), ("down_proj", (hidden, inter))):
        setattr(layer, name, new_parameter((experts, rows, cols), layer.load_expert_linear, dtype=dtype))
        scale = new_parameter((experts, rows, 1), layer.load_expert_linear, dtype=torch.float32)
        scale.input_pack = None  # type: ignore[attr-defined]
        setattr(layer, f"{name}_scale", scale)
