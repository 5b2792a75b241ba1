"""The engine core: token ids in, new token ids out, many sequences at once over the paged hybrid KV cache.

Each `step()` schedules a batch (continuous batching, chunked prefill, prefix cache, preemption), has the
workers run it, appends the sampled tokens, and ends the sequences that hit a stop token, max_tokens or
the context length. It knows nothing of text: tokenizing, detokenizing, stop strings, `n` and response
formats are the frontend's (herd.frontend), which talks to the core in `herd.engine.protocol` messages.
"""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from herd.config.engine import EngineConfig
from herd.engine.kv_cache import KVCacheManager
from herd.engine.prefix_cache import PrefixCache
from herd.engine.protocol import CoreInfo, EngineCoreOutput, EngineCoreRequest, EngineStats
from herd.engine.scheduler import Scheduler, SchedulerOutput, Sequence
from herd.engine.spec_stats import SpecStats
from herd.sampling import SampleResult
from herd.sampling.grammar import is_loaded, load_compiled, register_vocabulary
from herd.worker import NewSequence, ScheduledChunk, StepPlan, Worker
from herd.worker.distributed import TensorParallelDriver

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Live:
    request: EngineCoreRequest
    seq: Sequence
    introduced: bool = False  # the workers know it (its NewSequence went out)
    # With params.prompt_logprobs: per prompt position, filled in as its prefill steps run (a preempted
    # sequence recomputes and overwrites them), sent with its first output.
    prompt_logprobs: list[dict[int, float] | None] | None = None


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # With tensor parallelism one driver stands for every rank: it sends each plan to the others.
        self.workers = [Worker(config, rank=0) if config.parallel.tp_size == 1 else TensorParallelDriver(config)]
        # Every rank must hold the same blocks, so the smallest plan (the rank with least free memory) wins.
        plan = min((worker.plan_kv_cache() for worker in self.workers), key=lambda p: p.num_full_blocks)
        for worker in self.workers:
            worker.init_kv_cache(plan)
        self.kv = KVCacheManager(plan.num_full_blocks, plan.num_local_blocks, plan.block_size, plan.chunk_size)
        self.prefix_cache = PrefixCache(self.kv) if config.cache.enable_prefix_caching else None
        sched = config.scheduler
        self.scheduler = Scheduler(self.kv, self.prefix_cache, sched.max_running_requests, sched.prefill_budget)
        self.context_length = sched.context_length
        self.requests: dict[str, _Live] = {}
        # A grammar new to this process is deserialized in a thread (tens of ms for a big schema over 202k
        # tokens), its request held out of the scheduler meanwhile: the other requests' steps go on.
        self._grammar_loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="herd-grammar")
        self._loading: dict[str, Future[object]] = {}  # request id -> its grammar, being deserialized
        self._finished: list[str] = []  # sequences the workers should forget at the next step
        self.speculative = config.speculative.enabled
        self.spec_stats = SpecStats()
        self.info = CoreInfo(max_request_tokens=plan.num_full_blocks * plan.block_size)
        logger.info(
            "KV cache: %d full tokens, %d local tokens, page size %d",
            plan.num_full_blocks * plan.block_size,
            plan.num_local_blocks * plan.block_size,
            plan.block_size,
        )

    # -- requests ---------------------------------------------------------------------------------------

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        """Queue requests the frontend has checked; all or none (a duplicate id refuses the batch)."""
        for vocabulary in {r.grammar_vocabulary for r in requests if r.grammar_vocabulary is not None}:
            register_vocabulary(vocabulary)  # this process's grammars need it, whatever becomes of the batch
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids) or any(i in self.requests for i in ids):
            raise ValueError(f"request ids {ids} are not distinct or already in use")
        for request in requests:
            seq = Sequence(
                seq_id=request.request_id,
                prompt_token_ids=request.prompt_token_ids,
                max_tokens=request.max_tokens,
                prompt_key_ids=request.cache_key,
                skip_prefix_cache=request.params.prompt_logprobs is not None,
            )
            live = _Live(request, seq)
            if request.params.prompt_logprobs is not None:
                live.prompt_logprobs = [None] * len(request.prompt_token_ids)
            self.requests[request.request_id] = live
            blob = request.params.grammar
            if blob is not None and not is_loaded(blob):
                self._loading[request.request_id] = self._grammar_loader.submit(load_compiled, blob)
            else:
                self.scheduler.add(seq)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Stop these requests and free their blocks; unknown or finished ids are ignored."""
        for request_id in request_ids:
            live = self.requests.get(request_id)
            if live is not None:
                self._finish(live)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the loop ---------------------------------------------------------------------------------------

    def step(self) -> list[EngineCoreOutput]:
        """Run one batch; return the new tokens of every sequence that sampled."""
        self._admit_loaded_grammars()
        scheduled = self.scheduler.schedule()
        if not scheduled.scheduled:
            # Nothing runs and nothing can be admitted: the frontend's size checks make this a bug.
            if self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("scheduler stalled: a waiting request cannot be admitted into an idle engine")
            return []
        plan = self._plan(scheduled)
        per_rank = [worker.execute(plan) for worker in self.workers]  # every rank runs the step
        results = per_rank[0]  # and rank 0's samples are the step's
        for seq_id, scored in self.workers[0].last_prompt_logprobs.items():
            live = self.requests[seq_id]
            assert live.prompt_logprobs is not None
            for position, entry in scored:
                live.prompt_logprobs[position] = entry
        self.scheduler.update(scheduled)
        sampling = [item for item in scheduled.scheduled if item.samples]
        outputs = []
        for item, accepted in zip(sampling, results, strict=True):
            if item.num_draft:
                self.scheduler.accept_drafts(item.seq, len(accepted) - 1)  # the last token is the target's own
            if self.speculative and item.start + 1 == item.seq.num_tokens:  # a decode step (with or without drafts)
                self.spec_stats.record(len(accepted))
            outputs.append(self._append(self.requests[item.seq.seq_id], accepted))
        self._take_drafts(self.workers[0].last_drafts, self.workers[0].last_draft_parents)
        return outputs

    def _take_drafts(self, drafts: dict[str, list[int]], parents: dict[str, list[int]]) -> None:
        """Keep each live sequence's drafts for its next step, cut so that the tokens one step can add stay within
        max_tokens and the context length (a verify step adds up to len(drafts) + 1 tokens). A tree is cut to its
        first drafts too: parents come first, so they are a tree, no deeper than their number."""
        for seq_id, draft in drafts.items():
            live = self.requests.get(seq_id)
            if live is None:
                continue
            seq = live.seq
            room = min(seq.max_tokens - len(seq.output_token_ids), self.context_length - seq.num_tokens) - 1
            seq.draft_token_ids = draft[: max(0, room)]
            tree = parents.get(seq_id)
            seq.draft_parents = None if tree is None else tree[: len(seq.draft_token_ids)]

    def _admit_loaded_grammars(self) -> None:
        """Hand the scheduler the requests whose grammars are ready (errors resurface in the worker)."""
        if not self._loading:
            return
        if not self.scheduler.has_work():  # nothing else to run: wait here rather than spin the loop
            wait(list(self._loading.values()), timeout=0.05, return_when=FIRST_COMPLETED)
        for request_id, future in list(self._loading.items()):
            if future.done():
                del self._loading[request_id]
                live = self.requests.get(request_id)  # None: aborted while its grammar loaded
                if live is not None:
                    self.scheduler.add(live.seq)

    def _plan(self, scheduled: SchedulerOutput) -> StepPlan:
        plan = StepPlan(finished_seq_ids=self._finished)
        self._finished = []
        for item in scheduled.scheduled:
            seq = item.seq
            live = self.requests[seq.seq_id]
            if not live.introduced:
                live.introduced = True
                r = live.request
                plan.new_sequences.append(
                    NewSequence(seq.seq_id, r.prompt_token_ids, r.params, r.seed, r.eos_token_ids, r.images)
                )
            end = item.start + item.num_tokens - item.num_draft
            plan.chunks.append(
                ScheduledChunk(
                    seq_id=seq.seq_id,
                    start=item.start,
                    token_ids=seq.token_slice(item.start, end) + seq.draft_token_ids[: item.num_draft],
                    full_blocks=seq.blocks.full,
                    local_blocks=seq.blocks.local,
                    samples=item.samples,
                    num_draft=item.num_draft,
                    draft_parents=None
                    if seq.draft_parents is None or not item.num_draft
                    else seq.draft_parents[: item.num_draft],
                )
            )
        plan.fresh_full_blocks, plan.fresh_local_blocks = self.kv.full.take_fresh(), self.kv.local.take_fresh()
        return plan

    def _append(self, live: _Live, results: list[SampleResult]) -> EngineCoreOutput:
        """Append a step's tokens (several when drafts were accepted), up to the first that ends the sequence."""
        seq, request, params = live.seq, live.request, live.request.params
        out = EngineCoreOutput(request.request_id, [], num_cached_tokens=seq.num_cached_tokens)
        if params.logprobs is not None:
            out.new_logprobs = []
        if live.prompt_logprobs is not None:
            out.prompt_logprobs, live.prompt_logprobs = live.prompt_logprobs, None
        for result in results:
            token = result.token_id
            seq.output_token_ids.append(token)
            out.new_token_ids.append(token)
            if out.new_logprobs is not None:
                out.new_logprobs.append({token: result.logprob, **dict(result.top_logprobs or [])})
            n_out = len(seq.output_token_ids)
            if n_out >= params.min_tokens and (
                token in (params.stop_token_ids or ()) or (not params.ignore_eos and token in request.eos_token_ids)
            ):
                out.finish_reason, out.stop_reason = "stop", token
            elif n_out >= seq.max_tokens or seq.num_tokens >= self.context_length:
                out.finish_reason = "length"
            if out.finish_reason is not None:
                self._finish(live)
                break
        return out

    def _finish(self, live: _Live) -> None:
        self.scheduler.finish(live.seq)
        del self.requests[live.request.request_id]
        if live.introduced:
            self._finished.append(live.request.request_id)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (they also stop when this process exits)."""
        self._grammar_loader.shutdown(wait=False, cancel_futures=True)
        for worker in self.workers:
            if isinstance(worker, TensorParallelDriver):
                worker.close()

    # -- state (metrics, tests, admin routes) -------------------------------------------------------------

    def stats(self) -> EngineStats:
        cache, pool = self.prefix_cache, self.kv.full
        # Blocks the prefix cache alone holds are free for the taking: counting them as used would read
        # near 100% on an idle server after a load run. Waiting sequences hold no blocks (see Scheduler).
        held = len({block for seq in self.scheduler.running for block in seq.blocks.full})
        total = max(1, pool.num_blocks)
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._loading),
            kv_usage=held / total,
            kv_cached_usage=(pool.num_used - held) / total,
            prefix_hit_rate=cache.hit_rate if cache is not None else 0.0,
            num_preemptions=self.scheduler.num_preemptions,
            spec_verify_ct=self.spec_stats.verify_steps,
            spec_accepted_tokens=self.spec_stats.tokens,
        )

    def reset_prefix_cache(self) -> bool:
        """Drop every cached prefix; refused (False) while requests run, as SGLang's /flush_cache is."""
        if self.requests:
            return False
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        return True
