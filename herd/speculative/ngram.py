"""NGRAM (prompt lookup) drafting: when the text's last n tokens appeared before, guess that what followed
them then follows them now. No model, no state: it reads the token history, and shines where the output
copies its context (editing code, quoting, summarising with the source's words).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from herd.speculative.base import Proposer, StepSeq

# The history searched for a match, from its end: bounds a draft's cost on very long contexts.
SEARCH_WINDOW = 8192


def ngram_draft(tokens: Sequence[int], num_draft: int, min_match: int, max_match: int) -> list[int]:
    """Up to `num_draft` tokens that followed the earlier occurrence of the longest suffix of `tokens`
    (at least min_match, at most max_match tokens long; the most recent among equally long ones);
    [] when no suffix of min_match tokens occurred before."""
    window = tokens[-SEARCH_WINDOW:]
    last = len(window) - 1
    if last < 1:
        return []
    best, best_len = -1, 0
    # Every earlier occurrence of the last token ends a candidate match; walk back to measure it.
    for end in range(last - 1, -1, -1):
        if window[end] != window[last]:
            continue
        n = 1
        while n < max_match and n <= end and window[end - n] == window[last - n]:
            n += 1
        if n > best_len:
            best, best_len = end, n
            if n == max_match:
                break
    if best_len < min_match:
        return []
    return list(window[best + 1 : best + 1 + num_draft])


class NgramProposer(Proposer):
    def __init__(self, num_draft: int, min_match: int, max_match: int) -> None:
        super().__init__(num_draft)
        self.min_match, self.max_match = min_match, max_match

    def propose(self, seqs: list[StepSeq], aux_hidden: torch.Tensor | None) -> dict[str, list[int]]:
        return {
            s.seq_id: ngram_draft(s.tokens, self.num_draft, self.min_match, self.max_match)
            for s in seqs
            if s.wants_draft
        }
