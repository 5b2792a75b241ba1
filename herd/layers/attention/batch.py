"""What every attention backend is told about one step's batch, before it builds its own metadata.

The batch is the new tokens of several sequences concatenated on one token axis. Each sequence's new
tokens continue its context: a sequence with `context_len` tokens after this step and `n` new tokens owns
context positions `context_len - n .. context_len - 1`, in that order. KV lives in paged pools, one per
attention kind: global (NoPE) layers use the `full` pool, chunked local layers the `local` pool. A block
table lists a sequence's blocks in logical order (block j holds context positions `j*block_size ...`); the
local table may hold -1 for blocks released because no query can see them any more.

The worker builds this once per step; `AttentionBackend.build_metadata` turns it into the tensors the
layers use, so no layer ever walks these lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PoolTables:
    """One pool's addressing for a batch."""

    block_tables: list[list[int]]  # per sequence, logical block -> physical block (-1: released)
    slot_mapping: torch.Tensor  # [T] int64: physical slot (block * block_size + offset) of each new token


@dataclass
class AttentionBatch:
    query_start_loc: list[int]  # [B + 1] offsets of each sequence's new tokens on the token axis
    context_lens: list[int]  # [B] tokens in each context once this step's tokens are added
    block_size: int
    chunk_size: int | None  # the chunked layers' attention chunk; None when the model has none
    full: PoolTables
    local: PoolTables
    device: torch.device

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (the step CUDA graphs and torch.compile serve)."""
        return self.query_start_loc[-1] == self.num_seqs
