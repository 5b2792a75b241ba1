"""Attention over the paged KV cache, behind a small backend registry."""

from herd.layers.attention import torch_sdpa  # noqa: F401  (registers "torch_native")
from herd.layers.attention.base import AttentionBackend, available_backends, get_attention_backend
from herd.layers.attention.kv_storage import PagedKVStorage
from herd.layers.attention.metadata import AttentionMetadata, PoolView

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "PagedKVStorage",
    "PoolView",
    "available_backends",
    "get_attention_backend",
]
