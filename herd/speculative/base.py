"""The drafter seam: what a speculative proposer sees of each step, and what it answers.

After the target's forward and verification, the worker hands the proposer one `StepSeq` per sequence that
ran: which positions now hold valid KV (rejected drafts excluded), the tokens that follow them, and the rows
of the target's hidden states that computed them. The proposer answers draft tokens for the sequences that
asked for them. NGRAM needs only the token history; EAGLE-3 also the target's auxiliary hidden states.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class StepSeq:
    seq_id: str
    start: int  # first position the target computed this step
    num_valid: int  # positions [start, start + num_valid) hold valid KV now (accepted drafts included)
    # Their rows on the step's token axis: the first num_valid rows of the sequence's chunk, or for a draft tree
    # the root's rows and then the accepted path's (an index tensor).
    rows: slice | torch.Tensor
    tokens: Sequence[int]  # the sequence's whole history: prompt + output, the accepted tokens included
    wants_draft: bool  # it sampled this step and may speculate: propose its next drafts


class Proposer(ABC):
    # Target decoder layers whose output hidden states the proposer reads (concatenated in this order).
    aux_layer_ids: tuple[int, ...] = ()

    def __init__(self, num_draft: int) -> None:
        self.num_draft = num_draft  # tokens to propose per sequence per step
        # Tree proposers: per sequence of the last `propose`, each draft's parent among its drafts (-1: the
        # sequence's last token). Sequences missing here drafted a chain.
        self.last_parents: dict[str, list[int]] = {}

    @abstractmethod
    def propose(self, seqs: list[StepSeq], aux_hidden: torch.Tensor | None) -> dict[str, list[int]]:
        """Draft tokens for each sequence with `wants_draft` (an empty list: nothing worth verifying).

        aux_hidden: [T, len(aux_layer_ids) * H] for the step's whole token axis, or None without aux layers.
        """

    def release(self, seq_id: str) -> None:  # noqa: B027  (stateless proposers keep nothing)
        """Forget a finished or aborted sequence."""
