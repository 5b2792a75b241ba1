"""The `triton` attention backend: paged decode and extend kernels reading the KV pools in place.

`build_metadata` turns the step's lists into a few int32 tensors (query offsets, context lengths, one
block table per pool) with one host-to-device copy each; `forward` scatters the new K/V into their slots
and launches one kernel (or two, split-K decode and its merge) per layer. A pure decode step uses the
split-K kernel; any step with a prefill uses the extend kernel for every sequence, decoding ones included.

Speculative draft trees (`AttentionBatch.trees`) need a mask the kernels do not take yet: their sequences run
through the kernels like any other (their rows come out wrong), then are recomputed with torch_native's
gather + SDPA over the mask `span_mask` builds, which is exact. Such steps are never graphed (EAGLE-3 steps keep
the auxiliary hidden states, so they run eagerly anyway).

On CPU tensors the kernels run only under Triton's interpreter (`TRITON_INTERPRET=1`, set before herd
imports the kernels): that is how the CPU tests check them against `torch_native`.
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass, field

import torch

from herd.layers.attention.base import AttentionBackend, register_backend
from herd.layers.attention.batch import AttentionBatch, PoolTables
from herd.layers.attention.layer import PagedAttention
from herd.layers.attention.torch_native import PrefillSpan, attend_span, prefill_span


@dataclass
class TritonPoolMetadata:
    slot_mapping: torch.Tensor  # [T] int64
    block_table: torch.Tensor  # [B, W] int32, released (-1) entries as 0: no query reads them


@dataclass
class TritonMetadata:
    full: TritonPoolMetadata
    local: TritonPoolMetadata | None
    query_start_loc: torch.Tensor  # [B + 1] int32
    context_lens: torch.Tensor  # [B] int32
    max_query_len: int
    is_decode: bool
    num_splits: int  # of a decode step's keys (split-K)
    chunk: int  # the chunked layers' window (NO_CHUNK when the model has none)
    tree_spans: list[PrefillSpan] = field(default_factory=list)  # full pool: the draft-tree sequences' rows
    local_tree_spans: list[PrefillSpan] = field(default_factory=list)  # the same in the local pool


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@register_backend
class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self) -> None:
        if not triton_available():
            raise ValueError("attention backend 'triton' needs the triton package (pip install triton)")
        from herd.layers.attention import triton_kernels  # deferred: TRITON_INTERPRET is read at import

        self.kernels = triton_kernels
        # Split-K: one split per this many visible keys, at most max_splits (the decode kernel's grid is
        # batch x kv_heads x splits, so a few long sequences still fill the GPU).
        self.split_tokens = 256
        self.max_splits = 16

    def build_metadata(self, batch: AttentionBatch) -> TritonMetadata:
        device = batch.device
        if device.type == "cpu" and not self.kernels.triton.knobs.runtime.interpret:
            raise ValueError("attention backend 'triton' on the CPU runs only under TRITON_INTERPRET=1")
        chunk = batch.chunk_size or self.kernels.NO_CHUNK
        starts = batch.query_start_loc
        local = None if batch.chunk_size is None else _pool(batch.local, device)
        trees = [i for i in range(batch.num_seqs) if batch.tree(i) is not None]
        return TritonMetadata(
            tree_spans=[prefill_span(batch, batch.full.block_tables[i], i, None) for i in trees],
            local_tree_spans=[]
            if batch.chunk_size is None
            else [prefill_span(batch, batch.local.block_tables[i], i, batch.chunk_size) for i in trees],
            full=_pool(batch.full, device),
            local=local,
            query_start_loc=torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True),
            context_lens=torch.tensor(batch.context_lens, dtype=torch.int32).to(device, non_blocking=True),
            max_query_len=max(b - a for a, b in itertools.pairwise(starts)),
            is_decode=batch.is_decode,
            num_splits=self.splits_for(max(batch.context_lens)),
            chunk=chunk,
        )

    def splits_for(self, max_keys: int) -> int:
        return max(1, min(self.max_splits, -(-max_keys // self.split_tokens)))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: PagedAttention, metadata: TritonMetadata
    ) -> torch.Tensor:
        assert layer.kv_cache is not None, "the KV cache is not bound to the model (bind_kv_cache)"
        k_cache, v_cache = layer.kv_cache
        chunked = layer.chunk_size is not None
        pool = metadata.local if chunked else metadata.full
        assert pool is not None
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, pool.slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, pool.slot_mapping, v)
        chunk = metadata.chunk if chunked else self.kernels.NO_CHUNK
        if metadata.is_decode:
            return self.kernels.decode_attention(
                q, k_cache, v_cache, pool.block_table, metadata.context_lens, layer.scale, chunk, metadata.num_splits
            )
        out = self.kernels.extend_attention(
            q,
            k_cache,
            v_cache,
            pool.block_table,
            metadata.query_start_loc,
            metadata.context_lens,
            metadata.max_query_len,
            layer.scale,
            chunk,
        )
        for span in metadata.local_tree_spans if chunked else metadata.tree_spans:
            k_flat, v_flat = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
            out[span.start : span.end] = attend_span(q, k_flat, v_flat, span, layer.scale)
        return out


def _pool(tables: PoolTables, device: torch.device) -> TritonPoolMetadata:
    width = max([1, *map(len, tables.block_tables)])
    rows = [[max(b, 0) for b in row] + [0] * (width - len(row)) for row in tables.block_tables]
    table = torch.tensor(rows, dtype=torch.int32).to(device, non_blocking=True)
    return TritonPoolMetadata(slot_mapping=tables.slot_mapping, block_table=table)
