"""What attention needs to know about one flattened batch.

The batch is the new tokens of several sequences concatenated on one token axis. Each
sequence's new tokens continue its context: a sequence with `context_len` tokens after this
step and `n` new tokens owns context positions `context_len - n .. context_len - 1`, in that
order. KV lives in paged pools, one per attention kind: global (NoPE) layers use the `full`
pool, chunked local layers the `local` pool. A block table lists a sequence's blocks in
logical order (block j holds context positions `j*block_size ...`); the local table may hold
-1 for blocks released because no query can see them any more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PoolView:
    """One pool's addressing for a batch."""

    block_tables: list[list[int]]  # per sequence, logical block -> physical block (-1: released)
    slot_mapping: torch.Tensor  # [T] int64: physical slot (block * block_size + offset) per new token


@dataclass
class AttentionMetadata:
    query_start_loc: list[int]  # [B + 1] offsets of each sequence's new tokens on the token axis
    context_lens: list[int]  # [B] tokens in each context once this step's tokens are added
    block_size: int
    full: PoolView
    local: PoolView
    # What a backend derives from this metadata once per step and reuses in every layer.
    derived: dict[Any, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    def pool(self, chunked: bool) -> PoolView:
        return self.local if chunked else self.full
