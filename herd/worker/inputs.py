"""A step plan's chunks as model inputs: one flattened token axis, positions, and the attention batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from herd.layers.attention import AttentionBatch, DraftTree, PoolTables
from herd.worker.plan import ScheduledChunk


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] absolute position of each token in its sequence
    attention: AttentionBatch
    sample_rows: torch.Tensor  # [S] rows of the token axis whose logits are sampled, in chunk order (drafts' too)
    query_starts: list[int]  # [B + 1] where each chunk's tokens start on the token axis


def build_step_inputs(
    chunks: list[ScheduledChunk], block_size: int, chunk_size: int | None, device: torch.device
) -> StepInputs:
    ids: list[int] = []
    positions: list[int] = []
    starts = [0]
    context_lens, sample_rows = [], []
    trees: list[DraftTree | None] = []
    for chunk in chunks:
        ids += chunk.token_ids
        tree = DraftTree(chunk.draft_parents) if chunk.num_draft and chunk.draft_parents is not None else None
        trees.append(tree)
        if tree is None:
            positions += range(chunk.start, chunk.end)
        else:  # a draft's position is the root's plus its depth (its slot is still the next one in line)
            root = chunk.end - chunk.num_draft - 1
            positions += range(chunk.start, root + 1)
            positions += [root + d for d in tree.depths()]
        starts.append(starts[-1] + len(chunk.token_ids))
        context_lens.append(chunk.end)
        if chunk.samples:
            sample_rows += range(starts[-1] - 1 - chunk.num_draft, starts[-1])
    full = [c.full_blocks for c in chunks]
    local = [c.local_blocks for c in chunks]
    attention = AttentionBatch(
        query_start_loc=starts,
        context_lens=context_lens,
        block_size=block_size,
        chunk_size=chunk_size,
        full=PoolTables(full, _slots(full, chunks, block_size, device)),
        local=PoolTables(local, _slots(local, chunks, block_size, device)),
        device=device,
        trees=trees if any(t is not None for t in trees) else None,
    )
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        attention=attention,
        sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
        query_starts=starts,
    )


def _slots(
    tables: list[list[int]], chunks: list[ScheduledChunk], block_size: int, device: torch.device
) -> torch.Tensor:
    """Physical slot of every new token: table[pos // block_size] * block_size + pos % block_size."""
    bs = block_size
    slots: list[int] = []
    for table, chunk in zip(tables, chunks, strict=True):
        if not table:  # a model without layers of this kind
            slots += [0] * len(chunk.token_ids)
            continue
        slots += [table[p // bs] * bs + p % bs for p in range(chunk.start, chunk.end)]
    return torch.tensor(slots, dtype=torch.long, device=device)
