"""`--speculative-num-steps / -eagle-topk / -num-draft-tokens` checked as SGLang reads them."""

from __future__ import annotations

import pytest

from herd.config.fields import ArgumentError
from herd.config.speculative import speculative_config


def eagle(steps: int | None, topk: int | None, tokens: int | None):
    return speculative_config("EAGLE3", "draft", steps, topk, tokens)


def test_tree_shapes_sglang_accepts() -> None:
    c = eagle(3, 4, 8)
    assert (c.num_steps, c.eagle_topk, c.num_draft_tokens) == (3, 4, 8)
    c = eagle(4, 2, 8)
    assert (c.num_steps, c.eagle_topk, c.num_draft_tokens) == (4, 2, 8)
    assert eagle(1, 4, 5).num_draft_tokens == 5  # every child of the root
    assert eagle(3, 1, None).num_draft_tokens == 4  # a chain


@pytest.mark.parametrize(
    ("steps", "topk", "tokens", "words"),
    [
        (1, 4, 6, ["--speculative-num-draft-tokens 6", "--speculative-num-steps 1", "--speculative-eagle-topk 4", "5"]),
        (2, 2, 8, ["--speculative-num-draft-tokens 8", "--speculative-num-steps 2", "--speculative-eagle-topk 2", "7"]),
        (3, 1, 8, ["--speculative-num-draft-tokens 8", "--speculative-num-steps 3"]),
        (3, 2, 1, ["--speculative-num-draft-tokens 1", "no draft token"]),
    ],
)
def test_conflicting_shapes_name_both_numbers(steps: int, topk: int, tokens: int, words: list[str]) -> None:
    with pytest.raises(ArgumentError) as error:
        eagle(steps, topk, tokens)
    for word in words:
        assert word in str(error.value)
