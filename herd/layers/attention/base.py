"""The attention backend contract and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from herd.layers.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Writes a layer's new K/V into the paged cache, then attends each query to its context.

    Causal within each sequence; for chunked layers a query at position p sees only
    positions [(p // chunk) * chunk, p].
    """

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, n_heads, head_dim], already rotated / scaled
        k: torch.Tensor,  # [T, n_kv_heads, head_dim]
        v: torch.Tensor,  # [T, n_kv_heads, head_dim]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [num_blocks, block_size, n_kv_heads, head_dim]
        meta: AttentionMetadata,
        chunk_size: int | None,  # None: global (full causal) attention
        scale: float,
    ) -> torch.Tensor:  # [T, n_heads, head_dim]
        ...


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str) -> Callable[[type[AttentionBackend]], type[AttentionBackend]]:
    def wrap(cls: type[AttentionBackend]) -> type[AttentionBackend]:
        _BACKENDS[name] = cls
        return cls

    return wrap


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()


def available_backends() -> list[str]:
    return sorted(_BACKENDS)
