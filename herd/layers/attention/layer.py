"""One attention layer's place in the paged KV cache: which pool, which chunk window, which scale."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from herd.layers import opaque
from herd.layers.attention.base import AttentionBackend


class PagedAttention(nn.Module):
    """Attention of new queries to their cached context; the model computes q, k, v and o around it.

    `kv_cache` (K and V, each [num_blocks, block_size, n_kv_heads, head_dim]) is bound by the worker once
    the cache is allocated (`bind_kv_cache`); it stays the same tensors for the engine's life.
    """

    def __init__(
        self, layer_index: int, head_dim: int, scale: float, chunk_size: int | None, backend: AttentionBackend
    ) -> None:
        super().__init__()
        self.layer_index, self.head_dim, self.scale, self.chunk_size = layer_index, head_dim, scale, chunk_size
        self.backend = backend
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        # The backend's eager decode for compiled steps (herd.layers.opaque); its output is shaped like q.
        self.opaque_handle = opaque.register(self, _opaque_decode, lambda _, args: torch.empty_like(args[0]))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata: Any) -> torch.Tensor:
        return self.backend.forward(q, k, v, self, metadata)


def _opaque_decode(layer: PagedAttention, args: list[torch.Tensor]) -> torch.Tensor:
    return layer.backend.opaque_decode(layer, args)


def bind_kv_cache(model: nn.Module, layer_cache: Any) -> None:
    """Point every attention layer of `model` at its K/V tensors: `layer_cache(layer_index) -> (K, V)`."""
    for module in model.modules():
        if isinstance(module, PagedAttention):
            module.kv_cache = layer_cache(module.layer_index)
