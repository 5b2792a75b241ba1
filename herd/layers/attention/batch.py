"""What every attention backend is told about one step's batch, before it builds its own metadata.

The batch is the new tokens of several sequences concatenated on one token axis. Each sequence's new
tokens continue its context: a sequence with `context_len` tokens after this step and `n` new tokens owns
context positions `context_len - n .. context_len - 1`, in that order. KV lives in paged pools, one per
attention kind: global (NoPE) layers use the `full` pool, chunked local layers the `local` pool. A block
table lists a sequence's blocks in logical order (block j holds context positions `j*block_size ...`); the
local table may hold -1 for blocks released because no query can see them any more.

Speculative tree drafts (`DraftTree`): a sequence's last new tokens may be a tree hanging from the token
before them. They take consecutive slots like any new tokens, but each sits at the position root + its depth
and sees the context and its own ancestors only (`span_mask`); after verification the worker moves the KV of
the accepted path to the consecutive positions it stands for.

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
class DraftTree:
    """The last len(parents) new tokens of a sequence: parents[j] is draft j's parent among them, -1 the root
    (the new token before the drafts); every parent comes before its children."""

    parents: list[int]

    def depths(self) -> list[int]:
        """Per draft, its distance from the root (1 for the root's children): its position is root's + this."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def ancestry(self) -> torch.Tensor:
        """bool [m, m]: [a, b] is True where draft b is draft a or one of its ancestors."""
        anc = torch.eye(len(self.parents), dtype=torch.bool)
        for j, p in enumerate(self.parents):
            if p >= 0:
                anc[j] |= anc[p]
        return anc


def span_mask(first_q: int, ctx: int, kv_start: int, chunk: int | None, tree: DraftTree | None) -> torch.Tensor:
    """bool [ctx - first_q, ctx - kv_start]: which of the slots kv_start .. ctx - 1 the new tokens in slots
    first_q .. ctx - 1 see: causal, each draft of a tree its ancestors only, and on chunked layers (chunk) only
    keys whose position is in the query's own attention chunk (positions, not slots: a draft's is its depth's)."""
    q_slot = torch.arange(first_q, ctx)[:, None]
    k_slot = torch.arange(kv_start, ctx)[None, :]
    mask = k_slot <= q_slot
    q_pos, k_pos = q_slot, k_slot
    if tree is not None:
        first_draft = ctx - len(tree.parents)
        pos = torch.arange(kv_start, ctx)
        pos[first_draft - kv_start :] = first_draft - 1 + torch.tensor(tree.depths())
        q_pos, k_pos = pos[first_q - kv_start :, None], pos[None, :]
        mask[:, first_draft - kv_start :] = False
        mask[first_draft - first_q :, first_draft - kv_start :] = tree.ancestry()
    if chunk is not None:
        mask &= k_pos >= (q_pos // chunk) * chunk
    return mask


@dataclass
class AttentionBatch:
    query_start_loc: list[int]  # [B + 1] offsets of each sequence's new tokens on the token axis
    context_lens: list[int]  # [B] tokens in each context once this step's tokens are added
    block_size: int
    chunk_size: int | None  # the chunked layers' attention chunk; None when the model has none
    full: PoolTables
    local: PoolTables
    device: torch.device
    trees: list[DraftTree | None] | None = None  # per sequence, its draft tree (None: none in this step)

    def tree(self, i: int) -> DraftTree | None:
        return None if self.trees is None else self.trees[i]

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (the step CUDA graphs and torch.compile serve)."""
        return self.query_start_loc[-1] == self.num_seqs
