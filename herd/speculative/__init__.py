"""Speculative decoding's drafters (herd.speculative.base.Proposer), made from a `SpeculativeConfig`.

Verification and rejection sampling live in herd.sampling.speculative; the worker runs both.
"""

from __future__ import annotations

import torch

from herd.config.engine import SpeculativeConfig
from herd.speculative.base import Proposer, StepSeq
from herd.speculative.ngram import NgramProposer

__all__ = ["Proposer", "StepSeq", "make_proposer"]


def make_proposer(config: SpeculativeConfig, target, dtype: torch.dtype, device: torch.device) -> Proposer | None:
    """target: the text decoder (herd.models.llama4_text.Llama4ForCausalLM) the drafts are verified by."""
    if config.algorithm is None:
        return None
    if config.algorithm == "NGRAM":
        return NgramProposer(config.num_steps, config.ngram_min_match, config.ngram_max_match)
    from herd.speculative.eagle3 import load_eagle3_proposer

    return load_eagle3_proposer(config, target, dtype, device)
