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


def children_of(parents: Sequence[int]) -> list[list[int]]:
    """Per node (the root first, then each draft), its children's draft indices in order. parents[j]: draft j's
    parent among the drafts, -1 for the root."""
    kids: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for j, p in enumerate(parents):
        kids[p + 1].append(j)
    return kids


def verify_tree(
    probs: torch.Tensor,  # [n + 1, V]: the target's distribution after the root (row 0) and after each draft
    draft: Sequence[int],  # n draft tokens
    parents: Sequence[int],  # parent of each draft (-1: the root), every parent before its children
    uniform: Callable[[], float] | None,
) -> tuple[list[int], list[int]]:
    """(the tokens the step adds, the draft indices of the accepted path).

    Walk from the root: at each node offer its children in order, each as a point-mass draft (Leviathan et al.
    with q = 1[c]): accept c with probability p'(c), else zero c in p' (the correction step) and renormalise.
    The children are distinct tokens, so each refusal leaves exactly the residual the next offer needs, and the
    token chosen at the node (accepted child, or a draw from what is left) is distributed as p. Accepting moves
    to that child and repeats with its row; the first node where nothing stands ends the path with its draw.
    Greedy: the target's argmax, followed while some child carries it.
    """
    assert probs.shape[0] == len(draft) + 1 == len(parents) + 1, f"{probs.shape[0]} rows for {len(draft)} drafts"
    kids = children_of(parents)
    path: list[int] = []
    node = 0  # row of the current node: 0 the root, j + 1 draft j
    if uniform is None:
        target = probs.argmax(-1).tolist()
        while True:
            t = target[node]
            nxt = next((c for c in kids[node] if draft[c] == t), None)
            if nxt is None:
                return [*(draft[j] for j in path), t], path
            path.append(nxt)
            node = nxt + 1
    while True:
        residual = probs[node].clone()
        mass = float(residual.sum())  # of what is left: the row's 1, less each refused child's share
        for c in kids[node]:
            p_c = float(residual[draft[c]])
            if uniform() * mass < p_c:  # accept with probability p_c / mass: the renormalised residual's
                break
            residual[draft[c]] = 0.0  # the correction step: offered and refused
            mass -= p_c
        else:
            return [*(draft[j] for j in path), _draw(residual, uniform())], path
        path.append(c)
        node = c + 1
