"""The attention backend contract and its registry.

A backend works in two phases per step. `build_metadata(batch)` runs once, on the host, and turns the
step's `AttentionBatch` into whatever tensors its kernels want (kept in the returned object).
`forward(q, k, v, layer, metadata)` runs per layer: it writes the layer's new K/V into the paged cache
(`layer.kv_cache`) and attends each query to its context, causal within each sequence; for a chunked layer
a query at position p sees only positions [(p // chunk) * chunk, p]. A sequence with a draft tree
(`AttentionBatch.trees`) is masked as `batch.span_mask` says instead: each draft sees the context and its
ancestors, at the position of its depth. `forward` may not read tensors back to the host or loop over
sequences in Python on data it has not already built into the metadata: that keeps a decode step capturable
(CUDA graphs) and compilable (torch.compile with fullgraph=True). A backend that captures graphs builds its
metadata into persistent buffers it owns, so a replay sees the new step's values.

`torch_native` is the reference: every other backend is tested against it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from herd.layers.attention.batch import AttentionBatch

if TYPE_CHECKING:
    from herd.layers.attention.layer import PagedAttention


class AttentionBackend(ABC):
    name: ClassVar[str]

    @abstractmethod
    def build_metadata(self, batch: AttentionBatch) -> Any:
        """Once per step: everything `forward` needs, as tensors on the batch's device."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, n_heads, head_dim], already rotated / scaled
        k: torch.Tensor,  # [T, n_kv_heads, head_dim]
        v: torch.Tensor,  # [T, n_kv_heads, head_dim]
        layer: PagedAttention,  # its kv_cache, chunk_size (None: global attention) and scale
        metadata: Any,  # what build_metadata returned for this step
    ) -> torch.Tensor:  # [T, n_heads, head_dim]
        ...

    def opaque_decode(self, layer: PagedAttention, args: list[torch.Tensor]) -> torch.Tensor:
        """The eager half of a compiled decode step's attention, for backends whose `forward` hands it to
        `herd.layers.opaque` (the CPU's: writing the paged cache inside a compiled graph copies the pool)."""
        raise NotImplementedError(f"attention backend {self.name} runs inside compiled graphs as it is")

    def kernel_decode_args(self, metadata: Any, chunked: bool) -> tuple[torch.Tensor, ...] | None:
        """Where every query of this step attends through herd's CPU decode kernel, the arguments a fused CPU
        decoder layer needs for one pool (slots, table, offsets, lengths); None elsewhere."""
        return None


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _BACKENDS[cls.name] = cls
    return cls


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()


def available_backends() -> list[str]:
    return sorted(_BACKENDS)
