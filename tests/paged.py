"""Drives herd's model with a paged KV cache the simple way: every sequence owns fixed blocks.

Block ids are shuffled so that no sequence's blocks are contiguous, and local-pool blocks a
chunked layer can no longer see are released (-1) and poisoned with NaN, so a backend that
reads them fails loudly.
"""

from __future__ import annotations

import math

import torch

from herd.frontend.llm_engine import LLMEngine
from herd.layers.attention import (
    AttentionBatch,
    DraftTree,
    PagedAttention,
    PagedKVStorage,
    PoolTables,
    bind_kv_cache,
)
from herd.models.llama4_text import Llama4ForCausalLM


def shuffled_tables(
    lens: list[tuple[int, int]], block: int, chunk: int | None, gen: torch.Generator, device: torch.device
) -> tuple[PoolTables, int, list[int]]:
    """One pool's tables for sequences of (context length after the step, new tokens): shuffled blocks; for a
    chunked pool (chunk), blocks wholly before the first new token's window are -1. Also the pool's block count
    and the released blocks' ids."""
    per_seq = [-(-ctx // block) for ctx, _ in lens]
    total = sum(per_seq) + 2
    ids = torch.randperm(total, generator=gen).tolist()
    tables, slots, released = [], [], []
    for (ctx, new), n in zip(lens, per_seq, strict=True):
        row, ids = ids[:n], ids[n:]
        first = ctx - new
        slots += [row[p // block] * block + p % block for p in range(first, ctx)]
        dead = (first // chunk) * chunk // block if chunk else 0
        released += row[:dead]
        tables.append([-1] * dead + row[dead:])
    return PoolTables(block_tables=tables, slot_mapping=torch.tensor(slots, device=device)), total, released


def shuffled_batch(
    lens: list[tuple[int, int]],
    block: int,
    chunk: int,
    gen: torch.Generator,
    device: torch.device,
    trees: list[DraftTree | None] | None = None,
) -> tuple[AttentionBatch, int, int, list[int]]:
    """A step's batch over both pools' `shuffled_tables`; also each pool's block count and the local pool's released
    blocks."""
    full, n_full, _ = shuffled_tables(lens, block, None, gen, device)
    local, n_local, released = shuffled_tables(lens, block, chunk, gen, device)
    starts = [0]
    for _, new in lens:
        starts.append(starts[-1] + new)
    batch = AttentionBatch(
        query_start_loc=starts,
        context_lens=[ctx for ctx, _ in lens],
        block_size=block,
        chunk_size=chunk,
        full=full,
        local=local,
        device=device,
        trees=trees,
    )
    return batch, n_full, n_local, released


def assert_no_leaked_blocks(engine: LLMEngine) -> None:
    """After every request is done (and the prefix cache emptied), both KV pools are empty again."""
    assert not engine.has_unfinished_requests()
    core = engine.core
    assert not core.has_unfinished_requests()
    if core.prefix_cache is not None:
        core.prefix_cache.clear()
    assert core.kv.full.num_used == 0, "full-pool blocks leaked"
    assert core.kv.local.num_used == 0, "local-pool blocks leaked"


class PagedRunner:
    def __init__(self, model: Llama4ForCausalLM, max_seqs: int, max_len: int, block_size: int = 4) -> None:
        self.model, self.block_size = model, block_size
        config = model.config
        per_seq = math.ceil(max_len / block_size)
        total = max_seqs * per_seq
        dtype = next(model.parameters()).dtype
        self.kv = PagedKVStorage(
            config, num_full_blocks=total, num_local_blocks=total, block_size=block_size, dtype=dtype
        )
        # The engine zeroes blocks on first use; these blocks are all in use from the start.
        self.kv.full.zero_()
        self.kv.local.zero_()
        bind_kv_cache(model, self.kv.layer)
        self.backend = next(m.backend for m in model.modules() if isinstance(m, PagedAttention))
        gen = torch.Generator().manual_seed(1234)
        self.full_ids = torch.randperm(total, generator=gen).view(max_seqs, per_seq).tolist()
        self.local_ids = torch.randperm(total, generator=gen).view(max_seqs, per_seq).tolist()
        self.released: list[set[int]] = [set() for _ in range(max_seqs)]
        self.lens = [0] * max_seqs
        self.chunk = config.attention_chunk_size

    @torch.no_grad()
    def step(self, batch: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Feed new tokens for several sequences at once; returns logits [sum of new tokens, vocab]."""
        ids, positions, starts, ctx_lens = [], [], [0], []
        for seq, tokens in batch:
            first = self.lens[seq]
            self._release_unseen(seq, first)
            ids += tokens
            positions += range(first, first + len(tokens))
            self.lens[seq] = first + len(tokens)
            starts.append(starts[-1] + len(tokens))
            ctx_lens.append(self.lens[seq])
        seqs = [seq for seq, _ in batch]
        batch_layout = AttentionBatch(
            query_start_loc=starts,
            context_lens=ctx_lens,
            block_size=self.block_size,
            chunk_size=self.chunk,
            full=self._view(self.full_ids, seqs, positions, starts),
            local=self._view(self.local_ids, seqs, positions, starts, released=True),
            device=torch.device("cpu"),
        )
        metadata = self.backend.build_metadata(batch_layout)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), metadata)
        return self.model.compute_logits(hidden).float()

    def _view(self, table, seqs, positions, starts, released=False) -> PoolTables:
        tables, slots = [], []
        for i, seq in enumerate(seqs):
            row = [(-1 if released and j in self.released[seq] else b) for j, b in enumerate(table[seq])]
            tables.append(row)
            for p in positions[starts[i] : starts[i + 1]]:
                slots.append(table[seq][p // self.block_size] * self.block_size + p % self.block_size)
        return PoolTables(block_tables=tables, slot_mapping=torch.tensor(slots, dtype=torch.long))

    def _release_unseen(self, seq: int, first_new: int) -> None:
        """Drop (and poison) local blocks entirely before the chunk of this step's first query."""
        if self.chunk is None:
            return
        chunk_start = (first_new // self.chunk) * self.chunk
        for j in range(chunk_start // self.block_size):
            if j not in self.released[seq]:
                self.released[seq].add(j)
                physical = self.local_ids[seq][j]
                self.kv.local[:, :, physical].fill_(float("nan"))
