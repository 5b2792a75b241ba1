"""Sampling: parameter validation, each filter and penalty on crafted logits, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from herd.sampling import Sampler, SamplingParams, SamplingState

EOS = 2
sampler = Sampler()


def state(params: SamplingParams, prompt: list[int] | None = None, seed: int | None = None) -> SamplingState:
    return SamplingState(params, prompt or [0], seed=seed, eos_token_ids=[EOS])


def sample(logits: torch.Tensor, states: list[SamplingState]) -> list[int]:
    return [r.token_id for r in sampler(logits, states)]


def crafted(probs: dict[int, float], vocab: int) -> torch.Tensor:
    """Logits over `vocab` tokens whose softmax is `probs` (the other tokens get nothing)."""
    logits = torch.full((vocab,), float("-inf"))
    for token, p in probs.items():
        logits[token] = math.log(p)
    return logits


# -- SamplingParams ------------------------------------------------------------------------------------

BAD = [
    ("n", 0),
    ("temperature", -0.1),
    ("temperature", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_k", -2),
    ("top_k", 1.5),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.1),
    ("max_tokens", 0),
    ("min_tokens", -1),
    ("min_tokens", 17),  # > max_tokens (16)
    ("stop", [1]),
    ("stop_token_ids", [-1]),
    ("seed", "7"),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logit_bias", {"5": 101}),  # the message shows the offending entry: "logit_bias['5'] ... got 101"
    ("logit_bias", {"x": 1}),
    ("ignore_eos", "yes"),
]


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_invalid_value_names_parameter_and_value(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{name}\b") as e:
        SamplingParams(**{name: value})
    shown = [repr(v) for v in value.values()] + [repr(k) for k in value] if isinstance(value, dict) else [repr(value)]
    assert any(f"got {v}" in str(e.value) for v in shown), str(e.value)


def test_range_in_message() -> None:
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)


def test_defaults_and_normalisation() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1, 1.0, 1.0, 0, 0.0, 16)
    assert not p.greedy and SamplingParams(temperature=0).greedy
    p = SamplingParams(top_k=-1, stop="###", logit_bias={"7": 5, 8: -1}, max_tokens=None, min_tokens=100)
    assert p.top_k == 0 and p.stop == ["###"] and p.stop_token_ids == [] and p.logit_bias == {7: 5.0, 8: -1.0}
    assert SamplingParams(seed=-(2**70)).seed == -(2**70)  # any int: the state folds it into 64 bits
    SamplingParams(stop_token_ids=[5], logit_bias={9: 1}).check_vocab(10)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={10: 1}).check_vocab(10)


# -- greedy, logit_bias, min_tokens --------------------------------------------------------------------


def test_greedy_takes_argmax_beside_sampled_rows() -> None:
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=5)]
    states = [state(params[i % 2], seed=i) for i in range(6)]
    tokens = sample(logits, states)
    assert tokens[::2] == logits[::2].argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_forces_a_token(temperature: float) -> None:
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=temperature, logit_bias={"123": 100})
    assert sample(logits, [state(params, seed=i) for i in range(4)]) == [123] * 4
    # A bias of -100 takes the argmax out of reach.
    top = int(logits[0].argmax())
    assert sample(logits[:1], [state(SamplingParams(temperature=0, logit_bias={top: -100}))]) != [top]


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_bans_eos_and_stop_tokens_until_reached(ignore_eos: bool) -> None:
    stop = 7
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[stop], ignore_eos=ignore_eos)
    s = state(params)
    logits = crafted({stop: 0.5, EOS: 0.3, 11: 0.2}, 20)[None]
    seen = []
    for _ in range(3):
        seen += sample(logits, [s])
        s.append_token(seen[-1])
    # Under ignore_eos, EOS ends nothing, so it is not banned; stop tokens are.
    assert seen == ([EOS] * 3 if ignore_eos else [11] * 3)
    assert sample(logits, [s]) == [stop]  # min_tokens reached: allowed again
    assert sample(crafted({EOS: 0.6, stop: 0.4}, 20)[None], [s]) == [EOS]


# -- top-k, top-p, min-p, temperature: only the allowed set, with the right frequencies ----------------

# Tokens spread over blocks of the two-level draw (1024 wide) and into the partial last one; 3000
# tokens in all, the others impossible.
VOCAB = 3000
PROBS = {5: 0.4, 1023: 0.3, 1024: 0.15, 2999: 0.1, 2048: 0.05}

CASES = [
    # (params, expected distribution before renormalising)
    (dict(), PROBS),
    (dict(top_k=2), {5: 0.4, 1023: 0.3}),
    (dict(top_p=0.75), {5: 0.4, 1023: 0.3, 1024: 0.15}),  # mass before 1024 is 0.7 < 0.75; before 2999, 0.85
    (dict(top_p=0.3), {5: 0.4}),
    (dict(min_p=0.3), {5: 0.4, 1023: 0.3, 1024: 0.15}),  # floor 0.12
    # top-p applies to the top-k renormalised distribution: [0.47, 0.35, 0.18] -> mass before 1024 is 0.82
    (dict(top_k=3, top_p=0.8), {5: 0.4, 1023: 0.3}),
    (dict(top_k=4, min_p=0.3, top_p=0.99), {5: 0.4, 1023: 0.3, 1024: 0.15}),
    (dict(temperature=2.0), {t: math.sqrt(p) for t, p in PROBS.items()}),
    # tempered (p^2, renormalised): 0.54, 0.31, 0.08, 0.03: mass before 1024 is 0.85, before 2999 0.92
    (dict(temperature=0.5, top_p=0.9), {5: 0.16, 1023: 0.09, 1024: 0.0225}),
]


@pytest.mark.parametrize(("kwargs", "expected"), CASES, ids=[str(c[0]) for c in CASES])
def test_filters_keep_the_allowed_set_with_renormalised_frequencies(kwargs: dict, expected: dict) -> None:
    draws = 4000
    params = SamplingParams(**kwargs)
    logits = crafted(PROBS, VOCAB).expand(draws, VOCAB)
    states = [state(params, seed=1000 + i) for i in range(draws)]
    total = sum(expected.values())
    want = {t: p / total for t, p in expected.items()}

    probs = sampler.probs(logits[:1], states[:1])[0]
    assert set(probs.nonzero().flatten().tolist()) == set(want)
    for t, p in want.items():
        assert probs[t].item() == pytest.approx(p, rel=1e-5)

    counts = torch.bincount(torch.tensor(sample(logits, states)), minlength=VOCAB)
    assert set(counts.nonzero().flatten().tolist()) == set(want)
    for t, p in want.items():
        # five standard deviations: loose, and the seeds are fixed
        assert abs(counts[t].item() / draws - p) <= 5 * math.sqrt(p * (1 - p) / draws) + 1e-3, (t, p)


def test_top_p_with_a_wide_nucleus_matches_a_full_sort() -> None:
    """Nuclei wider than the first widths top-p looks at, up to a whole-row sort."""
    vocab = 10_000
    gen = torch.Generator().manual_seed(3)
    scales = torch.tensor([0.1, 2.0, 3.0, 8.0])  # from a nearly flat distribution to a peaked one
    logits = torch.randn(len(scales), vocab, generator=gen) * scales[:, None]
    states = [state(SamplingParams(top_p=0.9, seed=i)) for i in range(len(scales))]
    probs = sampler.probs(logits, states)
    sizes = []
    for row in range(len(scales)):
        p = torch.softmax(logits[row].double(), -1)
        ordered = p.sort(descending=True)
        before = ordered.values.cumsum(0) - ordered.values
        nucleus = set(ordered.indices[before < 0.9].tolist())
        assert set(probs[row].nonzero().flatten().tolist()) == nucleus
        sizes.append(len(nucleus))
    # every width top-p tries (128, 4096, then the whole row) decides some row
    assert sizes[0] > 4096 and 128 < sizes[1] <= 4096 and 128 < sizes[2] <= 4096 and sizes[3] <= 128, sizes


# -- penalties -----------------------------------------------------------------------------------------


def adjusted(params: SamplingParams, logits: torch.Tensor, prompt: list[int], output: list[int]) -> torch.Tensor:
    """The logits after penalties, read back from the distribution at temperature 1 (log p up to a constant)."""
    s = state(params, prompt)
    for t in output:
        s.append_token(t)
    logp = sampler.probs(logits[None], [s])[0].log()
    return logp - logp[0] + logits[0]  # token 0 is never penalised below: it anchors the constant


def test_repetition_penalty_lowers_seen_tokens_of_either_sign() -> None:
    logits = torch.tensor([0.0, 2.0, -2.0, 3.0, -1.0, 1.0])
    got = adjusted(SamplingParams(repetition_penalty=2.0), logits, prompt=[1, 2], output=[3, 4, 4])
    # prompt and output tokens alike, once however often seen: positive halved, negative doubled
    assert got.tolist() == pytest.approx([0.0, 1.0, -4.0, 1.5, -2.0, 1.0], abs=1e-5)
    # greedy sees it too: the penalised favourite loses
    s = state(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[3])
    assert sample(logits[None], [s]) == [1]


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0])
    # token 1 in the prompt only; token 2 once in the output; token 3 three times
    presence = adjusted(SamplingParams(presence_penalty=0.5), logits, prompt=[1], output=[2, 3, 3, 3])
    assert presence.tolist() == pytest.approx([0.0, 1.0, 0.5, 0.5, 1.0], abs=1e-5)
    frequency = adjusted(SamplingParams(frequency_penalty=0.5), logits, prompt=[1], output=[2, 3, 3, 3])
    assert frequency.tolist() == pytest.approx([0.0, 1.0, 0.5, -0.5, 1.0], abs=1e-5)
    both = adjusted(
        SamplingParams(presence_penalty=-0.5, frequency_penalty=0.25), logits, prompt=[1], output=[2, 3, 3, 3]
    )
    assert both.tolist() == pytest.approx([0.0, 1.0, 1.25, 0.75, 1.0], abs=1e-5)


def test_penalties_apply_after_logit_bias_and_do_not_touch_the_input() -> None:
    logits = torch.tensor([0.0, -1.0, 1.0, 0.5])
    before = logits.clone()
    # bias makes token 1 positive (+3 -> 2), then the repetition penalty divides it: 1.0
    got = adjusted(SamplingParams(repetition_penalty=2.0, logit_bias={1: 3.0}), logits, prompt=[1], output=[])
    assert got.tolist() == pytest.approx([0.0, 1.0, 1.0, 0.5], abs=1e-5)
    assert torch.equal(logits, before)
    batch = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    copy = batch.clone()
    params = SamplingParams(top_k=3, top_p=0.5, min_p=0.1, repetition_penalty=1.5, frequency_penalty=1, min_tokens=2)
    sampler(batch, [state(params, [1, 2, 3], seed=i) for i in range(3)])
    assert torch.equal(batch, copy)


# -- seeds: reproducible, and independent of the rest of the batch -------------------------------------


def step_logits(step: int, vocab: int) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(10_000 + step)) * 2


def run(batch_params: list[SamplingParams], seeds: list[int], watch: int, steps: int, vocab: int) -> list[int]:
    """Decode `steps` tokens for a batch; return row `watch`'s tokens. Row `watch` sees step_logits,
    the other rows noise of their own, and every row feeds its tokens back (they drive penalties)."""
    noise = torch.Generator().manual_seed(len(batch_params) * 1000 + watch)
    states = [state(p, [1, 2, 3], seed=s) for p, s in zip(batch_params, seeds, strict=True)]
    tokens = []
    for step in range(steps):
        logits = torch.randn(len(states), vocab, generator=noise) * 3
        logits[watch] = step_logits(step, vocab)
        results = sampler(logits, states)
        for s, r in zip(states, results, strict=True):
            s.append_token(r.token_id)
        tokens.append(results[watch].token_id)
    return tokens


WATCHED = SamplingParams(temperature=0.9, top_p=0.95, top_k=100, repetition_penalty=1.3, presence_penalty=0.2)
OTHERS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_p=0.5, frequency_penalty=0.5),
    SamplingParams(top_k=5, min_p=0.2, logit_bias={3: 2.0}),
    SamplingParams(temperature=1.2, repetition_penalty=0.8, min_tokens=10, stop_token_ids=[4]),
]


@pytest.mark.parametrize("vocab", [1000, 3001])
def test_seeded_request_is_independent_of_batch_composition(vocab: int) -> None:
    steps = 50
    alone = run([WATCHED], [42], watch=0, steps=steps, vocab=vocab)
    assert alone == run([WATCHED], [42], watch=0, steps=steps, vocab=vocab)  # reproducible
    assert len(set(alone)) > 10  # it really samples
    assert alone != run([WATCHED], [43], watch=0, steps=steps, vocab=vocab)  # and the seed matters
    for batch, watch in [(OTHERS[:2], 0), (OTHERS, 3), (OTHERS * 4, 20)]:
        params = [*batch[:watch], WATCHED, *batch[watch:]]
        seeds = [7 + i for i in range(len(params))]
        seeds[watch] = 42
        assert run(params, seeds, watch=watch, steps=steps, vocab=vocab) == alone, (len(params), watch)


def test_seed_from_params_unless_the_engine_passes_one() -> None:
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(seed=9)

    def draws(s: SamplingState) -> list[int]:
        return [sample(logits, [s])[0] for _ in range(20)]

    assert draws(SamplingState(params, [1])) == draws(SamplingState(params, [1], seed=9))
    assert draws(SamplingState(params, [1], seed=10)) != draws(SamplingState(params, [1], seed=9))
    assert SamplingState(SamplingParams(), [1]).seed != SamplingState(SamplingParams(), [1]).seed


# -- logprobs ------------------------------------------------------------------------------------------


def test_logprobs_are_of_the_raw_distribution() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(6)) * 2
    params = [
        SamplingParams(temperature=0.5, top_k=10, logprobs=5, repetition_penalty=1.5, logit_bias={7: 5}),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0, logprobs=20, frequency_penalty=1.0),
    ]
    results = sampler(logits, [state(p, [7, 8], seed=i) for i, p in enumerate(params)])
    raw = torch.log_softmax(logits, -1)
    for row, (p, r) in enumerate(zip(params, results, strict=True)):
        if p.logprobs is None:
            assert r.logprob is None and r.top_logprobs is None
            continue
        assert r.logprob == pytest.approx(raw[row, r.token_id].item(), abs=1e-6)
        assert r.top_logprobs is not None and len(r.top_logprobs) == p.logprobs
        values = [v for _, v in r.top_logprobs]
        assert values == sorted(values, reverse=True)
        expected = raw[row].topk(p.logprobs)
        assert [t for t, _ in r.top_logprobs] == expected.indices.tolist()
        assert values == pytest.approx(expected.values.tolist(), abs=1e-6)


def test_rejects_logits_that_do_not_match_the_states() -> None:
    with pytest.raises(ValueError, match="logits"):
        sampler(torch.zeros(2, 10), [state(SamplingParams())])


def test_distribution_is_bit_identical_alone_and_in_a_batch_at_llama4_vocab() -> None:
    """At Llama 4's 202,048 tokens, where a whole-row float sum of a one-row tensor is split between
    threads and rounds differently than in a batch: the sampler must not depend on such sums."""
    vocab = 202_048
    logits = torch.randn(len(OTHERS) + 1, vocab, generator=torch.Generator().manual_seed(8)) * 3
    states = [state(p, list(range(0, 500, 7)), seed=i) for i, p in enumerate([WATCHED, *OTHERS])]
    for s in states:
        for t in (5, 9, 9, 4000):
            s.append_token(t)
    batch = sampler.probs(logits, states)
    for row, s in enumerate(states):
        assert torch.equal(sampler.probs(logits[row : row + 1], [s])[0], batch[row]), row
