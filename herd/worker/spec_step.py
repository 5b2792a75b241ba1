"""A step's sampling with speculative decoding: plain rows through the sampler, draft chains verified, and
the proposer told what stands so that it can draft the next step.

A chunk with `num_draft` drafts has num_draft + 1 sampled rows: row j holds the target's distribution at the
position of draft j (the last row: after the last draft). `herd.sampling.speculative.verify_chain` turns them
into the step's tokens for that sequence. A tree of drafts (`chunk.draft_parents`) has one row per draft too,
after the root's: `verify_tree` walks it and names the accepted path, whose rows (root first) are the ones
whose KV now stands, once the worker has moved it to consecutive positions.
"""

from __future__ import annotations

import torch

from herd.sampling import Sampler, SampleResult, SamplingState
from herd.sampling.speculative import can_speculate, verify_chain, verify_tree
from herd.speculative import Proposer, StepSeq
from herd.worker.plan import ScheduledChunk


def sample_chunks(
    sampler: Sampler,
    logits: torch.Tensor,  # [S, V]: the sampled rows of the step, in chunk order
    chunks: list[ScheduledChunk],
    states: dict[str, SamplingState],
    paths: dict[str, list[int]] | None = None,  # filled: per tree chunk, the draft indices of its accepted path
) -> list[list[SampleResult]]:
    """The tokens each sampling chunk adds, in chunk order (one unless drafts were accepted)."""
    sampling = [c for c in chunks if c.samples]
    out: list[list[SampleResult]] = [[] for _ in sampling]
    plain_rows, plain_at = [], []  # rows the sampler takes in one batch, and whose results they are
    row = 0
    for i, chunk in enumerate(sampling):
        if chunk.num_draft:
            state = states[chunk.seq_id]
            rows = logits[row : row + chunk.num_draft + 1]
            probs = sampler.probs(rows, [state] * len(rows))
            draft = chunk.token_ids[-chunk.num_draft :]
            uniform = None if state.params.greedy else state.uniform
            if chunk.draft_parents is None:
                tokens = verify_chain(probs, draft, uniform)
            else:
                tokens, path = verify_tree(probs, draft, chunk.draft_parents, uniform)
                if paths is not None:
                    paths[chunk.seq_id] = path
            out[i] = [SampleResult(t) for t in tokens]
        else:
            plain_rows.append(row)
            plain_at.append(i)
        row += chunk.num_draft + 1
    if plain_rows:
        rows = logits if len(plain_rows) == len(logits) else logits[plain_rows]
        results = sampler(rows, [states[sampling[i].seq_id] for i in plain_at])
        for i, result in zip(plain_at, results, strict=True):
            out[i] = [result]
    for chunk, results in zip(sampling, out, strict=True):
        for result in results:
            states[chunk.seq_id].append_token(result.token_id)
    return out


def propose(
    proposer: Proposer,
    chunks: list[ScheduledChunk],
    results: list[list[SampleResult]],
    states: dict[str, SamplingState],
    query_starts: list[int],
    aux_hidden: torch.Tensor | None,
    paths: dict[str, list[int]] | None = None,  # per tree chunk, its accepted path (sample_chunks)
) -> dict[str, list[int]]:
    """Tell the proposer what the step left standing; its drafts for the sequences that may speculate."""
    seqs, sampled = [], iter(results)
    for i, chunk in enumerate(chunks):
        state = states[chunk.seq_id]
        num_valid = len(chunk.token_ids) - chunk.num_draft
        rows: slice | torch.Tensor = slice(query_starts[i], query_starts[i] + num_valid)
        if chunk.samples:
            accepted = len(next(sampled)) - 1  # the accepted drafts
            path = paths.get(chunk.seq_id) if paths is not None and chunk.draft_parents is not None else None
            if path is not None:  # the root's rows, then the path's (not consecutive on the token axis)
                first_draft = query_starts[i] + num_valid
                rows = torch.tensor([*range(rows.start, rows.stop), *(first_draft + j for j in path)])
            num_valid += accepted
            if path is None:
                rows = slice(query_starts[i], query_starts[i] + num_valid)
        seqs.append(
            StepSeq(
                seq_id=chunk.seq_id,
                start=chunk.start,
                num_valid=num_valid,
                rows=rows,
                tokens=state.prompt_token_ids + state.output_token_ids,
                wants_draft=chunk.samples and can_speculate(state.params),
            )
        )
    return proposer.propose(seqs, aux_hidden)
