"""Speculative decoding flags (SGLang's names) -> a checked `SpeculativeConfig`.

SGLang counts `--speculative-num-draft-tokens` with the token the target verifies anyway: a chain of
`--speculative-num-steps` drafts verifies `num_steps + 1` tokens. herd keeps that meaning, so an SGLang
launch line means the same here. With `--speculative-eagle-topk` K > 1 the drafts are a tree: step 1 draws the K
best children of the root, each later step the K best children of each of the K best frontier nodes, so S steps
draw K + (S - 1) K^2 nodes, and the N - 1 best of them (N = num-draft-tokens) are verified with the root; N - 1
cannot exceed what S and K draw. Flags that contradict each other fail at start, naming both values.
"""

from __future__ import annotations

from herd.config.engine import SpeculativeConfig
from herd.config.fields import ArgumentError

# EAGLE is SGLang's name for the EAGLE family; herd loads EAGLE-3 drafts only, so both names mean one thing.
ALGORITHMS = ("EAGLE3", "EAGLE", "NGRAM")
EAGLE_DEFAULT_STEPS = 3
# Prompt lookup is cheap to draft and costs the target little more per extra token on a CPU.
NGRAM_DEFAULT_DRAFT_TOKENS = 8


def speculative_config(
    algorithm: str | None,
    draft_model_path: str | None,
    num_steps: int | None,
    eagle_topk: int | None,
    num_draft_tokens: int | None,
    ngram_min_match: int = 1,
    ngram_max_match: int = 12,
) -> SpeculativeConfig:
    if algorithm is None:
        given = {
            "--speculative-draft-model-path": draft_model_path,
            "--speculative-num-steps": num_steps,
            "--speculative-eagle-topk": eagle_topk,
            "--speculative-num-draft-tokens": num_draft_tokens,
        }
        for flag, value in given.items():
            if value is not None:
                raise ArgumentError(f"{flag} {value!r} needs --speculative-algorithm (one of {', '.join(ALGORITHMS)})")
        return SpeculativeConfig()
    algorithm = algorithm.upper()
    if algorithm not in ALGORITHMS:
        raise ArgumentError(
            f"--speculative-algorithm {algorithm!r} is not supported; choose from {', '.join(ALGORITHMS)}"
        )
    for flag, value in (
        ("--speculative-num-steps", num_steps),
        ("--speculative-eagle-topk", eagle_topk),
        ("--speculative-num-draft-tokens", num_draft_tokens),
        ("--speculative-ngram-min-match-window-size", ngram_min_match),
        ("--speculative-ngram-max-match-window-size", ngram_max_match),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ArgumentError(f"{flag} must be a positive integer, got {value!r}")
    if algorithm == "NGRAM":
        return _ngram(draft_model_path, num_steps, eagle_topk, num_draft_tokens, ngram_min_match, ngram_max_match)
    return _eagle(draft_model_path, num_steps, eagle_topk, num_draft_tokens)


def _eagle(path: str | None, num_steps: int | None, topk: int | None, num_draft: int | None) -> SpeculativeConfig:
    if path is None:
        raise ArgumentError("--speculative-algorithm EAGLE3 needs --speculative-draft-model-path")
    topk = topk or 1
    if num_steps is None:
        num_steps = num_draft - 1 if num_draft is not None and num_draft > 1 and topk == 1 else EAGLE_DEFAULT_STEPS
    if topk == 1:
        num_draft = num_steps + 1 if num_draft is None else num_draft
        if num_draft != num_steps + 1:
            raise ArgumentError(
                f"--speculative-num-draft-tokens {num_draft} conflicts with --speculative-num-steps {num_steps}: "
                f"with --speculative-eagle-topk 1 a chain of {num_steps} drafts verifies {num_steps + 1} tokens"
            )
    else:
        # A tree: step 1 draws topk children of the root, each later step topk children of each of the topk best
        # frontier nodes; the num_draft - 1 best nodes drawn (plus the root) are verified.
        drawn = topk + (num_steps - 1) * topk * topk
        if num_draft is None:
            num_draft = min(drawn, 2 * topk * num_steps) + 1
        if num_draft < 2:
            raise ArgumentError(
                f"--speculative-num-draft-tokens {num_draft} leaves no draft token (it counts the verified one)"
            )
        if num_draft - 1 > drawn:
            raise ArgumentError(
                f"--speculative-num-draft-tokens {num_draft} is more than --speculative-num-steps {num_steps} with "
                f"--speculative-eagle-topk {topk} can draw: at most {drawn} drafts + 1 = {drawn + 1} tokens"
            )
    return SpeculativeConfig(
        algorithm="EAGLE3", draft_model_path=path, num_steps=num_steps, eagle_topk=topk, num_draft_tokens=num_draft
    )


def _ngram(
    path: str | None, num_steps: int | None, topk: int | None, num_draft: int | None, min_match: int, max_match: int
) -> SpeculativeConfig:
    if path is not None:
        raise ArgumentError(
            f"--speculative-algorithm NGRAM drafts from the context, not a model: "
            f"drop --speculative-draft-model-path {path!r}"
        )
    if topk is not None and topk > 1:
        raise ArgumentError(f"--speculative-eagle-topk {topk} is for EAGLE drafts, not --speculative-algorithm NGRAM")
    if num_draft is None:
        num_draft = num_steps + 1 if num_steps is not None else NGRAM_DEFAULT_DRAFT_TOKENS
    elif num_steps is not None and num_draft != num_steps + 1:
        raise ArgumentError(
            f"--speculative-num-draft-tokens {num_draft} conflicts with --speculative-num-steps {num_steps}: "
            f"a chain of {num_steps} drafts verifies {num_steps + 1} tokens"
        )
    if num_draft < 2:
        raise ArgumentError(
            f"--speculative-num-draft-tokens {num_draft} leaves no draft token (it counts the verified one)"
        )
    if min_match > max_match:
        raise ArgumentError(
            f"--speculative-ngram-min-match-window-size {min_match} is above "
            f"--speculative-ngram-max-match-window-size {max_match}"
        )
    return SpeculativeConfig(
        algorithm="NGRAM",
        num_steps=num_draft - 1,
        eagle_topk=1,
        num_draft_tokens=num_draft,
        ngram_min_match=min_match,
        ngram_max_match=max_match,
    )
