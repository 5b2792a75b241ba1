"""The engine end to end: many requests at once, token-identical to transformers' greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from herd.frontend.processor import RequestError
from herd.llm import LLM
from herd.sampling import SamplingParams

from checkpoints import CHUNK
from paged import assert_no_leaked_blocks

# From one token to several chunks (chunk = 8).
PROMPT_LENS = [1, 2, 3, 5, 7, 8, 9, 12, 15, 16, 17, 23, 24, 25, 31, 40]
MAX_TOKENS = 19  # crosses at least two chunk boundaries from any prompt
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def prompts(seed: int = 0, shared_prefix: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 256, (shared_prefix,), generator=gen).tolist()
    return [prefix + torch.randint(3, 256, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@torch.no_grad()
def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(ids) :].tolist()


_REFERENCE: dict[tuple, list[list[int]]] = {}


def reference(ckpt, batch: list[list[int]]) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, run one prompt at a time (memoised)."""
    path, model = ckpt
    key = (str(path), tuple(map(tuple, batch)))
    if key not in _REFERENCE:
        _REFERENCE[key] = [hf_greedy(model, ids, MAX_TOKENS) for ids in batch]
    return _REFERENCE[key]


@pytest.fixture
def make_llm():
    """Builds LLMs and checks after the test that none leaked a KV block."""
    made: list[LLM] = []

    def make(path: Path, **kwargs) -> LLM:
        llm = LLM(str(path), dtype="float32", **kwargs)
        made.append(llm)
        return llm

    yield make
    for llm in made:
        assert_no_leaked_blocks(llm.engine)


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(params=["scout_ckpt", "maverick_ckpt"])
def ckpt(request: pytest.FixtureRequest):
    return request.getfixturevalue(request.param)


def test_batched_greedy_matches_transformers(ckpt, make_llm) -> None:
    batch = prompts(seed=1)
    llm = make_llm(ckpt[0])
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY, use_tqdm=False)
    assert token_ids(outputs) == reference(ckpt, batch)
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)


@pytest.mark.parametrize(
    "engine_args",
    [
        {"disable_radix_cache": True},
        {"chunked_prefill_size": 7},
        {"chunked_prefill_size": 4096, "page_size": 4},
        {"chunked_prefill_size": -1},
    ],
    ids=["no-prefix-cache", "prefill-7", "prefill-4096", "no-chunking"],
)
def test_engine_options_do_not_change_tokens(scout_ckpt, make_llm, engine_args: dict) -> None:
    batch = prompts(seed=2, shared_prefix=13)  # long shared prefixes: the prefix cache gets hits
    llm = make_llm(scout_ckpt[0], **engine_args)
    first = llm.generate([{"prompt_token_ids": p} for p in batch[:4]], GREEDY, use_tqdm=False)
    rest = llm.generate([{"prompt_token_ids": p} for p in batch[4:]], GREEDY, use_tqdm=False)
    assert token_ids(first + rest) == reference(scout_ckpt, batch)
    cached = sum(o.num_cached_tokens for o in rest)
    if engine_args.get("disable_radix_cache"):
        assert cached == 0
    else:
        assert cached >= 8 * len(rest)  # at least one chunk of the shared prefix per prompt
        cache = llm.engine.core.prefix_cache
        # The hit-rate counters count each admitted prompt once.
        assert cache.hit_tokens == sum(o.num_cached_tokens for o in first + rest)
        assert cache.queried_tokens == sum(map(len, batch))


def test_preemption_under_a_tiny_kv_budget(scout_ckpt, make_llm) -> None:
    batch = prompts(seed=3)
    longest = max(map(len, batch)) + MAX_TOKENS
    llm = make_llm(scout_ckpt[0], max_total_tokens=longest + 8, page_size=4, chunked_prefill_size=16)
    outputs = llm.generate([{"prompt_token_ids": p} for p in batch], GREEDY, use_tqdm=False)
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert token_ids(outputs) == reference(scout_ckpt, batch)


def test_local_pool_bounded_by_one_chunk(scout_ckpt, make_llm) -> None:
    llm = make_llm(scout_ckpt[0], page_size=4, disable_radix_cache=True)
    engine = llm.engine
    engine.add_request("long", [5, 6, 7], SamplingParams(temperature=0, max_tokens=10 * CHUNK, ignore_eos=True))
    peak_local = peak_full = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak_local = max(peak_local, engine.core.kv.local.num_used)
        peak_full = max(peak_full, engine.core.kv.full.num_used)
    assert peak_local <= CHUNK // 4 + 1
    assert peak_full * 4 >= 10 * CHUNK  # while the global layers kept the whole context


def test_request_that_cannot_fit_fails_at_once(scout_ckpt, make_llm) -> None:
    llm = make_llm(scout_ckpt[0], max_total_tokens=32, page_size=4)
    with pytest.raises(RequestError, match=r"prompt \(30 tokens\) \+ max_tokens \(19\) = 49 tokens cannot fit"):
        llm.generate({"prompt_token_ids": list(range(3, 33))}, GREEDY, use_tqdm=False)
    ctx = make_llm(scout_ckpt[0], context_length=20)
    with pytest.raises(RequestError, match=r"exceeds the context length \(20 tokens\)"):
        ctx.generate({"prompt_token_ids": list(range(3, 10))}, GREEDY, use_tqdm=False)


def test_abort_frees_everything(scout_ckpt, make_llm) -> None:
    llm = make_llm(scout_ckpt[0])
    engine = llm.engine
    for i, p in enumerate(prompts(seed=4)[:6]):
        engine.add_request(str(i), p, GREEDY)
    engine.step()
    engine.step()
    for i in range(6):
        engine.abort(str(i))
    assert engine.num_running() == engine.num_waiting() == 0


def test_seeded_sampling_independent_of_batch(scout_ckpt, make_llm) -> None:
    llm = make_llm(scout_ckpt[0])
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=12, ignore_eos=True)
    target = {"prompt_token_ids": prompts(seed=5)[9]}
    alone = llm.generate(target, params, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": p} for p in prompts(seed=6)[:5]]
    noisy = SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)
    mixed = llm.generate(
        [*others[:2], target, *others[2:]], [noisy, noisy, params, noisy, noisy, noisy], use_tqdm=False
    )
    assert mixed[2].outputs[0].token_ids == alone
    again = llm.generate(target, params, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone


def test_n_and_stop_token_ids(scout_ckpt, make_llm) -> None:
    llm = make_llm(scout_ckpt[0])
    batch = prompts(seed=7)
    greedy_tokens = reference(scout_ckpt, batch)[10]
    stop_at = greedy_tokens[4]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[stop_at], n=2, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": batch[10]}, params, use_tqdm=False)[0]
    assert len(out.outputs) == 2
    for completion in out.outputs:
        expected = greedy_tokens[: greedy_tokens.index(stop_at) + 1]
        assert completion.token_ids == expected
        assert completion.finish_reason == "stop" and completion.stop_reason == stop_at


def test_text_prompts_and_stop_strings(real_vocab_ckpt, make_llm) -> None:
    llm = make_llm(real_vocab_ckpt[0])
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("The capital of France is", greedy, use_tqdm=False)[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    assert full.text == tokenizer.decode(full.token_ids, skip_special_tokens=True)
    # A stop string made of the text of tokens 5..7, so it spans token boundaries.
    prefix = tokenizer.decode(full.token_ids[:5], skip_special_tokens=True)
    stop = tokenizer.decode(full.token_ids[:8], skip_special_tokens=True)[len(prefix) :]
    assert stop.strip()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    out = llm.generate("The capital of France is", params, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]


def test_chat_uses_the_llama4_template(real_vocab_ckpt, make_llm) -> None:
    llm = make_llm(real_vocab_ckpt[0])
    messages = [{"role": "user", "content": "Hi!"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    expected = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert out.prompt_token_ids == expected
    assert llm.get_tokenizer().decode(expected[:3]) == "<|begin_of_text|><|header_start|>user"


def test_herd_generate_command(real_vocab_ckpt, capsys: pytest.CaptureFixture[str]) -> None:
    from herd.cli import main

    path = str(real_vocab_ckpt[0])
    assert main(["generate", "--model-path", path, "--prompt", "Hello", "--max-tokens", "6", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    llm = LLM(path, dtype="float32")
    expected = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0].outputs[0].text
    assert printed == expected + "\n"
    assert main(["generate", "--model-path", path, "--prompt", "x", "--dtype", "fp64"]) == 2
    assert "--dtype 'fp64' is not supported" in capsys.readouterr().err


def test_no_request_state_outlives_its_request(scout_ckpt, make_llm) -> None:
    """A leak guard: after many requests, a third of them aborted mid-way, no per-request record is left
    in the frontend, the core, the scheduler or the worker, and no KV block is held by a request."""
    llm = make_llm(scout_ckpt[0], max_total_tokens=256, page_size=4)
    engine, core = llm.engine, llm.engine.core
    params = SamplingParams(temperature=0.8, max_tokens=6, ignore_eos=True, seed=0)
    batch = prompts(seed=5)[:8]
    for wave in range(4):
        ids = [f"{wave}-{i}" for i in range(len(batch))]
        for request_id, p in zip(ids, batch, strict=True):
            engine.add_request(request_id, p, params)
        engine.step()
        engine.step()
        for request_id in ids[::3]:
            engine.abort(request_id)
        while engine.has_unfinished_requests():
            engine.step()
    assert not engine.outputs.has_unfinished() and engine.outputs.num_sequences == 0
    assert core.requests == {} and not core.scheduler.running and not core.scheduler.waiting
    assert core.stats().kv_usage == 0
    # The worker forgets finished sequences at its next step: one more request flushes them.
    engine.add_request("last", batch[0], SamplingParams(max_tokens=1))
    while engine.has_unfinished_requests():
        engine.step()
    worker = core.workers[0]
    assert set(worker.sequences) <= {"last#0"} and not worker.prompt_logprobs.wanted
    assert core.prefix_cache is not None and core.prefix_cache.num_nodes <= core.kv.full.num_blocks
