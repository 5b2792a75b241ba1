"""Attention over the paged KV cache, behind a small backend registry."""

from herd.layers.attention import torch_native, triton_backend  # noqa: F401  (register the backends)
from herd.layers.attention.base import AttentionBackend, available_backends, get_attention_backend
from herd.layers.attention.batch import AttentionBatch, DraftTree, PoolTables
from herd.layers.attention.kv_storage import PagedKVStorage
from herd.layers.attention.layer import PagedAttention, bind_kv_cache

__all__ = [
    "AttentionBackend",
    "AttentionBatch",
    "DraftTree",
    "PagedAttention",
    "PagedKVStorage",
    "PoolTables",
    "available_backends",
    "bind_kv_cache",
    "get_attention_backend",
]
