"""Speculative decoding end to end: greedy tokens identical to no speculation and to transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from herd.llm import LLM
from herd.sampling import SamplingParams

from eagle3_fixtures import write_eagle3_draft
from paged import assert_no_leaked_blocks
from test_engine import hf_greedy

MAX_TOKENS = 24  # crosses several chunk boundaries (chunk = 8) from any prompt


def repeating_prompts(seed: int) -> list[list[int]]:
    """Prompts that repeat their own text (what prompt lookup feeds on), of lengths around chunk boundaries."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for period, n in ((3, 7), (5, 16), (4, 21), (7, 30), (2, 9)):
        unit = torch.randint(3, 256, (period,), generator=gen).tolist()
        out.append((unit * n)[:n])
    return out


_REFERENCE: dict[tuple, list[int]] = {}


def reference(ckpt, ids: list[int]) -> list[int]:
    path, model = ckpt
    key = (str(path), tuple(ids))
    if key not in _REFERENCE:
        _REFERENCE[key] = hf_greedy(model, ids, MAX_TOKENS)
    return _REFERENCE[key]


def generate(path: Path, batch: list[list[int]], **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(path), dtype="float32", **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    assert_no_leaked_blocks(llm.engine)
    return [o.outputs[0].token_ids for o in outputs], llm


NGRAM = {"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 5}


@pytest.mark.parametrize(
    "engine_args",
    [{}, {"chunked_prefill_size": 5, "page_size": 4}, {"disable_radix_cache": True}],
    ids=["default", "prefill-5", "no-prefix-cache"],
)
def test_ngram_greedy_matches_transformers(scout_ckpt, engine_args: dict) -> None:
    batch = repeating_prompts(seed=0)
    tokens, llm = generate(scout_ckpt[0], batch, **NGRAM, **engine_args)
    assert tokens == [reference(scout_ckpt, p) for p in batch]
    stats = llm.engine.core.spec_stats
    assert stats.tokens > stats.verify_steps  # drafts were accepted: the path ran, not only its fallback
    assert stats.verify_steps > 0


def test_ngram_greedy_maverick_under_preemption(maverick_ckpt) -> None:
    batch = repeating_prompts(seed=2)  # the EAGLE-3 test's prompts: transformers' references are shared
    longest = max(map(len, batch)) + MAX_TOKENS
    tokens, llm = generate(
        maverick_ckpt[0], batch, **NGRAM, max_total_tokens=longest + 8, page_size=4, chunked_prefill_size=16
    )
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert tokens == [reference(maverick_ckpt, p) for p in batch]


@pytest.fixture(scope="module")
def eagle3_draft(scout_ckpt, maverick_ckpt, tmp_path_factory: pytest.TempPathFactory):
    """name -> a random EAGLE-3 draft (published layout) for that tiny target."""
    root = tmp_path_factory.mktemp("drafts")
    return {
        name: write_eagle3_draft(root / name, ckpt[1].config, seed=3)
        for name, ckpt in (("scout", scout_ckpt), ("maverick", maverick_ckpt))
    }


def eagle3(path: Path, steps: int = 3, topk: int = 1, num_draft_tokens: int | None = None) -> dict:
    return {
        "speculative_algorithm": "EAGLE3",
        "speculative_draft_model_path": str(path),
        "speculative_num_steps": steps,
        "speculative_eagle_topk": topk,
        "speculative_num_draft_tokens": num_draft_tokens or steps + 1,
    }


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_eagle3_random_draft_greedy_matches_transformers(request, eagle3_draft, name: str) -> None:
    ckpt = request.getfixturevalue(f"{name}_ckpt")
    batch = repeating_prompts(seed=2)
    tokens, llm = generate(ckpt[0], batch, **eagle3(eagle3_draft[name]), chunked_prefill_size=6, page_size=4)
    assert tokens == [reference(ckpt, p) for p in batch]
    assert llm.engine.core.spec_stats.verify_steps > 0


@pytest.mark.parametrize(
    ("name", "steps", "topk", "num_draft_tokens"),
    [("maverick", 4, 3, 8), ("scout", 2, 4, 10)],
    ids=["maverick-S4K3N8", "scout-S2K4N10"],
)
def test_eagle3_tree_greedy_matches_transformers(
    request, eagle3_draft, name: str, steps: int, topk: int, num_draft_tokens: int
) -> None:
    """Draft trees (topk > 1), verified with the tree mask at positions = depth, across chunk boundaries (chunk
    8, trees up to 4 deep) with chunked prefill and prefix hits: greedy tokens are transformers'."""
    ckpt = request.getfixturevalue(f"{name}_ckpt")
    batch = repeating_prompts(seed=2)
    spec = eagle3(eagle3_draft[name], steps, topk, num_draft_tokens)
    tokens, llm = generate(ckpt[0], batch, **spec, chunked_prefill_size=6, page_size=4)
    assert tokens == [reference(ckpt, p) for p in batch]
    hit = batch[3][:17] + batch[0]  # a prefix-cache hit on 16 tokens: the draft never saw them
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm.generate([{"prompt_token_ids": batch[3]}], params, use_tqdm=False)  # cached again (generate() cleared it)
    out = llm.generate([{"prompt_token_ids": hit}], params, use_tqdm=False)[0]
    assert out.num_cached_tokens > 0
    assert out.outputs[0].token_ids == reference(ckpt, hit)
    assert_no_leaked_blocks(llm.engine)
    stats = llm.engine.core.spec_stats
    assert stats.tokens > stats.verify_steps > 0  # some drafts stood: accepted paths moved into place


def test_eagle3_with_prefix_hits_and_preemption(scout_ckpt, eagle3_draft) -> None:
    batch = repeating_prompts(seed=2)[1:4]
    shared = batch[2][:17]
    batch = batch + [shared + p for p in batch[:2]]  # prefix-cache hits: the draft never saw those positions
    longest = max(map(len, batch)) + MAX_TOKENS
    engine_args = dict(max_total_tokens=longest + 8, page_size=4, chunked_prefill_size=16)
    tokens, llm = generate(scout_ckpt[0], batch, **eagle3(eagle3_draft["scout"], steps=5), **engine_args)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert tokens == [reference(scout_ckpt, p) for p in batch]


@pytest.mark.parametrize(
    ("change", "words"),
    [({"hidden_size": 96}, ["hidden_size 96", "64"]), ({"vocab_size": 300}, ["vocab_size 300", "256"])],
    ids=["hidden", "vocab"],
)
def test_draft_that_does_not_fit_fails_at_start(scout_ckpt, tmp_path: Path, change: dict, words: list[str]) -> None:
    other = {**scout_ckpt[1].config.to_dict(), **change}
    draft = write_eagle3_draft(tmp_path / "draft", other)
    with pytest.raises(ValueError) as error:
        LLM(str(scout_ckpt[0]), dtype="float32", **eagle3(draft))
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("shape", [(3, 1, 4), (3, 3, 7)], ids=["chain", "tree"])
def test_stop_tokens_sampling_and_n_with_drafts(scout_ckpt, eagle3_draft, shape: tuple[int, int, int]) -> None:
    batch = repeating_prompts(seed=0)[:3]
    plain = LLM(str(scout_ckpt[0]), dtype="float32")
    spec = LLM(str(scout_ckpt[0]), dtype="float32", **eagle3(eagle3_draft["scout"], *shape))
    full = [reference(scout_ckpt, p) for p in batch]
    # A stop token in the middle of each greedy answer: the output ends there, however many drafts stood.
    for ids, want in zip(batch, full, strict=True):
        stop = want[len(want) // 2]
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[stop], ignore_eos=True)
        outs = [llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False)[0].outputs[0] for llm in (plain, spec)]
        assert outs[0].token_ids == outs[1].token_ids == want[: want.index(stop) + 1]
        assert outs[1].finish_reason == "stop"
    sampled = SamplingParams(temperature=0.8, top_p=0.9, n=3, seed=1, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = spec.generate({"prompt_token_ids": batch[0]}, sampled, use_tqdm=False)[0]
    assert [len(c.token_ids) for c in out.outputs] == [MAX_TOKENS] * 3
    for llm in (plain, spec):
        assert_no_leaked_blocks(llm.engine)


def test_ngram_on_the_triton_backend_across_chunk_boundaries(scout_ckpt) -> None:
    """Verify steps through the triton extend kernel (TRITON_INTERPRET=1 on the CPU), crossing chunks."""
    pytest.importorskip("triton")
    batch = repeating_prompts(seed=0)[:2]
    llm = LLM(str(scout_ckpt[0]), dtype="float32", attention_backend="triton", page_size=4, **NGRAM)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [reference(scout_ckpt, p)[:12] for p in batch]
    stats = llm.engine.core.spec_stats
    assert stats.tokens > stats.verify_steps


def test_eagle3_tree_on_the_triton_backend_across_a_chunk_boundary() -> None:
    """Tree verify steps on the triton backend (TRITON_INTERPRET=1 on the CPU) with the demo model and its trained
    draft (whose guesses stand, so accepted paths are moved): the answer crosses the 128-token attention chunk
    mid-tree, and greedy tokens are the demo model's alone (fp32, torch_native)."""
    pytest.importorskip("triton")
    from herd.demo import DRAFT_PATH, MODEL_PATH

    if not (DRAFT_PATH / "config.json").is_file():
        pytest.skip("no trained demo draft in this checkout")
    conv = [
        [
            {"role": "user", "content": "What is the capital of Peru?"},
            {"role": "assistant", "content": "The capital of Peru is Lima."},
            {"role": "user", "content": "What is the capital of Japan?"},
            {"role": "assistant", "content": "The capital of Japan is Tokyo."},
            {"role": "user", "content": "What is 37 * 48?"},  # a place-value answer of ~45 tokens
        ]
    ]
    params = SamplingParams(temperature=0.0, max_tokens=64)
    plain = LLM(str(MODEL_PATH), dtype="float32").chat(conv, params, use_tqdm=False)[0]
    assert len(plain.prompt_token_ids) < 128 < len(plain.prompt_token_ids) + len(plain.outputs[0].token_ids)
    spec = {
        "speculative_algorithm": "EAGLE3",
        "speculative_draft_model_path": str(DRAFT_PATH),
        "speculative_num_steps": 3,
        "speculative_eagle_topk": 4,
        "speculative_num_draft_tokens": 8,
    }
    llm = LLM(str(MODEL_PATH), dtype="float32", attention_backend="triton", **spec)
    assert llm.chat(conv, params, use_tqdm=False)[0].outputs[0].token_ids == plain.outputs[0].token_ids
    assert llm.engine.core.spec_stats.accept_length > 1.5


def test_demo_model_with_its_trained_draft() -> None:
    """`--speculative-demo-draft`: the shipped draft fits the demo model, its guesses mostly stand, and greedy
    answers are the ones the demo model gives alone (fp32)."""
    from herd.demo import DRAFT_PATH, MODEL_PATH

    if not (DRAFT_PATH / "config.json").is_file():
        pytest.skip("no trained demo draft in this checkout")
    questions = ["What is 37 * 48?", "What is the capital of Peru?", "Repeat after me: quarterly report draft"]
    convs = [[{"role": "user", "content": q}] for q in questions]
    params = SamplingParams(temperature=0.0, max_tokens=40)
    plain = LLM(str(MODEL_PATH), dtype="float32")
    spec = LLM(str(MODEL_PATH), dtype="float32", speculative_demo_draft=True)
    answers = [[o.outputs[0].token_ids for o in llm.chat(convs, params, use_tqdm=False)] for llm in (plain, spec)]
    assert answers[0] == answers[1]
    assert spec.engine.core.spec_stats.accept_length > 1.5
