"""Block bookkeeping for the hybrid paged KV cache. Plain Python over integers: no tensors.

Two pools of fixed-size blocks: the full pool backs the global (NoPE) layers and holds a
sequence's whole context; the local pool backs the chunked-attention layers and holds only
what a query can still see. A token at position p in a chunked layer sees positions from
`(p // chunk) * chunk`, so once a sequence's next token starts a new chunk, every local block
wholly before that chunk is released: local memory per sequence stays within one chunk plus
one block. Blocks are reference counted so the prefix cache can share them between sequences.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

RELEASED = -1


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._free = deque(range(num_blocks))
        # Blocks handed out for the first time, whose memory may hold garbage until zeroed. Fresh blocks
        # leave the free list in increasing order before any recycled one (those go to the back).
        self._high_water = 0
        self.fresh: list[int] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        block = self._free.popleft()
        self.ref_counts[block] = 1
        if block >= self._high_water:
            self._high_water = block + 1
            self.fresh.append(block)
        return block

    def take_fresh(self) -> list[int]:
        fresh, self.fresh = self.fresh, []
        return fresh

    def share(self, block: int) -> None:
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released more often than taken"
        if self.ref_counts[block] == 0:
            self._free.append(block)


@dataclass
class SeqBlocks:
    """One sequence's block tables: logical block j holds positions [j * block_size, (j + 1) * block_size)."""

    full: list[int] = field(default_factory=list)
    local: list[int] = field(default_factory=list)  # RELEASED where no query can see the block any more


class KVCacheManager:
    def __init__(self, num_full_blocks: int, num_local_blocks: int, block_size: int, chunk_size: int | None) -> None:
        if chunk_size is not None and chunk_size % block_size:
            raise ValueError(f"block size {block_size} must divide the attention chunk size {chunk_size}")
        self.block_size = block_size
        self.chunk_size = chunk_size
        self.full = BlockPool(num_full_blocks)
        self.local = BlockPool(num_local_blocks if chunk_size is not None else 0)
        # Called with (full blocks, local blocks) still missing; frees cached blocks (the prefix cache).
        self.evict = lambda full, local: None

    def num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def first_visible_local_block(self, first_new_pos: int) -> int:
        """Logical index of the first local block a query at `first_new_pos` (or later) may see."""
        if self.chunk_size is None:
            return 0
        return (first_new_pos // self.chunk_size) * self.chunk_size // self.block_size

    def max_local_blocks_per_seq(self) -> int:
        return 0 if self.chunk_size is None else self.chunk_size // self.block_size + 1

    def blocks_needed(self, seq: SeqBlocks, start: int, end: int) -> tuple[int, int]:
        """New (full, local) blocks to hold positions [start, end), after releasing unseen local blocks."""
        total = self.num_blocks(end)
        full = max(0, total - len(seq.full))
        if self.chunk_size is None:
            return full, 0
        first = max(self.first_visible_local_block(start), len(seq.local))
        return full, max(0, total - first)

    def allocate(self, seq: SeqBlocks, start: int, end: int) -> bool:
        """Make room for positions [start, end); False (and no change) if the pools cannot."""
        self.release_unseen(seq, start)
        need_full, need_local = self.blocks_needed(seq, start, end)
        if need_full > self.full.num_free or need_local > self.local.num_free:
            self.evict(need_full - self.full.num_free, need_local - self.local.num_free)
            if need_full > self.full.num_free or need_local > self.local.num_free:
                return False
        total = self.num_blocks(end)
        seq.full.extend(self.full.allocate() for _ in range(need_full))
        if self.chunk_size is not None:
            first = self.first_visible_local_block(start)
            while len(seq.local) < total:
                seq.local.append(RELEASED if len(seq.local) < first else self.local.allocate())
        return True

    def release_unseen(self, seq: SeqBlocks, first_new_pos: int) -> None:
        """Release the local blocks wholly before the chunk of the next query."""
        for j in range(min(self.first_visible_local_block(first_new_pos), len(seq.local))):
            if seq.local[j] != RELEASED:
                self.local.release(seq.local[j])
                seq.local[j] = RELEASED

    def truncate(self, seq: SeqBlocks, num_tokens: int) -> None:
        """Give back the blocks past the first `num_tokens` positions (rejected speculative tokens)."""
        keep = self.num_blocks(num_tokens)
        for block in seq.full[keep:]:
            self.full.release(block)
        for block in seq.local[keep:]:
            if block != RELEASED:
                self.local.release(block)
        del seq.full[keep:], seq.local[keep:]

    def free(self, seq: SeqBlocks) -> None:
        for block in seq.full:
            self.full.release(block)
        for block in seq.local:
            if block != RELEASED:
                self.local.release(block)
        seq.full.clear()
        seq.local.clear()
