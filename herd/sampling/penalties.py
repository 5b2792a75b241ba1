"""Logits adjustments before sampling: logit_bias, the min_tokens ban, repetition / presence / frequency
penalties, and (for greedy rows) the grammar's mask.

Row-independent like the rest of the sampler: every change is an exact elementwise op on one row's
own entries, and the penalties touch only the (row, token) pairs a row has seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from herd.sampling.grammar import StepMask
from herd.sampling.state import SamplingState


def adjusted_logits(
    logits: torch.Tensor, rows: list[int], states: Sequence[SamplingState], mask: StepMask | None = None
) -> torch.Tensor:
    """The rows' logits after logit_bias, min_tokens, penalties and then `mask`, the grammar's.

    May be `logits` itself (when nothing changes and `rows` is every row): never modify it in place. Drawn
    rows pass no mask: the sampler masks the copy that dividing by the temperature makes anyway.
    """
    sub_states = [states[i] for i in rows]
    masked = mask is not None and not set(mask.rows).isdisjoint(rows)
    if not masked and not any(map(adjusts, sub_states)):
        return take_rows(logits, rows, copy=False)
    x = take_rows(logits, rows, copy=True)
    _adjust(x, sub_states)
    if mask is not None and masked:
        mask.apply(x, rows)
    return x


def adjusts(state: SamplingState) -> bool:
    p = state.params
    return bool(p.logit_bias) or bool(state.banned_token_ids()) or _penalised(state)


def _penalised(state: SamplingState) -> bool:
    p = state.params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _adjust(x: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """logit_bias, the min_tokens ban and the penalties, in place on x ([len(states), V])."""
    vocab = x.shape[1]
    bias = [(r, t, b) for r, s in enumerate(states) for t, b in (s.params.logit_bias or {}).items() if t < vocab]
    if bias:
        rows, cols, values = zip(*bias, strict=True)
        x.index_put_((as_index(rows, x.device), as_index(cols, x.device)), as_floats(values, x.device), accumulate=True)
    banned = [(r, t) for r, s in enumerate(states) for t in s.banned_token_ids() if t < vocab]
    if banned:
        rows, cols = zip(*banned, strict=True)
        x[as_index(rows, x.device), as_index(cols, x.device)] = float("-inf")
    _penalise(x, states)


def _penalise(x: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """Repetition, presence and frequency penalties, in place on a contiguous x.

    Sparse: only the (row, token) pairs a row has seen are read and written, so the cost follows the
    number of tokens, not rows x vocabulary.
    """
    vocab, device = x.shape[1], x.device
    flat = x.view(-1)
    rep = [r for r, s in enumerate(states) if s.params.repetition_penalty != 1.0]
    if rep:
        # HF / vLLM rule over every token seen in prompt or output: divide a positive logit by the
        # penalty, multiply a negative one, so a penalty > 1 always makes the token less likely.
        seen = [torch.cat([states[r].prompt_ids(device), _output_ids(states[r], device)]) for r in rep]
        at = torch.unique(_flat_positions(seen, rep, vocab))  # each seen token once per row
        penalty = as_floats([s.params.repetition_penalty for s in states], device)[at // vocab]
        v = flat[at]
        flat[at] = torch.where(v > 0, v / penalty, v * penalty)
    pf = [r for r, s in enumerate(states) if s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0]
    if pf:
        # OpenAI: logit -= frequency_penalty * count + presence_penalty * (count > 0), output tokens only.
        outputs = [_output_ids(states[r], device) for r in pf]
        at, counts = torch.unique(_flat_positions(outputs, pf, vocab), return_counts=True)
        row = at // vocab
        frequency = as_floats([s.params.frequency_penalty for s in states], device)[row]
        presence = as_floats([s.params.presence_penalty for s in states], device)[row]
        flat[at] = flat[at] - frequency * counts - presence


def _output_ids(state: SamplingState, device: torch.device) -> torch.Tensor:
    return torch.tensor(state.output_token_ids, dtype=torch.long, device=device)


def _flat_positions(ids: Sequence[torch.Tensor], rows: Sequence[int], vocab: int) -> torch.Tensor:
    """Positions in the flattened [B, vocab] batch of each row's token ids (ids outside the vocabulary dropped)."""
    cols = torch.cat(list(ids))
    device = cols.device
    starts = torch.repeat_interleave(as_index(rows, device) * vocab, as_index([len(i) for i in ids], device))
    return (starts + cols)[cols < vocab]


def take_rows(x: torch.Tensor, rows: Sequence[int], *, copy: bool) -> torch.Tensor:
    """x's rows `rows`: x itself when that is every row (a contiguous copy if asked), else a copy."""
    if len(rows) == x.shape[0]:
        return x.clone(memory_format=torch.contiguous_format) if copy else x
    return x[as_index(rows, x.device)]


def as_index(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def as_floats(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)
