"""Prefix cache: a tree over token ids, one node per full KV block, RadixAttention-style.

Each node caches the full-pool block of its `block_size` tokens (global layers need the whole
prefix) and, optionally, the local-pool block of the same positions (chunked layers need only
the last, partial chunk of a prefix). The tree holds one reference on every block it caches;
a block is evictable when the tree's is the only reference. Eviction takes least recently
used leaves first, and local blocks on their own when only the local pool is short.

A hit of m tokens reuses the full blocks of [0, m). The chunked layers need KV of
[(m // chunk) * chunk, m); if any of those local blocks has been evicted, the hit is cut back
to the chunk start so that exactly that partial chunk is recomputed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from herd.engine.kv_cache import RELEASED, KVCacheManager, SeqBlocks


@dataclass(eq=False)
class _Node:
    tokens: tuple[int, ...]
    full_block: int
    parent: _Node | None
    local_block: int = RELEASED
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    last_used: int = 0


@dataclass
class PrefixHit:
    num_tokens: int
    full_blocks: list[int]
    local_blocks: list[int]  # one per full block; RELEASED where not needed or not cached


class PrefixCache:
    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.block_size = kv.block_size
        self.root = _Node(tokens=(), full_block=RELEASED, parent=None)
        self._clock = itertools.count(1)
        self.num_nodes = 0
        kv.evict = self.evict
        # Running totals for the hit-rate metric, over admitted sequences (see `record`).
        self.queried_tokens = 0
        self.hit_tokens = 0

    def _blocks_of(self, tokens: list[int], limit: int) -> list[tuple[int, ...]]:
        bs = self.block_size
        return [tuple(tokens[i : i + bs]) for i in range(0, limit - limit % bs, bs)]

    def match(self, tokens: list[int]) -> PrefixHit:
        """Longest cached prefix of `tokens`, leaving at least one token to compute (it yields the logits).

        Takes a reference on every returned block for the caller; it gives them back by `kv.free`.
        """
        path: list[_Node] = []
        node = self.root
        for key in self._blocks_of(tokens, len(tokens) - 1):
            child = node.children.get(key)
            if child is None:
                break
            path.append(child)
            node = child
        num = len(path) * self.block_size
        first_local = self.kv.first_visible_local_block(num)
        if self.kv.chunk_size is not None and any(n.local_block == RELEASED for n in path[first_local:]):
            # Chunked layers lack part of the last partial chunk: recompute that chunk.
            path = path[:first_local]
            num = len(path) * self.block_size
            first_local = len(path)
        now = next(self._clock)
        for n in path:
            n.last_used = now
            self.kv.full.share(n.full_block)
        local = [RELEASED] * len(path)
        for j in range(first_local, len(path)):
            local[j] = path[j].local_block
            self.kv.local.share(local[j])
        return PrefixHit(num_tokens=num, full_blocks=[n.full_block for n in path], local_blocks=local)

    def record(self, num_tokens: int, num_hit: int) -> None:
        """Count a match that was used: an admission that failed for lack of blocks is retried, not counted twice."""
        self.queried_tokens += num_tokens
        self.hit_tokens += num_hit

    def insert(self, tokens: list[int], blocks: SeqBlocks, num_computed: int) -> None:
        """Cache the full blocks of the first `num_computed` tokens (whose KV is written)."""
        node, now = self.root, next(self._clock)
        for j, key in enumerate(self._blocks_of(tokens, num_computed)):
            child = node.children.get(key)
            if child is None:
                child = _Node(tokens=key, full_block=blocks.full[j], parent=node)
                self.kv.full.share(child.full_block)
                node.children[key] = child
                self.num_nodes += 1
            if (
                child.local_block == RELEASED
                and j < len(blocks.local)
                and blocks.local[j] != RELEASED
                and child.full_block == blocks.full[j]
            ):
                # Only alongside our own full block: KV of the two pools must come from one computation.
                child.local_block = blocks.local[j]
                self.kv.local.share(child.local_block)
            child.last_used = now
            node = child

    def evict(self, num_full: int, num_local: int) -> None:
        """Free at least the given numbers of blocks from unreferenced cache entries, LRU first."""
        if num_local > 0:
            candidates = [n for n in self._nodes() if n.local_block != RELEASED and self._only_cache(n, local=True)]
            for n in sorted(candidates, key=lambda n: n.last_used)[:num_local]:
                self.kv.local.release(n.local_block)
                n.local_block = RELEASED
        while num_full > 0:
            leaves = [n for n in self._nodes() if not n.children and self._only_cache(n, local=False)]
            if not leaves:
                return
            for n in sorted(leaves, key=lambda n: n.last_used)[:num_full]:
                self._remove(n)
                num_full -= 1

    def _only_cache(self, n: _Node, local: bool) -> bool:
        pool = self.kv.local if local else self.kv.full
        return pool.ref_counts[n.local_block if local else n.full_block] == 1

    def _remove(self, n: _Node) -> None:
        self.kv.full.release(n.full_block)
        if n.local_block != RELEASED:
            self.kv.local.release(n.local_block)
        assert n.parent is not None
        del n.parent.children[n.tokens]
        self.num_nodes -= 1

    def _nodes(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    def clear(self) -> None:
        """Drop every unreferenced entry (used by tests to check that nothing leaks)."""
        self.evict(self.kv.full.num_blocks, self.kv.local.num_blocks)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0
