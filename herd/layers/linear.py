"""Linear layers that know their tensor-parallel slice and their fused parts.

A layer's output may be several checkpoint tensors side by side (q, k and v; gate and up), each loaded
through `weight_loader(param, loaded, shard_id)` into its rows. Under tensor parallelism (`tp_size` ranks)
a column-parallel layer keeps its rank's rows of every part, a row-parallel one its rank's input columns
and sums the ranks' outputs (an all-reduce over `tp_group`). With `tp_size == 1` every slice is the whole.
How the weight is stored and multiplied is the layer's method (`herd.layers.quantization`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from herd.layers.parameters import check_shape, new_parameter
from herd.layers.quantization.base import LinearMethodBase


class LinearBase(nn.Module):
    """y = x W^T (+ b), W made of `output_sizes` parts (named by `shard_ids` when there are several)."""

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        *,
        method: LinearMethodBase,
        bias: bool = False,
        shard_ids: Sequence[Any] | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        if shard_ids is not None and len(shard_ids) != len(output_sizes):
            raise ValueError(f"{len(output_sizes)} output parts need as many shard ids, got {list(shard_ids)}")
        self.input_size, self.output_sizes = input_size, list(output_sizes)
        self.shard_ids = list(shard_ids) if shard_ids is not None else None
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.output_sizes_per_rank = [self._rows(i)[1] for i in range(len(self.output_sizes))]
        self.output_size_per_rank = sum(self.output_sizes_per_rank)
        cols = self._cols()
        self.input_size_per_rank = cols[1] if cols is not None else input_size
        self.method = method
        method.create_weights(self)
        self.bias = new_parameter((self.output_size_per_rank,), self.weight_loader) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)

    def _rows(self, part: int) -> tuple[int, int]:
        """(first row, number of rows) of output part `part` of the checkpoint that this rank keeps."""
        return 0, self.output_sizes[part]

    def _cols(self) -> tuple[int, int] | None:
        """(first column, number of columns) of the input that this rank keeps; None for all of them."""
        return None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        """Copy a checkpoint tensor (one part named by shard_id, or all parts stacked) into this rank's rows."""
        if shard_id is None:
            check_shape(loaded, [sum(self.output_sizes), *self._input_dims(param)])
            parts = list(enumerate(loaded.split(self.output_sizes, dim=0)))
        else:
            if self.shard_ids is None or shard_id not in self.shard_ids:
                raise KeyError(f"no output part {shard_id!r}; parts: {self.shard_ids}")
            part = self.shard_ids.index(shard_id)
            check_shape(loaded, [self.output_sizes[part], *self._input_dims(param)])
            parts = [(part, loaded)]
        cols = self._cols()
        pack = input_pack(param)
        for part, tensor in parts:
            first, count = self._rows(part)
            tensor = tensor.narrow(0, first, count)
            if cols is not None and param.dim() == 2 and pack is not None:
                tensor = tensor.narrow(1, cols[0] // pack, cols[1] // pack)
            offset = sum(self.output_sizes_per_rank[:part])
            param.data.narrow(0, offset, count).copy_(tensor)

    def _input_dims(self, param: nn.Parameter) -> list[int]:
        if param.dim() != 2:
            return []
        pack = input_pack(param)
        return [1] if pack is None else [self.input_size // pack]


def input_pack(param: nn.Parameter) -> int | None:
    """Input elements per stored column of a [rows, cols] parameter: 1 for a plain weight, 8 for INT4 packed
    in int32 words, the group size for group scales; None for one column that covers every input (a
    per-output-channel scale [out, 1]), which a row-parallel rank keeps whole."""
    return getattr(param, "input_pack", 1)


class ReplicatedLinear(LinearBase):
    """The same whole weight on every rank (the router, the vision tower)."""


class ColumnParallelLinear(LinearBase):
    """Each rank keeps 1/tp of the rows of every output part (and computes those outputs only)."""

    def _rows(self, part: int) -> tuple[int, int]:
        size = self.output_sizes[part]
        if size % self.tp_size:
            raise ValueError(f"an output of {size} rows does not split across {self.tp_size} ranks")
        per_rank = size // self.tp_size
        return self.tp_rank * per_rank, per_rank


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v side by side (shard ids "q", "k", "v"). Ranks split the heads; when there are more ranks
    than KV heads, each KV head is kept whole by `tp_size // num_kv_heads` ranks."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, *, bias: bool, **kwargs: Any
    ) -> None:
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, bias=bias, shard_ids=("q", "k", "v"), **kwargs)

    def _rows(self, part: int) -> tuple[int, int]:
        if part == 0 or self.num_kv_heads >= self.tp_size:
            return super()._rows(part)
        replicas = self.tp_size // self.num_kv_heads
        return (self.tp_rank // replicas) * self.head_dim, self.head_dim


class RowParallelLinear(LinearBase):
    """Each rank keeps 1/tp of the input columns; the ranks' partial outputs are summed (all-reduce)."""

    def __init__(self, input_size: int, output_size: int, *, tp_group: Any = None, **kwargs: Any) -> None:
        self.tp_group = tp_group
        super().__init__(input_size, [output_size], **kwargs)

    def _cols(self) -> tuple[int, int] | None:
        if self.input_size % self.tp_size:
            raise ValueError(f"an input of {self.input_size} columns does not split across {self.tp_size} ranks")
        per_rank = self.input_size // self.tp_size
        return self.tp_rank * per_rank, per_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.method.apply(self, x, self.bias)
        out = self.method.apply(self, x, None)
        dist.all_reduce(out, group=self.tp_group)
        return out if self.bias is None else out + self.bias
