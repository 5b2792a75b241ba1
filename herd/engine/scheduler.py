"""Continuous batching: which tokens of which sequences run in the next step.

Plain Python over token ids and block tables. Each step takes one decode token from every
running sequence that has finished its prompt, then fills up to `chunked_prefill_size` prompt
tokens from sequences still prefilling, admitting waiting ones first come, first served.
When the KV pools run dry, the most recently admitted sequence is preempted: its blocks are
freed (its computed prefix stays in the prefix cache) and it waits to be recomputed.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field

from herd.engine.kv_cache import KVCacheManager, SeqBlocks
from herd.engine.prefix_cache import PrefixCache


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    blocks: SeqBlocks = field(default_factory=SeqBlocks)
    admitted_order: int = -1
    # With images: the prompt as the prefix cache keys it (patch tokens stand for their image's content).
    prompt_key_ids: list[int] | None = None
    # Compute every prompt position (prompt logprobs need their hidden states): no prefix cache hit.
    skip_prefix_cache: bool = False
    # Speculative decoding: tokens a drafter guessed to follow; the next decode step verifies them.
    draft_token_ids: list[int] = field(default_factory=list)
    # A tree of drafts (EAGLE topk > 1): each draft's parent among them (-1: the last token); None: a chain.
    draft_parents: list[int] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end), without copying the whole sequence (a step must cost O(new tokens))."""
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return self.output_token_ids[start - len(prompt) : end - len(prompt)]
        return prompt[start:] + self.output_token_ids[: end - len(prompt)]

    def cache_key(self) -> list[int]:
        """The tokens as the prefix cache sees them: equal keys mean equal KV."""
        return (self.prompt_key_ids or self.prompt_token_ids) + self.output_token_ids


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first position computed this step
    num_tokens: int  # including num_draft draft tokens at the end
    num_draft: int = 0  # speculative tokens after the sequence's last token, verified this step

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so its logits are sampled."""
        return self.start + self.num_tokens - self.num_draft == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        prefix_cache: PrefixCache | None,
        max_running: int,
        chunked_prefill_size: int,
    ) -> None:
        self.kv = kv
        self.prefix_cache = prefix_cache
        self.max_running = max_running
        self.chunked_prefill_size = chunked_prefill_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._admissions = itertools.count()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        budget = self.chunked_prefill_size
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = self._next_tokens(seq, budget)
            if n == 0:
                continue
            drafts = len(seq.draft_token_ids) if n == 1 else 0
            if drafts and not self.kv.allocate(seq.blocks, seq.num_computed, seq.num_computed + 1 + drafts):
                # Drafts are a bet, not a need: drop them rather than preempt anyone for their room.
                seq.draft_token_ids, drafts = [], 0
            while (
                not drafts
                and not self._has_room(seq, n)
                and not self.kv.allocate(seq.blocks, seq.num_computed, seq.num_computed + n)
            ):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                scheduled.append(ScheduledSeq(seq, seq.num_computed, n + drafts, drafts))
                if seq.num_computed + 1 < seq.num_tokens:
                    budget -= n
        # Preempted sequences go back in front, oldest first, ahead of new arrivals.
        for seq in sorted(preempted, key=lambda s: s.admitted_order, reverse=True):
            self.waiting.appendleft(seq)
        if not preempted:
            scheduled += self._admit(budget)
        return SchedulerOutput(scheduled, preempted)

    def _has_room(self, seq: Sequence, n: int) -> bool:
        """Whether one more token fits the blocks the sequence holds (the common decode step: no pool work)."""
        pos, chunk = seq.num_computed, self.kv.chunk_size
        return n == 1 and pos % self.kv.block_size != 0 and (chunk is None or pos % chunk != 0)

    def _next_tokens(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_tokens - seq.num_computed
        if remaining == 1:
            return 1  # decode (or the last prompt token): not bounded by the prefill budget
        n = min(remaining, budget)
        chunk = self.kv.chunk_size
        if chunk is not None and n > 0:
            # Never cross a chunk boundary in one step: local KV then stays within one chunk.
            n = min(n, chunk - seq.num_computed % chunk)
        return n

    def _admit(self, budget: int) -> list[ScheduledSeq]:
        admitted = []
        while self.waiting and len(self.running) < self.max_running and budget > 0:
            seq = self.waiting[0]
            if self.prefix_cache is not None and not seq.blocks.full and not seq.skip_prefix_cache:
                hit = self.prefix_cache.match(seq.cache_key())
                seq.blocks.full, seq.blocks.local = hit.full_blocks, hit.local_blocks
                seq.num_computed = hit.num_tokens
                if seq.num_preemptions == 0:
                    seq.num_cached_tokens = hit.num_tokens
            n = self._next_tokens(seq, budget)
            if not self.kv.allocate(seq.blocks, seq.num_computed, seq.num_computed + n):
                self._release(seq)
                break
            self.waiting.popleft()
            if self.prefix_cache is not None:
                self.prefix_cache.record(seq.num_tokens, seq.num_computed)
            seq.status = SeqStatus.RUNNING
            seq.admitted_order = next(self._admissions)
            self.running.append(seq)
            admitted.append(ScheduledSeq(seq, seq.num_computed, n))
            budget -= n
        return admitted

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.draft_token_ids = []
        self._release(seq)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def _release(self, seq: Sequence) -> None:
        """Give back a sequence's blocks, keeping its computed prefix in the cache."""
        if self.prefix_cache is not None:
            self.prefix_cache.insert(seq.cache_key(), seq.blocks, seq.num_computed)
        self.kv.free(seq.blocks)
        seq.num_computed = 0

    def update(self, out: SchedulerOutput) -> None:
        """Record that the scheduled tokens' KV is now written (call before appending sampled tokens).

        Draft tokens' KV is written too, but counts only once `accept_drafts` says which of them stand.
        """
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed = item.start + item.num_tokens - item.num_draft
            seq.draft_token_ids = []
            if self.prefix_cache is not None and seq.num_computed == len(seq.prompt_token_ids):
                # Prompt done: share it with whoever arrives next with the same prefix.
                self.prefix_cache.insert(seq.cache_key(), seq.blocks, seq.num_computed)

    def accept_drafts(self, seq: Sequence, num_accepted: int) -> None:
        """The first `num_accepted` drafts verified this step stand: their KV is valid. The rest roll back:
        their slots will be overwritten, and blocks wholly past the accepted tokens go back to the pools."""
        seq.num_computed += num_accepted
        self.kv.truncate(seq.blocks, seq.num_computed)

    def finish(self, seq: Sequence) -> None:
        """Retire a sequence (finished or aborted), running or still waiting."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
