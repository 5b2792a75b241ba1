"""The draft tree's attention mask and positions, against their definitions walked node by node."""

from __future__ import annotations

import pytest
import torch

from herd.layers.attention.batch import DraftTree, span_mask
from herd.worker.inputs import build_step_inputs
from herd.worker.plan import ScheduledChunk

PARENTS = [-1, -1, 0, 0, 1, 2, 5]  # depths 1 1 2 2 2 3 4


def reference_mask(first_q: int, ctx: int, kv_start: int, chunk: int | None, parents: list[int]) -> torch.Tensor:
    first_draft = ctx - len(parents)

    def lineage(slot: int) -> tuple[int, set[int]]:
        """(position, slots the token at `slot` may see before chunking): the committed context and its own
        ancestors (and itself) in the tree."""
        if slot < first_draft:
            return slot, set(range(slot + 1))
        j, seen = slot - first_draft, set(range(first_draft))
        depth = 0
        while j >= 0:
            seen.add(first_draft + j)
            depth += 1
            j = parents[j]
        return first_draft - 1 + depth, seen

    mask = torch.zeros(ctx - first_q, ctx - kv_start, dtype=torch.bool)
    for q in range(first_q, ctx):
        q_pos, seen = lineage(q)
        for k in range(kv_start, ctx):
            k_pos, _ = lineage(k)
            in_chunk = chunk is None or k_pos >= q_pos // chunk * chunk
            mask[q - first_q, k - kv_start] = k in seen and in_chunk
    return mask


@pytest.mark.parametrize("chunk", [None, 8, 4], ids=["global", "chunk-8", "chunk-4"])
@pytest.mark.parametrize("root", [5, 6, 7, 10])
def test_tree_mask_is_ancestors_and_context_in_the_query_chunk(chunk: int | None, root: int) -> None:
    """Roots before, at and after chunk boundaries: trees 4 deep cross them (chunk 4: twice)."""
    ctx = root + 1 + len(PARENTS)
    for first_q in (root, root - 2):  # a decode root alone, and a root with tokens before it
        kv_start = 0 if chunk is None else first_q // chunk * chunk
        got = span_mask(first_q, ctx, kv_start, chunk, DraftTree(PARENTS))
        assert torch.equal(got, reference_mask(first_q, ctx, kv_start, chunk, PARENTS))


def test_tree_positions_are_depths_and_slots_stay_in_line() -> None:
    chunk = ScheduledChunk("s", 9, [1, *range(10, 17)], [0, 1, 2, 3, 4], [], True, num_draft=7, draft_parents=PARENTS)
    inputs = build_step_inputs([chunk], block_size=4, chunk_size=8, device=torch.device("cpu"))
    assert inputs.positions.tolist() == [9, 10, 10, 11, 11, 11, 12, 13]
    assert inputs.attention.full.slot_mapping.tolist() == list(range(9, 17))  # blocks 0..4 in order
    assert inputs.sample_rows.tolist() == list(range(8))  # the root's row and one per draft
    assert DraftTree(PARENTS).depths() == [1, 1, 2, 2, 2, 3, 4]
