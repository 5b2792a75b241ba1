"""The whole contract between the engine core and a worker: what to compute in one step.

Plain data (ids, positions, block tables), the same for every rank, so tensor parallelism sends one plan
to several workers and changes nothing else. A sequence is introduced once (`NewSequence`: its prompt,
sampling parameters and images); after that each step names only the tokens it computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from herd.multimodal import RequestImages
from herd.sampling import SamplingParams


@dataclass
class NewSequence:
    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    eos_token_ids: frozenset[int]  # banned before params.min_tokens (with params.stop_token_ids)
    images: RequestImages | None = None


@dataclass
class ScheduledChunk:
    seq_id: str
    start: int  # position of the first token computed this step
    token_ids: list[int]  # the tokens at positions [start, start + len(token_ids))
    full_blocks: list[int]  # block table in the full pool (global layers)
    local_blocks: list[int]  # block table in the local pool (chunked layers), -1 where released
    samples: bool  # this chunk ends at the sequence's last token: sample its next one
    # Speculative decoding: the last num_draft token_ids are drafts after the sequence's last token, each
    # sampled row verifying one (see herd.worker.spec_step).
    num_draft: int = 0
    # A tree of drafts (EAGLE topk > 1): each draft's parent among the drafts, -1 for the sequence's last token;
    # None: a chain.
    draft_parents: list[int] | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass
class StepPlan:
    new_sequences: list[NewSequence] = field(default_factory=list)
    chunks: list[ScheduledChunk] = field(default_factory=list)
    finished_seq_ids: list[str] = field(default_factory=list)  # forget these (finished or aborted)
    fresh_full_blocks: list[int] = field(default_factory=list)  # blocks used for the first time: zero them
    fresh_local_blocks: list[int] = field(default_factory=list)
