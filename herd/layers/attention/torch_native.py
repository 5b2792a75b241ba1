"""Paged attention in plain PyTorch: gather each sequence's visible KV, then SDPA.

The CPU default and the reference every other backend is tested against. Queries that see only the context up to
their own position are served together as decode queries (one padded gather of their visible blocks and one SDPA
call, or herd's paged decode kernel on the CPU): every sequence with one new token, and each new token of a
sequence with a few (a speculative chain being verified, a short prompt). Longer prefills and draft trees are
served one sequence at a time with a causal (and chunked, and tree) mask. Everything a layer needs (slot indices,
padded block tables, masks) is built once per step by `build_metadata`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from herd.kernels.cpu import enabled as cpu_kernels_enabled
from herd.layers import opaque
from herd.layers.attention.base import AttentionBackend, register_backend
from herd.layers.attention.batch import AttentionBatch, PoolTables, span_mask
from herd.layers.attention.layer import PagedAttention


@dataclass
class DecodeLayout:
    rows: torch.Tensor | None  # [D] token-axis rows of the decode queries; None when every row decodes
    table: torch.Tensor  # [D, W] the visible blocks of each decoding sequence, padded with its last one
    # The query sees gathered slots [offsets[d], offsets[d] + lengths[d]) (herd's CPU kernel reads these)...
    offsets: torch.Tensor  # [D] int64, on the CPU
    lengths: torch.Tensor  # [D] int64, on the CPU
    # ... as a mask for SDPA: [D, W * block_size] bool; None where the kernel attends (a mask fewer to build a step).
    valid: torch.Tensor | None


@dataclass
class PrefillSpan:
    start: int  # token-axis rows [start, end) are one sequence's queries
    end: int
    kv_slots: torch.Tensor  # [L] physical slots of the visible context, in position order
    mask: torch.Tensor  # [end - start, L] bool, True where a query may attend


@dataclass
class PoolMetadata:
    slot_mapping: torch.Tensor  # [T] where this step's K/V go
    decode: DecodeLayout | None
    prefills: list[PrefillSpan] = field(default_factory=list)


@dataclass
class TorchNativeMetadata:
    full: PoolMetadata
    local: PoolMetadata | None  # None when the model has no chunked layers

    def pool(self, chunked: bool) -> PoolMetadata:
        pool = self.local if chunked else self.full
        assert pool is not None
        return pool


@register_backend
class TorchNativeBackend(AttentionBackend):
    name = "torch_native"

    def build_metadata(self, batch: AttentionBatch) -> TorchNativeMetadata:
        local = None if batch.chunk_size is None else _pool_metadata(batch, batch.local, batch.chunk_size)
        return TorchNativeMetadata(full=_pool_metadata(batch, batch.full, None), local=local)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: PagedAttention, metadata: TorchNativeMetadata
    ) -> torch.Tensor:
        pool = metadata.pool(layer.chunk_size is not None)
        decode = pool.decode
        pure_decode = not pool.prefills and decode is not None and decode.rows is None
        if pure_decode and q.device.type == "cpu" and torch.compiler.is_compiling():
            # A compiled graph that writes a view of the cache copies the whole pool each step: write and
            # attend eagerly inside one opaque op instead (herd.layers.opaque).
            assert decode is not None
            args = [q, k, v, pool.slot_mapping, decode.table, decode.offsets, decode.lengths]
            return opaque.call(layer.opaque_handle, args if decode.valid is None else [*args, decode.valid])
        return self.attend(q, k, v, layer, pool)

    def opaque_decode(self, layer: PagedAttention, args: list[torch.Tensor]) -> torch.Tensor:
        """A pure decode step's attention for one layer, run by `herd::opaque_call` in a compiled step."""
        q, k, v, slot_mapping, table, offsets, lengths, *mask = args  # the mask only where the kernel does not attend
        layout = DecodeLayout(rows=None, table=table, offsets=offsets, lengths=lengths, valid=mask[0] if mask else None)
        return self.attend(q, k, v, layer, PoolMetadata(slot_mapping, layout))

    def kernel_decode_args(self, metadata: TorchNativeMetadata, chunked: bool) -> tuple[torch.Tensor, ...] | None:
        pool = metadata.pool(chunked)
        decode = pool.decode
        if pool.prefills or decode is None or decode.rows is not None or decode.valid is not None:
            return None
        return pool.slot_mapping, decode.table, decode.offsets, decode.lengths

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: PagedAttention, pool: PoolMetadata
    ) -> torch.Tensor:
        assert layer.kv_cache is not None, "the KV cache is not bound to the model (bind_kv_cache)"
        k_cache, v_cache = layer.kv_cache
        # Scatter this step's K/V into their slots: [num_blocks * block_size, kv_heads, head_dim] views.
        k_flat, v_flat = k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:])
        k_flat.index_copy_(0, pool.slot_mapping, k)
        v_flat.index_copy_(0, pool.slot_mapping, v)
        if not pool.prefills and pool.decode is not None and pool.decode.rows is None:
            return _decode(q, k_cache, v_cache, pool.decode, layer.scale)  # a pure decode step
        out = torch.empty_like(q)
        for span in pool.prefills:
            out[span.start : span.end] = attend_span(q, k_flat, v_flat, span, layer.scale)
        if pool.decode is not None:
            rows = pool.decode.rows
            out[rows] = _decode(q[rows], k_cache, v_cache, pool.decode, layer.scale)
        return out


def attend_span(
    q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, span: PrefillSpan, scale: float
) -> torch.Tensor:  # [end - start, n_heads, head_dim]
    """One sequence's queries over its visible slots (k_flat, v_flat: [slots, kv_heads, head_dim])."""
    o = F.scaled_dot_product_attention(
        q[span.start : span.end].transpose(0, 1),
        k_flat[span.kv_slots].transpose(0, 1),
        v_flat[span.kv_slots].transpose(0, 1),
        attn_mask=span.mask,
        scale=scale,
        enable_gqa=True,
    )
    return o.transpose(0, 1)


def _decode(
    q: torch.Tensor,  # [D, n_heads, head_dim], one query per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    layout: DecodeLayout,
    scale: float,
) -> torch.Tensor:  # [D, n_heads, head_dim]
    if layout.valid is None:
        # Straight from the blocks: no gather, upcast or mask (herd/kernels/cpu/decode_attention.cpp).
        return torch.ops.herd_cpu.paged_decode_attention(
            q, k_cache, v_cache, layout.table, layout.offsets, layout.lengths, scale
        )
    # Masked slots hold finite values (blocks are zeroed on first use; padding repeats the row's own
    # last block), so the mask alone excludes them.
    keys = k_cache[layout.table].flatten(1, 2)  # [D, W * block_size, kv_heads, head_dim]
    values = v_cache[layout.table].flatten(1, 2)
    dtype = q.dtype
    if q.device.type == "cpu" and dtype != torch.float32:
        # PyTorch's CPU kernel for one query row is 3-4x slower in bf16 than in float32, upcasts included
        # (the scores are accumulated in float32 either way).
        q, keys, values = q.float(), keys.float(), values.float()
    o = F.scaled_dot_product_attention(
        q[:, :, None, :],  # [D, n_heads, 1, head_dim]
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=layout.valid[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )
    return o[:, :, 0, :].to(dtype)


# Where herd's paged decode kernel runs (the CPU), a sequence with at most this many new tokens and no draft tree (a
# speculative chain being verified, a short prompt) has each of them attend as a decode query over the context up
# to itself: the kernel reads the blocks in place, where a span gathers them and builds a mask (the demo model's
# 8-token verify: ~25 against ~110 us a layer). Elsewhere each such query would gather the context again.
DECODE_QUERIES_MAX = 16
# Longer prefills (no tree) also attend as decode queries through the kernel while the step's padded block table
# stays within this many entries (every decode query's row is as wide as the widest): tiny's prefill of 64 prompts of
# 32 tokens took 95 instead of 125 ms on 1 thread, 65 instead of 100 on 2, and a 4,096-token prompt as long either
# way (benchmarks/RESULTS.md). The bound keeps the table (and the Python that builds it) small beside the step.
DECODE_TABLE_MAX = 1 << 16


def _pool_metadata(batch: AttentionBatch, tables: PoolTables, chunk: int | None) -> PoolMetadata:
    decode: list[tuple[int, int, int]] = []  # (sequence, its context length as the query sees it, token-axis row)
    prefills = []
    longer: list[int] = []  # prefills that may attend as decode queries after all
    starts = batch.query_start_loc
    kernel = batch.device.type == "cpu" and cpu_kernels_enabled()
    few = DECODE_QUERIES_MAX if kernel else 1
    for i in range(batch.num_seqs):
        n = starts[i + 1] - starts[i]
        if n == 1 or (n <= few and batch.tree(i) is None):
            decode.extend(_queries(batch, i))
        elif kernel and batch.tree(i) is None:
            longer.append(i)
        else:
            prefills.append(prefill_span(batch, tables.block_tables[i], i, chunk))
    if longer:
        rows = len(decode) + sum(starts[i + 1] - starts[i] for i in longer)
        width = max(_blocks_seen(batch, i, chunk) for i in {*(q[0] for q in decode), *longer})
        if rows * width <= DECODE_TABLE_MAX:
            decode = sorted(decode + [q for i in longer for q in _queries(batch, i)], key=lambda q: q[2])
        else:
            prefills += [prefill_span(batch, tables.block_tables[i], i, chunk) for i in longer]
    layout = _decode_layout(batch, tables, decode, chunk, not prefills, kernel) if decode else None
    return PoolMetadata(slot_mapping=tables.slot_mapping, decode=layout, prefills=prefills)


def _queries(batch: AttentionBatch, i: int) -> list[tuple[int, int, int]]:
    """Sequence i's new tokens as decode queries: (i, context length up to the token, token-axis row)."""
    start, end = batch.query_start_loc[i], batch.query_start_loc[i + 1]
    return [(i, batch.context_lens[i] - (end - start) + j + 1, start + j) for j in range(end - start)]


def _blocks_seen(batch: AttentionBatch, i: int, chunk: int | None) -> int:
    """At least as many blocks as the widest decode table row of sequence i's new tokens: from the first one's
    window to the last one's end."""
    ctx, bs = batch.context_lens[i], batch.block_size
    first_query = ctx - (batch.query_start_loc[i + 1] - batch.query_start_loc[i])
    return (ctx + bs - 1) // bs - _visible_start(first_query, chunk) // bs


def _visible_start(first_query: int, chunk: int | None) -> int:
    """First context position any query at `first_query` or later can see."""
    return (first_query // chunk) * chunk if chunk else 0


def prefill_span(batch: AttentionBatch, table: list[int], i: int, chunk: int | None) -> PrefillSpan:
    start, end = batch.query_start_loc[i], batch.query_start_loc[i + 1]
    ctx, bs, device = batch.context_lens[i], batch.block_size, batch.device
    first_q = ctx - (end - start)
    # Chunked layers: no query of this step can see anything before its own chunk.
    kv_start = _visible_start(first_q, chunk)
    first_block = kv_start // bs
    blocks = torch.tensor(table[first_block : (ctx + bs - 1) // bs], dtype=torch.long)
    slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()
    offset = kv_start - first_block * bs
    kv_slots = slots[offset : offset + ctx - kv_start]
    mask = span_mask(first_q, ctx, kv_start, chunk, batch.tree(i))
    return PrefillSpan(start, end, kv_slots.to(device), mask.to(device))


def _decode_layout(
    batch: AttentionBatch,
    tables: PoolTables,
    queries: list[tuple[int, int, int]],
    chunk: int | None,
    every_row: bool,
    kernel: bool,
) -> DecodeLayout:
    """Padded block table [D, width] of the blocks each decode query sees, and which of their slots.

    queries: (sequence, context length up to and including the query, token-axis row), in token-axis order;
    every_row: they are all of the step's rows; kernel: herd's CPU kernel attends (no mask needed)."""
    bs = batch.block_size
    rows, offsets, lengths = [], [], []
    for i, ctx, _ in queries:
        kv_start = _visible_start(ctx - 1, chunk)
        first = kv_start // bs
        rows.append(tables.block_tables[i][first : (ctx + bs - 1) // bs])
        offsets.append(kv_start - first * bs)
        lengths.append(ctx - kv_start)
    # At least two blocks wide: a compiled step specialises a dimension of size 1, so a table one block wide (a
    # fresh chunk window) would compile a second graph as soon as the window reaches its second block. The padding
    # repeats the row's last block, masked like all padding.
    width = max(2, *map(len, rows))
    table = torch.tensor([row + row[-1:] * (width - len(row)) for row in rows], dtype=torch.long)
    start, length = torch.tensor(offsets), torch.tensor(lengths)
    valid = None
    if not kernel:
        pos = torch.arange(width * bs)[None, :]
        valid = ((pos >= start[:, None]) & (pos < (start + length)[:, None])).to(batch.device)
    query_rows = None if every_row else torch.tensor([row for _, _, row in queries], device=batch.device)
    return DecodeLayout(rows=query_rows, table=table.to(batch.device), offsets=start, lengths=length, valid=valid)
