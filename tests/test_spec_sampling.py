"""Rejection sampling of draft chains: greedy is exact, and sampling keeps the target's distribution."""

from __future__ import annotations

import pytest
import torch

from herd.sampling import Sampler, SamplingParams, SamplingState
from herd.sampling import speculative as spec
from herd.sampling.speculative import can_speculate, verify_chain, verify_tree

scipy_stats = pytest.importorskip("scipy.stats")

VOCAB = 6
DRAWS = 10_000


def target_probs(params: SamplingParams, rows: int, seed: int = 0) -> torch.Tensor:
    """[rows, VOCAB]: the distribution the sampler would draw from, after temperature and top-p."""
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 1.5
    state = SamplingState(params, [1, 2, 3], seed=0)
    return Sampler().probs(logits, [state] * rows)


def test_greedy_accepts_exactly_the_argmax_prefix() -> None:
    probs = target_probs(SamplingParams(temperature=0.0), rows=4)
    argmax = probs.argmax(-1).tolist()
    assert verify_chain(probs, argmax[:3], None) == argmax  # all accepted, then the bonus token
    wrong = (argmax[1] + 1) % VOCAB
    assert verify_chain(probs, [argmax[0], wrong, argmax[2]], None) == argmax[:2]  # corrected at the miss


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the counts under probs (renormalised in float64; zero-probability tokens left out)."""
    p = probs.double()
    kept = p > 0
    expected = p[kept] / p[kept].sum() * counts.sum().double()
    return float(scipy_stats.chisquare(counts[kept].double().numpy(), expected.numpy()).pvalue)


def first_token_counts(probs: torch.Tensor, draft: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB)
    for _ in range(DRAWS):
        token = verify_chain(probs, draft, lambda: float(torch.rand((), generator=gen, dtype=torch.float64)))[0]
        counts[token] += 1
    return counts


@pytest.mark.parametrize("draft_rank", [0, 2], ids=["likely-draft", "unlikely-draft"])
def test_sampled_tokens_follow_the_target_distribution(draft_rank: int) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.95)
    probs = target_probs(params, rows=2, seed=1)
    draft = [int(probs[0].argsort(descending=True)[draft_rank])]
    counts = first_token_counts(probs, draft, seed=2)
    assert counts[probs[0] == 0].sum() == 0  # top-p removed these: never drawn
    assert chi_square_p(counts, probs[0]) > 1e-3, (counts, probs[0] * DRAWS)


def test_the_chi_square_test_sees_a_missing_correction_step() -> None:
    """Without zeroing the refused draft in the residual, the draft token comes out too often: the test sees it."""
    params = SamplingParams(temperature=0.8)
    probs = target_probs(params, rows=2, seed=1)
    draft = [int(probs[0].argsort(descending=True)[1])]

    def uncorrected(p: torch.Tensor, d, uniform):
        if uniform() < float(p[0, d[0]]):
            return [d[0]]
        return [spec._draw(p[0], uniform())]  # draws from p itself: the refused token may come back

    gen = torch.Generator().manual_seed(2)
    counts = torch.zeros(VOCAB)
    for _ in range(DRAWS):
        counts[uncorrected(probs, draft, lambda: float(torch.rand((), generator=gen, dtype=torch.float64)))[0]] += 1
    assert chi_square_p(counts, probs[0]) < 1e-6


def test_params_that_depend_on_earlier_tokens_do_not_speculate() -> None:
    assert can_speculate(SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, seed=3))
    for bad in (
        {"repetition_penalty": 1.1},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"min_tokens": 4},
        {"logprobs": 2},
    ):
        assert not can_speculate(SamplingParams(**bad)), bad


# A draft tree over the 6-token vocabulary: the root's children are drafts 0, 1 and 2; draft 3 hangs from draft 1
# (so it is reached only after a refused first child), draft 4 from draft 3.
TREE_PARENTS = [-1, -1, -1, 1, 3]


def tree_draft(probs: torch.Tensor) -> list[int]:
    """Unlikely tokens first: most draws refuse a child or two, so the residual's correction is exercised."""
    rank = probs.argsort(dim=-1, descending=True)
    return [int(rank[0, 3]), int(rank[0, 1]), int(rank[0, 0]), int(rank[2, 2]), int(rank[4, 0])]


def test_greedy_tree_follows_the_argmax_through_any_child() -> None:
    probs = target_probs(SamplingParams(temperature=0.0), rows=6, seed=3)
    argmax = probs.argmax(-1).tolist()
    draft = [(argmax[0] + 1) % VOCAB, argmax[0], (argmax[0] + 2) % VOCAB, argmax[2], (argmax[4] + 1) % VOCAB]
    # Root -> draft 1 (the target's argmax, second child) -> draft 3 (argmax after draft 1) -> draft 4 is wrong.
    tokens, path = verify_tree(probs, draft, TREE_PARENTS, None)
    assert path == [1, 3]
    assert tokens == [argmax[0], argmax[2], argmax[4]]
    assert verify_tree(probs[:4], draft[:3], [-1, -1, -1], None) == ([argmax[0], argmax[2]], [1])


def tree_counts(
    probs: torch.Tensor, draft: list[int], seed: int, walk=verify_tree
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of the first token, and of the second token when the first is draft 1 (the second child)."""
    gen = torch.Generator().manual_seed(seed)
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for _ in range(DRAWS):
        tokens, _ = walk(probs, draft, TREE_PARENTS, lambda: float(torch.rand((), generator=gen, dtype=torch.float64)))
        first[tokens[0]] += 1
        if tokens[0] == draft[1] and len(tokens) > 1:
            second[tokens[1]] += 1
    return first, second


def test_tree_sampling_follows_the_target_distribution() -> None:
    """The first token is distributed as the root's row, and after an accepted second child as that child's row
    (row 2), whatever the tree offered."""
    params = SamplingParams(temperature=1.0)
    probs = target_probs(params, rows=6, seed=4)
    draft = tree_draft(probs)
    first, second = tree_counts(probs, draft, seed=5)
    assert chi_square_p(first, probs[0]) > 1e-3, (first, probs[0] * DRAWS)
    assert second.sum() > 500
    assert chi_square_p(second, probs[2]) > 1e-3, (second, probs[2] * second.sum())


def test_the_chi_square_test_sees_a_tree_walk_without_correction() -> None:
    """Offering each child with its plain probability and drawing from the whole row at the end (no refused
    child removed, no renormalisation) over-produces the drafts: the test sees it."""
    params = SamplingParams(temperature=1.0)
    probs = target_probs(params, rows=6, seed=4)
    draft = tree_draft(probs)

    def uncorrected(p: torch.Tensor, d, parents, uniform):
        kids = spec.children_of(parents)
        node, path = 0, []
        while True:
            for c in kids[node]:
                if uniform() < float(p[node, d[c]]):
                    break
            else:
                return [*(d[j] for j in path), spec._draw(p[node], uniform())], path
            path.append(c)
            node = c + 1

    first, _ = tree_counts(probs, draft, seed=5, walk=uncorrected)
    assert chi_square_p(first, probs[0]) < 1e-6
