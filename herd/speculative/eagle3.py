"""EAGLE-3 drafting: a one-layer draft model reads three of the target's hidden states and guesses a chain, or
with topk > 1 a tree (its accepted path comes back as the rows of the tokens that stand, like a chain's).

Each step the draft model is told what the target computed (hidden states of the positions whose KV now
stands, and the token that follows each), then drafts greedily. Its own cache is cut back first to the
step's first position, so rejected drafts and recomputed prefixes (preemption) leave nothing behind.

A sequence whose prompt began with a prefix-cache hit was never shown the cached positions. The draft then
numbers its positions from the first one it saw: its attention uses RoPE, which only sees distances, so the
shift changes nothing but which earlier positions it can attend to (those it holds).
"""

from __future__ import annotations

import logging

import torch

from herd.speculative.base import Proposer, StepSeq

logger = logging.getLogger(__name__)


class Eagle3Proposer(Proposer):
    def __init__(self, drafter, num_draft: int, topk: int = 1, num_draft_tokens: int = 0) -> None:
        # drafter: herd.models.eagle3_drafter.Eagle3Drafter; topk > 1: a tree of num_draft_tokens - 1 drafts,
        # num_draft deep (SGLang's num_steps)
        super().__init__(num_draft)
        self.topk, self.num_draft_tokens = topk, num_draft_tokens
        self.drafter = drafter
        self.aux_layer_ids = tuple(drafter.target_layer_ids)
        self._offsets: dict[str, int] = {}  # target position of each sequence's draft position 0

    def propose(self, seqs: list[StepSeq], aux_hidden: torch.Tensor | None) -> dict[str, list[int]]:
        assert aux_hidden is not None, "EAGLE-3 needs the target's auxiliary hidden states"
        drafts: dict[str, list[int]] = {}
        self.last_parents = {}
        for s in seqs:
            if s.num_valid == 0:
                continue
            start = self._draft_position(s.seq_id, s.start)
            # The token after each valid position: prompt or accepted output, the last one just sampled (or,
            # mid-prefill, the next prompt token).
            following = s.tokens[s.start + 1 : s.start + s.num_valid + 1]
            ids = torch.tensor(following, dtype=torch.long, device=aux_hidden.device)
            self.drafter.truncate(s.seq_id, start)
            self.drafter.extend(s.seq_id, ids, aux_hidden[s.rows][: s.num_valid], start)
            if s.wants_draft and self.topk > 1:
                drafts[s.seq_id], self.last_parents[s.seq_id] = self.drafter.draft_tree(
                    s.seq_id, self.num_draft, self.topk, self.num_draft_tokens
                )
            elif s.wants_draft:
                drafts[s.seq_id] = self.drafter.draft(s.seq_id, self.num_draft)
        return drafts

    def _draft_position(self, seq_id: str, start: int) -> int:
        """The draft's position for the target's position `start` (see the module's note on prefix hits)."""
        offset = self._offsets.get(seq_id)
        if offset is None or not 0 <= start - offset <= self.drafter.length(seq_id):
            # New, or recomputed from elsewhere than the draft's cache covers (after preemption): start over.
            self.drafter.release(seq_id)
            offset = self._offsets[seq_id] = start
        return start - offset

    def release(self, seq_id: str) -> None:
        self.drafter.release(seq_id)
        self._offsets.pop(seq_id, None)


def load_eagle3_proposer(config, target, dtype: torch.dtype, device: torch.device) -> Eagle3Proposer:
    """The draft checkpoint at config.draft_model_path, checked against the target (it shares its embedding)."""
    from herd.layers.quantization.unquantized import cpu_packing_available
    from herd.models.llama4_eagle3 import load_eagle3_draft  # the draft model: only when EAGLE-3 is on

    if device.type == "cpu":
        # On a CPU the draft's small ops run faster in fp32, its matmuls from oneDNN's packed bf16 weights (half
        # the bytes to fetch after the target's forward has evicted them). A draft's precision only changes how
        # many of its guesses stand, never the output.
        dtype = torch.float32
    drafter = load_eagle3_draft(
        config.draft_model_path,
        target.config,
        dtype=dtype,
        device=device,
        target_embedding=target.model.embed_tokens.weight,
    )
    drafter.packed_matmuls = cpu_packing_available(device, torch.bfloat16)  # see DraftStep
    if config.eagle_topk > 1:
        logger.info(
            "EAGLE-3 tree drafting: %d steps, top-%d children, %d tokens verified per step (the best %d nodes + root)",
            config.num_steps, config.eagle_topk, config.num_draft_tokens, config.num_draft_tokens - 1,
        )  # fmt: skip
    return Eagle3Proposer(drafter, config.num_steps, config.eagle_topk, config.num_draft_tokens)
