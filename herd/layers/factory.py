"""The one place linear layers and expert blocks are made.

Models ask the factory for a layer of a kind (replicated, column- or row-parallel, fused q/k/v, experts)
under its checkpoint name; the factory adds this rank's tensor-parallel slice and the method the weight
format wants for that name. A model file therefore never mentions ranks or formats.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from herd.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from herd.layers.moe import FusedMoE
from herd.layers.quantization import QuantizationConfig
from herd.layers.quantization.unquantized import UnquantizedConfig


@dataclass(frozen=True)
class LayerFactory:
    quant_config: QuantizationConfig = field(default_factory=UnquantizedConfig)
    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None  # the torch.distributed group of the tensor-parallel ranks (None: the default group)
    ep_size: int = 1  # expert parallelism inside the tensor-parallel ranks: whole experts on tp/ep ranks each

    # Linear options: bias (default False) and shard_ids, the names of the output parts that the checkpoint
    # stores as separate tensors ("q", "k", "v"; 0 and 1 for gate and up).

    def replicated(self, prefix: str, input_size: int, output_sizes: Sequence[int], **options: Any) -> ReplicatedLinear:
        return ReplicatedLinear(input_size, output_sizes, method=self.quant_config.linear_method(prefix), **options)

    def column(self, prefix: str, input_size: int, output_sizes: Sequence[int], **options: Any) -> ColumnParallelLinear:
        return ColumnParallelLinear(input_size, output_sizes, **self._linear_args(prefix), **options)

    def qkv(
        self, prefix: str, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, *, bias: bool = False
    ) -> QKVParallelLinear:
        return QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, bias=bias, **self._linear_args(prefix))

    def row(self, prefix: str, input_size: int, output_size: int, *, bias: bool = False) -> RowParallelLinear:
        return RowParallelLinear(
            input_size, output_size, bias=bias, tp_group=self.tp_group, **self._linear_args(prefix)
        )

    def experts(self, prefix: str, num_experts: int, hidden_size: int, intermediate_size: int) -> FusedMoE:
        method = self.quant_config.moe_method(prefix)
        if self.tp_size % self.ep_size:
            raise ValueError(f"--ep-size {self.ep_size} must divide --tp-size {self.tp_size}")
        moe_tp = self.tp_size // self.ep_size  # ranks that share each expert (its intermediate dimension split)
        return FusedMoE(
            num_experts,
            hidden_size,
            intermediate_size,
            method=method,
            tp_rank=self.tp_rank % moe_tp,
            tp_size=moe_tp,
            ep_rank=self.tp_rank // moe_tp,
            ep_size=self.ep_size,
        )

    def _linear_args(self, prefix: str) -> dict[str, Any]:
        return {"method": self.quant_config.linear_method(prefix), "tp_rank": self.tp_rank, "tp_size": self.tp_size}
