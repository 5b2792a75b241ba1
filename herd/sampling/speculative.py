"""Speculative verification: which draft tokens stand, and the target's token after them.

The drafts are a greedy chain, so the draft distribution at each position is a point mass q = 1[d].
Leviathan et al.'s rule with that q: accept d with probability min(1, p(d) / q(d)) = p(d); on rejection draw
from the residual max(0, p - q), which is p with d removed, renormalised. Then the token at each position is
distributed exactly as p, whatever the drafter proposed: P(d) = p(d), P(x != d) = (1 - p(d)) * p(x) / (1 - p(d)).
When every draft stands, one more token comes from the target's distribution after the last draft.

Greedy rows are one-hot in p: a draft stands iff it is the target's argmax, and the "residual draw" is that
argmax. They draw no random number, so greedy verification is exactly greedy decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from herd.sampling.params import SamplingParams
from herd.sampling.sampler import _inverse_cdf  # the sampler's own draw: same tokens for the same number


def can_speculate(params: SamplingParams) -> bool:
    """Whether a sequence's sampling distribution is the same at every draft position.

    Penalties, grammars, pending min_tokens bans and logprobs depend on the tokens before each position (or
    want per-token figures); such sequences decode one token per step.
    """
    return (
        params.repetition_penalty == 1.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and params.min_tokens == 0
        and params.logprobs is None
        and params.grammar is None
        and params.structured is None
    )


def verify_chain(
    probs: torch.Tensor,  # [k + 1, V]: the target's sampling distribution at each draft position and after
    draft: Sequence[int],  # k draft tokens
    uniform: Callable[[], float] | None,  # the sequence's own random numbers; None for greedy (one-hot probs)
) -> list[int]:
    """The tokens the step adds: the accepted prefix of `draft`, then one token of the target's."""
    assert probs.shape[0] == len(draft) + 1, f"{probs.shape[0]} rows for {len(draft)} drafts"
    if uniform is None:
        target = probs.argmax(-1).tolist()
        out: list[int] = []
        for d, t in zip(draft, target, strict=False):
            if d != t:
                break
            out.append(d)
        return [*out, target[len(out)]]
    accepted_p = probs[torch.arange(len(draft)), torch.tensor(draft, dtype=torch.long)].tolist()
    for j, d in enumerate(draft):
        if uniform() < accepted_p[j]:
            continue
        residual = probs[j].clone()
        residual[d] = 0.0  # the correction step: the token was offered and refused
        return [*draft[:j], _draw(residual, uniform())]
    return [*draft, _draw(probs[-1], uniform())]


def _draw(probs: torch.Tensor, u: float) -> int:
    """One token from unnormalised probabilities [V] with the uniform number u."""
    u_t = torch.tensor([u], dtype=torch.float64, device=probs.device)
    return int(_inverse_cdf(probs[None], u_t)[0])
