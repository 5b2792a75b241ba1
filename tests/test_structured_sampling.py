"""Constrained rows in the sampler: draw first from the unmasked distribution, sample again among the allowed
tokens when the grammar refuses (herd.sampling.sampler, herd.sampling.allowed).

The reference is the masked distribution itself: `Sampler.probs`, which masks every row whole before it
normalises (checked against xgrammar's own kernel in tests/test_structured.py). The demo tokenizer's 2k
vocabulary keeps the grammars small and the checks exhaustive.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from herd.frontend.structured import GrammarCompiler
from herd.frontend.tokenizer import load_tokenizer
from herd.sampling import Sampler, SamplingParams, SamplingState
from herd.sampling import allowed as allowed_module
from herd.sampling.grammar import GrammarBlob, GrammarMasker, StepMask, StructuredOutput, register_vocabulary

DEMO = "herd/demo/model"
VOCAB = 2050 + 14  # a padded logits width, as in the engine: ids past the tokenizer are never allowed
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["name", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def grammars() -> tuple[GrammarCompiler, dict[str, GrammarBlob]]:
    tokenizer = load_tokenizer(Path(DEMO))
    compiler = GrammarCompiler(tokenizer, VOCAB, tokenizer.eos_token_ids)
    register_vocabulary(compiler.vocabulary)
    blobs = {
        "digits": compiler.compile(StructuredOutput("regex", "[0-9]+")),
        "json": compiler.compile(StructuredOutput("json_schema", json.dumps(SCHEMA))),
    }
    return compiler, blobs


def constrained(blob: GrammarBlob, prefix: str = "", *, seed: int = 0, **params: object) -> SamplingState:
    state = SamplingState(SamplingParams(grammar=blob, **params), [1, 2], seed=seed)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(Path(DEMO))
    for token in tokenizer.encode(prefix, add_special_tokens=False):
        state.append_token(token)
    return state


def allowed_set(state: SamplingState) -> set[int]:
    assert state.grammar is not None
    mask = GrammarMasker().fill([state.grammar], VOCAB)
    assert mask is not None
    return set(mask.allowed([0], VOCAB)[0].tolist())


def refusing_logits(allowed_ids: set[int], seed: int) -> torch.Tensor:
    """[VOCAB] logits whose unmasked draw is refused about 70% of the time, with distinct allowed probabilities."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=g)
    ids = torch.tensor(sorted(allowed_ids))
    logits[ids] = torch.linspace(-1.0, 1.5, len(ids))  # a clear, uneven distribution over the allowed tokens
    forbidden = torch.ones(VOCAB, dtype=torch.bool)
    forbidden[ids] = False
    # The forbidden tokens together hold ~70% of the unmasked mass.
    mass_allowed = logits[ids].exp().sum()
    logits[forbidden] += float(torch.log(2.3 * mass_allowed / logits[forbidden].exp().sum()))
    return logits


# -- draw first, sample again when refused: the masked distribution ------------------------------------------


@pytest.mark.parametrize("path", ["sparse", "whole", "underflow"])
def test_refused_draws_come_from_the_masked_distribution(
    grammars: tuple[GrammarCompiler, dict[str, GrammarBlob]], path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over 6,000 draws of rows refused ~70% of the time, the tokens follow the masked distribution (chi-square)
    and are all allowed. Without the second draw the forbidden tokens would show; drawing it from anything but
    p(x) / p(A) (the first draw's probabilities of the allowed tokens, renormalised) fails the chi-square."""
    if path == "whole":  # every refused row masked whole instead of gathered
        monkeypatch.setattr(allowed_module, "SPARSE_WORDS", 0)
    _, blobs = grammars
    rows = [constrained(blobs["digits"], "1", seed=s) for s in range(200)]
    ids = allowed_set(rows[0])
    assert 5 <= len(ids) < 200
    logits = refusing_logits(ids, seed=1)
    if path == "underflow":  # the allowed tokens far below the rest: their float32 first-draw probabilities are 0
        logits[torch.tensor(sorted(ids))] -= 200.0
    expected = Sampler().probs(logits[None], rows[:1])[0].double()
    batch = logits.expand(len(rows), VOCAB).contiguous()
    sampler = Sampler()
    counts = np.zeros(VOCAB)
    for _ in range(30):  # the rows' grammars move ahead to each draw and back at the next call
        for r in sampler(batch, rows):
            counts[r.token_id] += 1
    assert set(np.flatnonzero(counts).tolist()) <= ids
    order = sorted(ids)
    observed, wanted = counts[order], expected[order].numpy() * counts.sum()
    assert chisquare(observed, wanted / wanted.sum() * observed.sum()).pvalue > 1e-4


def test_first_draws_were_refused_in_the_test_above(grammars: tuple[GrammarCompiler, dict[str, GrammarBlob]]) -> None:
    """The logits of the test above really send most first draws to the second one."""
    _, blobs = grammars
    state = constrained(blobs["digits"], "1")
    ids = allowed_set(state)
    probs = torch.softmax(refusing_logits(ids, seed=1), -1)
    assert 0.2 < float(probs[sorted(ids)].sum()) < 0.4


def test_greedy_rows_take_the_masked_argmax(grammars: tuple[GrammarCompiler, dict[str, GrammarBlob]]) -> None:
    _, blobs = grammars
    state = constrained(blobs["json"], '{"name": "ab", "n": ', temperature=0)
    ids = allowed_set(state)
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2))
    logits[next(t for t in range(VOCAB) if t not in ids)] = 50.0  # the argmax is refused: the second pass decides
    top_allowed = max(ids, key=lambda t: float(logits[t]))
    assert Sampler()(logits[None], [state])[0].token_id == top_allowed
    logits[top_allowed] = 100.0  # allowed and the argmax: taken at once
    assert Sampler()(logits[None], [state])[0].token_id == top_allowed
    tied = sorted(ids)[:2]  # ties among allowed tokens below a refused argmax: the first, as in the masked row
    logits[tied] = 80.0
    assert Sampler()(logits[None], [state])[0].token_id == tied[0]


def test_rows_with_top_k_top_p_or_min_p_are_masked_first(
    grammars: tuple[GrammarCompiler, dict[str, GrammarBlob]],
) -> None:
    """Filters after the mask: top_k=1 of the masked distribution is its best allowed token, every time."""
    _, blobs = grammars
    rows = [constrained(blobs["digits"], "1", seed=s, top_k=1) for s in range(50)]
    ids = allowed_set(rows[0])
    logits = refusing_logits(ids, seed=3)
    best = max(ids, key=lambda t: float(logits[t]))
    tokens = {r.token_id for r in Sampler()(logits.expand(len(rows), VOCAB).contiguous(), rows)}
    assert tokens == {best}


def test_a_constrained_row_does_not_depend_on_the_batch(
    grammars: tuple[GrammarCompiler, dict[str, GrammarBlob]],
) -> None:
    """A seeded constrained row gives the same tokens alone and beside rows that allow other numbers of
    tokens (the second draw's layout is as wide as the widest of them), greedy, free and top-p rows."""
    _, blobs = grammars

    def run(extra: list[SamplingState]) -> list[int]:
        states = [*extra[:2], constrained(blobs["json"], seed=42), *extra[2:]]
        watch = min(2, len(extra))
        noise = torch.Generator().manual_seed(len(states))
        out = []
        for step in range(40):
            logits = torch.randn(len(states), VOCAB, generator=noise) * 3
            logits[watch] = torch.randn(VOCAB, generator=torch.Generator().manual_seed(step)) * 3
            results = Sampler()(logits, states)
            for s, r in zip(states, results, strict=True):
                s.append_token(r.token_id)
            out.append(results[watch].token_id)
        return out

    alone = run([])
    assert len(set(alone)) > 5
    others = [
        constrained(blobs["digits"], seed=1),
        constrained(blobs["json"], '{"name": "', seed=2),
        constrained(blobs["json"], seed=3, temperature=0),
        constrained(blobs["digits"], seed=4, top_p=0.9),
        SamplingState(SamplingParams(), [1], seed=5),
    ]
    assert run(others) == alone


# -- the grammar state and the mask's allowed ids ------------------------------------------------------------


def test_try_accept_agrees_with_the_bitmask(grammars: tuple[GrammarCompiler, dict[str, GrammarBlob]]) -> None:
    """For every token of the vocabulary (special and padding ids too), in states of both grammars."""
    _, blobs = grammars
    for blob, prefix in [(blobs["json"], ""), (blobs["json"], '{"name": "a'), (blobs["json"], '{"name": "a", "n": 1'),
                         (blobs["digits"], "12")]:  # fmt: skip
        state = constrained(blob, prefix)
        ids = allowed_set(state)
        assert state.grammar is not None
        taken = {t for t in range(VOCAB) if state.grammar.try_accept(t)}  # each rolls the one before back
        assert taken == ids, prefix


def test_a_token_moved_ahead_is_confirmed_once_or_rolled_back(
    grammars: tuple[GrammarCompiler, dict[str, GrammarBlob]],
) -> None:
    _, blobs = grammars
    prefix = '{"name": "ab", "n": '

    def after(*tokens: int) -> set[int]:
        reference = constrained(blobs["json"], prefix)
        for token in tokens:
            reference.append_token(token)
        return allowed_set(reference)

    state = constrained(blobs["json"], prefix)
    grammar = state.grammar
    assert grammar is not None
    first = min(allowed_set(state))
    assert grammar.try_accept(first)
    assert allowed_set(state) == after()  # not appended: read again, the matcher is where it was
    assert grammar.try_accept(first)
    state.append_token(first)  # confirmed, not accepted a second time
    assert allowed_set(state) == after(first) != after()
    digit, other = sorted(allowed_set(state))[:2]
    assert grammar.try_accept(digit)
    state.append_token(other)  # the engine appends another token than the one moved ahead: that one counts
    assert not grammar.failed and allowed_set(state) == after(first, other)


@pytest.mark.parametrize("vocab", [1000, 1003, 70])
def test_allowed_ids_are_the_set_bits_below_the_vocabulary(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32 + 1  # a word past the vocabulary too
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, words), dtype=torch.int32, generator=generator)
    bitmask[1] = 0
    bitmask[2, 1:] = 0
    bits = ((bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().view(4, -1)
    cache: dict[bytes, np.ndarray] = {}
    for _ in range(2):  # filled, then read from the cache
        got = StepMask(bitmask, [0, 1, 2, 3], cache).allowed([3, 0, 1, 2], vocab)
        for ids, row in zip(got, [3, 0, 1, 2], strict=True):
            assert ids.tolist() == torch.nonzero(bits[row, :vocab]).flatten().tolist()
    assert len(cache) == 4
    assert StepMask(bitmask, [0, 1, 2, 3]).busy_words([0, 1, 2]) == [int((bitmask[0] != 0).sum()), 0, 1]
