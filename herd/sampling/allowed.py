"""Sampling a constrained row again among the tokens its grammar allows, after it refused the unmasked draw.

The sampler draws a constrained row (greedy or plain temperature) from its unmasked distribution first; when
the grammar refuses the token, the row is sampled again from the masked distribution (herd.sampling.sampler
explains why that is exact). Masking the whole row means a pass over the vocabulary for every refused row;
here the work follows the allowed tokens instead: a JSON number allows ~1k of Llama 4's 202k, a key or a
bracket a handful. The drawn rows reuse the probabilities of their first draw: the masked distribution is
those of the allowed tokens, renormalised, so no softmax runs again.

Only the allowed values cross to the CPU (a few thousand at most, from a GPU too); the rest is numpy on small
arrays, where a torch op's own cost would be most of the work. Row independence (see herd.sampling.sampler)
holds: the rows' allowed values go into one [R, A] layout, A the most any of them allows, padded with zeros
(or -inf for logits); a row's prefix sums (sequential), its max and its last non-zero entry do not depend on
how wide the layout is, so its token does not depend on the other rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from herd.sampling.grammar import StepMask
from herd.sampling.penalties import adjusted_logits, adjusts, as_index
from herd.sampling.state import SamplingState

# Rows whose bitmask has more words that allow something than this are left to be masked whole: inside a
# JSON string nearly all of Llama 4's 202k tokens are allowed (6.2k of its 6.3k words), and gathering them
# would cost as much. A JSON number's digits take ~800 words, a key's first token a few hundred.
SPARSE_WORDS = 2048
# A drawn row whose allowed tokens all had a first-draw probability below this (their logits far below the
# row's best) is masked whole: in float32 their probabilities would have lost precision, or be 0.
SMALLEST_MAX = 2.0**-60


def sample_allowed(
    logits: torch.Tensor,  # [B, V]
    tokens: torch.Tensor,  # [B], where the tokens go
    rows: list[int],  # greedy or plain-temperature rows whose first token the grammar refused
    states: Sequence[SamplingState],
    mask: StepMask,  # holds those rows' bitmasks
    probs: torch.Tensor | None,  # [D, V]: the unmasked distributions of the first draw's drawn rows
    probs_row: dict[int, int],  # batch row -> its row in probs
) -> list[int]:
    """Sample `rows` again among their allowed tokens, into `tokens`; return the rows left to mask whole.

    Each drawn row takes one more number from its generator, the rows returned none (their caller draws it).
    """
    busy = mask.busy_words(rows)
    whole = [i for i, n in zip(rows, busy, strict=True) if n > SPARSE_WORDS]
    greedy = [i for i, n in zip(rows, busy, strict=True) if n <= SPARSE_WORDS and states[i].params.greedy]
    drawn = [i for i, n in zip(rows, busy, strict=True) if n <= SPARSE_WORDS and not states[i].params.greedy]
    if greedy:
        _argmax_allowed(logits, tokens, greedy, states, mask)
    if drawn:
        assert probs is not None
        whole += _draw_allowed(probs, tokens, drawn, states, mask, [probs_row[i] for i in drawn])
    return whole


def _argmax_allowed(
    logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], states: Sequence[SamplingState], mask: StepMask
) -> None:
    """The first maximal allowed logit of each row: ids ascend within a row, as in an argmax of the masked row."""
    vocab = logits.shape[1]
    j, ids, slots, place = _layout(mask, rows, vocab)
    if any(adjusts(states[i]) for i in rows):
        source, at = adjusted_logits(logits, rows, states), j * vocab + ids  # [R, V]: a copy of the rows
    else:
        source, at = logits, np.asarray(rows)[j] * vocab + ids
    values = np.full(place.shape, -np.inf, dtype=np.float32)
    values.reshape(-1)[slots] = _gather(source, at)
    _put(tokens, rows, place[np.arange(len(rows)), values.argmax(1)])


def _draw_allowed(
    probs: torch.Tensor,
    tokens: torch.Tensor,
    rows: list[int],
    states: Sequence[SamplingState],
    mask: StepMask,
    probs_rows: list[int],
) -> list[int]:
    """An inverse-CDF draw from each row's first-draw probabilities of its allowed tokens; the rows whose
    largest such probability is below SMALLEST_MAX are returned undrawn."""
    vocab = probs.shape[1]
    j, ids, slots, place = _layout(mask, rows, vocab)
    p = np.zeros(place.shape)  # float64
    p.reshape(-1)[slots] = _gather(probs, np.asarray(probs_rows)[j] * vocab + ids)
    ok = p.max(1) >= SMALLEST_MAX
    u = np.array([states[i].uniform() if good else 0.0 for i, good in zip(rows, ok.tolist(), strict=True)])
    cum = np.cumsum(p, axis=1)  # sequential along a row: its entries do not depend on the padding after it
    k = (cum <= (u * cum[:, -1])[:, None]).sum(1)  # the first place where the prefix sum passes the target
    last = p.shape[1] - 1 - np.argmax(p[:, ::-1] > 0, axis=1)  # never a token of probability 0
    chosen = place[np.arange(len(rows)), np.minimum(k, last)]
    _put(tokens, [i for i, good in zip(rows, ok.tolist(), strict=True) if good], chosen[ok])
    return [i for i, good in zip(rows, ok.tolist(), strict=True) if not good]


def _layout(mask: StepMask, rows: list[int], vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rows' allowed tokens laid out in an [R, A] grid: per token its row j (in `rows`), its id and its slot
    in the flattened grid; and the grid of ids itself (`place`, 0 in the padding)."""
    per_row = mask.allowed(rows, vocab)
    counts = np.array([len(ids) for ids in per_row])
    width = max(int(counts.max()), 1)
    j = np.repeat(np.arange(len(rows)), counts)
    ids = np.concatenate(per_row)
    slots = j * width + (np.arange(len(ids)) - np.repeat(np.cumsum(counts) - counts, counts))
    place = np.zeros((len(rows), width), dtype=np.int64)
    place.reshape(-1)[slots] = ids
    return j, ids, slots, place


def _gather(source: torch.Tensor, at: np.ndarray) -> np.ndarray:
    """source.flatten()[at], on the CPU: on a GPU only these few values cross, not the rows."""
    if source.device.type == "cpu":  # numpy's gather of a few thousand values: a tenth of torch's time
        return source.reshape(-1).numpy()[at]
    return source.reshape(-1)[torch.from_numpy(at).to(source.device)].cpu().numpy()


def _put(tokens: torch.Tensor, rows: list[int], values: np.ndarray) -> None:
    if rows:
        tokens[as_index(rows, tokens.device)] = torch.from_numpy(np.ascontiguousarray(values)).to(tokens.device)
