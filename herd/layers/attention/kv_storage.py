"""The KV tensors of the paged cache: one pool for global layers, one for chunked layers.

Which block belongs to whom is not decided here (that is the engine's block manager); this
only owns the memory and says which pool tensor backs each layer.
"""

from __future__ import annotations

import torch

from herd.config import ModelConfig


class PagedKVStorage:
    def __init__(
        self,
        config: ModelConfig,
        *,
        num_full_blocks: int,
        num_local_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        tp_size: int = 1,
    ) -> None:
        self.block_size = block_size
        shape = (block_size, kv_heads_per_rank(config.num_kv_heads, tp_size), config.head_dim)
        n_local = sum(spec.chunked for spec in config.layers)
        n_full = config.num_layers - n_local
        # [layers of the kind, 2 (K, V), blocks, block_size, kv_heads, head_dim]
        self.full = torch.empty((n_full, 2, num_full_blocks, *shape), dtype=dtype, device=device)
        self.local = torch.empty((n_local, 2, num_local_blocks, *shape), dtype=dtype, device=device)
        self._where: list[tuple[torch.Tensor, int]] = []
        counts = {True: 0, False: 0}
        for spec in config.layers:
            self._where.append((self.local if spec.chunked else self.full, counts[spec.chunked]))
            counts[spec.chunked] += 1

    def zero_blocks(self, full: list[int], local: list[int]) -> None:
        """Clear blocks used for the first time: attention may read (masked) slots nobody wrote yet,
        and uninitialised memory can hold NaN, which a mask does not neutralise."""
        for pool, blocks in ((self.full, full), (self.local, local)):
            if not blocks:
                continue
            if pool.device.type != "cpu":
                pool[:, :, blocks] = 0
                continue
            # On the CPU, a block at a time (a run of consecutive ones at once): ATen's index_put runs an OpenMP
            # region even for one small block, and OpenMP's idle threads then spin for a while on the cores a decode
            # step's kernels run on (tiny's batch-1 decode: 5-12% slower; benchmarks/RESULTS.md).
            for start, end in _runs(sorted(blocks)):
                pool[:, :, start:end].zero_()

    def move_slots(self, full: tuple[list[int], list[int]], local: tuple[list[int], list[int]]) -> None:
        """Copy every layer's K/V from slots src to slots dst ((src, dst) per pool; slot = block * block_size +
        offset): an accepted draft-tree path's entries into the consecutive positions they now stand for."""
        for pool, (src, dst) in ((self.full, full), (self.local, local)):
            if src:
                flat = pool.view(pool.shape[0], 2, -1, *pool.shape[4:])
                index = torch.tensor(src, dtype=torch.long, device=pool.device)
                flat[:, :, torch.tensor(dst, dtype=torch.long, device=pool.device)] = flat[:, :, index]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V cache of layer `index`: each [num_blocks, block_size, kv_heads, head_dim]."""
        pool, i = self._where[index]
        return pool[i, 0], pool[i, 1]

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype, chunked: bool, tp_size: int = 1) -> int:
        """KV bytes one token costs one rank across all layers of one kind."""
        layers = sum(spec.chunked == chunked for spec in config.layers)
        heads = kv_heads_per_rank(config.num_kv_heads, tp_size)
        return layers * 2 * heads * config.head_dim * torch.finfo(dtype).bits // 8


def _runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Sorted block ids as [start, end) ranges of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for b in blocks:
        if runs and runs[-1][1] == b:
            runs[-1] = (runs[-1][0], b + 1)
        else:
            runs.append((b, b + 1))
    return runs


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """Each rank's KV heads: its 1/tp of them, or one (replicated) when there are more ranks than KV heads."""
    return max(1, num_kv_heads // tp_size)
