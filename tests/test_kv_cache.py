"""Block pools, the hybrid KV manager and the prefix cache: pure Python, no model."""

from __future__ import annotations

import pytest

from herd.engine.kv_cache import RELEASED, BlockPool, KVCacheManager, SeqBlocks
from herd.engine.prefix_cache import PrefixCache


def test_pool_reference_counts() -> None:
    pool = BlockPool(2)
    a = pool.allocate()
    pool.share(a)
    pool.release(a)
    assert pool.num_free == 1
    pool.release(a)
    assert pool.num_free == 2
    with pytest.raises(AssertionError):
        pool.release(a)


def test_local_blocks_stay_within_one_chunk() -> None:
    kv = KVCacheManager(num_full_blocks=64, num_local_blocks=64, block_size=4, chunk_size=16)
    seq = SeqBlocks()
    for pos in range(100):  # decode one token at a time past six chunk boundaries
        assert kv.allocate(seq, pos, pos + 1)
        live = [b for b in seq.local if b != RELEASED]
        assert len(live) == kv.local.num_used <= 16 // 4 + 1
        assert len(seq.full) == pos // 4 + 1  # global layers keep everything
    kv.free(seq)
    assert kv.full.num_used == kv.local.num_used == 0


def test_allocation_fails_without_partial_effect() -> None:
    kv = KVCacheManager(num_full_blocks=3, num_local_blocks=8, block_size=4, chunk_size=8)
    seq = SeqBlocks()
    assert not kv.allocate(seq, 0, 13)  # needs 4 full blocks
    assert seq.full == [] and kv.full.num_free == 3
    assert kv.allocate(seq, 0, 12)


def test_block_size_must_divide_chunk() -> None:
    with pytest.raises(ValueError, match="block size 3 must divide the attention chunk size 8"):
        KVCacheManager(4, 4, block_size=3, chunk_size=8)


def fill(kv: KVCacheManager, tokens: list[int]) -> SeqBlocks:
    """Allocate a sequence for `tokens` chunk by chunk, as the scheduler does."""
    seq, pos = SeqBlocks(), 0
    while pos < len(tokens):
        end = min(len(tokens), (pos // kv.chunk_size + 1) * kv.chunk_size)
        assert kv.allocate(seq, pos, end)
        pos = end
    return seq


def test_prefix_hit_reuses_full_and_partial_chunk_local_blocks() -> None:
    kv = KVCacheManager(num_full_blocks=32, num_local_blocks=32, block_size=4, chunk_size=8)
    cache = PrefixCache(kv)
    tokens = list(range(22))
    seq = fill(kv, tokens)
    cache.insert(tokens, seq, num_computed=22)  # blocks of 20 tokens (5 full blocks) are cacheable
    kv.free(seq)

    hit = cache.match([*tokens[:21], 99])
    # 5 blocks = 20 tokens; the chunk of position 20 starts at 16: local block 4 is needed and cached.
    assert hit.num_tokens == 20
    assert hit.full_blocks == seq_full_prefix(cache, 5)
    assert hit.local_blocks[:4] == [RELEASED] * 4 and hit.local_blocks[4] != RELEASED
    kv.free(SeqBlocks(hit.full_blocks, hit.local_blocks))
    cache.clear()
    assert kv.full.num_used == kv.local.num_used == 0


def seq_full_prefix(cache: PrefixCache, n: int) -> list[int]:
    node, out = cache.root, []
    for _ in range(n):
        node = next(iter(node.children.values()))
        out.append(node.full_block)
    return out


def test_prefix_hit_cut_back_to_chunk_start_when_local_evicted() -> None:
    kv = KVCacheManager(num_full_blocks=32, num_local_blocks=32, block_size=4, chunk_size=8)
    cache = PrefixCache(kv)
    tokens = list(range(22))
    seq = fill(kv, tokens)
    cache.insert(tokens, seq, num_computed=22)
    kv.free(seq)
    cache.evict(0, 32)  # local blocks only
    assert kv.local.num_used == 0 and kv.full.num_used == 5
    hit = cache.match(tokens)
    assert hit.num_tokens == 16  # the partial chunk [16, 20) is recomputed
    assert hit.local_blocks == [RELEASED] * 4
    kv.free(SeqBlocks(hit.full_blocks, hit.local_blocks))


def test_match_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(num_full_blocks=8, num_local_blocks=8, block_size=4, chunk_size=8)
    cache = PrefixCache(kv)
    tokens = list(range(8))
    seq = fill(kv, tokens)
    cache.insert(tokens, seq, 8)
    kv.free(seq)
    hit = cache.match(tokens)
    assert hit.num_tokens == 4
    kv.free(SeqBlocks(hit.full_blocks, hit.local_blocks))


def test_eviction_is_lru_and_spares_blocks_in_use() -> None:
    kv = KVCacheManager(num_full_blocks=6, num_local_blocks=12, block_size=4, chunk_size=8)
    cache = PrefixCache(kv)
    a, b = [1] * 8 + [0], [2] * 8 + [0]
    for tokens in (a, b):
        seq = fill(kv, tokens)
        cache.insert(tokens, seq, 8)
        kv.free(seq)
    assert kv.full.num_used == 4
    in_use = cache.match(b)  # b is now in use and most recent
    # Needing 4 blocks with 2 free: only a's two can go.
    big = SeqBlocks()
    assert kv.allocate(big, 0, 16)
    assert cache.num_nodes == 2  # b's two nodes survive
    again = cache.match(b)
    assert again.num_tokens == 8 and again.full_blocks == in_use.full_blocks
    for blocks in (
        big,
        SeqBlocks(in_use.full_blocks, in_use.local_blocks),
        SeqBlocks(again.full_blocks, again.local_blocks),
    ):
        kv.free(blocks)
    cache.clear()
    assert kv.full.num_used == kv.local.num_used == 0
