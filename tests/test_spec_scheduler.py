"""Draft tokens in the scheduler and the block manager: room taken for them, given back on rejection."""

from __future__ import annotations

from herd.engine.kv_cache import RELEASED, KVCacheManager
from herd.engine.scheduler import Scheduler, Sequence


def running(kv: KVCacheManager, prompt_len: int, max_tokens: int = 32) -> tuple[Scheduler, Sequence]:
    """A scheduler with one sequence that has finished its prompt and sampled one token."""
    scheduler = Scheduler(kv, None, max_running=4, chunked_prefill_size=64)
    seq = Sequence("s", list(range(3, 3 + prompt_len)), max_tokens=max_tokens)
    scheduler.add(seq)
    while seq.num_computed < prompt_len:
        scheduler.update(scheduler.schedule())
    seq.output_token_ids.append(7)
    return scheduler, seq


def test_rejected_drafts_give_their_blocks_back_across_a_chunk_boundary() -> None:
    kv = KVCacheManager(num_full_blocks=8, num_local_blocks=8, block_size=4, chunk_size=8)
    scheduler, seq = running(kv, prompt_len=6)
    seq.draft_token_ids = [9, 10, 11, 12]  # positions 7..10: past the chunk boundary at 8
    out = scheduler.schedule()
    (item,) = out.scheduled
    assert (item.start, item.num_tokens, item.num_draft, item.samples) == (6, 5, 4, True)
    assert len(seq.blocks.full) == 3 and len(seq.blocks.local) == 3  # room for positions up to 10
    scheduler.update(out)
    assert seq.num_computed == 7 and seq.draft_token_ids == []
    scheduler.accept_drafts(seq, 1)  # drafts 10, 11, 12 rejected: positions 8.. roll back
    assert seq.num_computed == 8
    assert len(seq.blocks.full) == 2 and len(seq.blocks.local) == 2
    assert kv.full.num_used == 2 and kv.local.num_used == 2
    # The next step starts the new chunk: the old chunk's local blocks go, as without drafts.
    seq.output_token_ids += [9, 8]
    scheduler.update(scheduler.schedule())
    assert seq.blocks.local[:2] == [RELEASED, RELEASED]


def test_drafts_are_dropped_rather_than_preempting() -> None:
    kv = KVCacheManager(num_full_blocks=2, num_local_blocks=2, block_size=4, chunk_size=None)
    scheduler, seq = running(kv, prompt_len=6)
    seq.draft_token_ids = [9, 10, 11, 12]  # needs a third block: the pool has two
    (item,) = scheduler.schedule().scheduled
    assert (item.num_tokens, item.num_draft) == (1, 0)
    assert scheduler.num_preemptions == 0 and seq.draft_token_ids == []
