"""The OpenAI-compatible and SGLang-native server end to end: a real server, the official `openai` client.

One server for the module, on a tiny random checkpoint over the real Llama 4 vocabulary.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from herd.config.server_args import ServerArgs
from herd.frontend.tokenizer import Tokenizer

from server_fixtures import ServerThread, metrics, wait_idle, wait_until

MODEL = "herd-test"
CONTEXT = 512
MESSAGES = [{"role": "user", "content": "Tell me about llamas."}]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server(real_vocab_ckpt) -> Iterator[ServerThread]:
    args = ServerArgs(
        model_path=str(real_vocab_ckpt[0]),
        dtype="float32",
        served_model_name=MODEL,
        context_length=CONTEXT,
        max_total_tokens=8192,
    )
    with ServerThread(args) as running:
        yield running


@pytest.fixture(scope="module")
def tokenizer(server: ServerThread) -> Tokenizer:
    assert server.tokenizer is not None
    return server.tokenizer  # encoding from this thread is safe; the frontend only decodes with it


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def chat_text(client: openai.OpenAI, **kwargs: Any) -> str:
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, **GREEDY, **kwargs}
    return client.chat.completions.create(**kwargs).choices[0].message.content


# -- happy paths -------------------------------------------------------------------------------------------


def test_models_and_health(server: ServerThread, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_chat_completion(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=9, **GREEDY)
    assert out.object == "chat.completion" and out.model == MODEL and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    prompt_tokens = len(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 9 and out.usage.total_tokens == prompt_tokens + 9
    assert out.usage.prompt_tokens_details.cached_tokens is not None


def test_chat_stream_equals_non_stream_and_reports_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=16, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_text_ids_and_streaming(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    out = client.completions.create(model=MODEL, prompt="The llama is", max_tokens=10, **GREEDY)
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 10
    ids = tokenizer.encode("The llama is", add_special_tokens=True)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, **GREEDY)
    assert by_ids.choices[0].text == out.choices[0].text
    stream = client.completions.create(model=MODEL, prompt="The llama is", max_tokens=10, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in stream) == out.choices[0].text


def test_completions_batch_and_n(client: openai.OpenAI) -> None:
    prompts = ["The llama is", "Alpacas are"]
    out = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, seed=3, temperature=1.0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 4 * 6
    single = client.completions.create(model=MODEL, prompt=prompts[1], n=2, max_tokens=6, seed=3, temperature=1.0)
    assert [c.text for c in out.choices[2:]] == [c.text for c in single.choices]
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(
        model=MODEL, prompt=prompts, n=2, max_tokens=6, seed=3, temperature=1.0, stream=True
    ):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(4)] == [c.text for c in out.choices]


def test_n2_choices_that_finish_at_different_steps(client: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": "The llama is", "n": 2, "max_tokens": 10, "temperature": 1.0, "seed": 5}
    free = [c.text for c in client.completions.create(**kwargs).choices]
    stop = next(free[0][i : i + 3] for i in range(2, len(free[0])) if free[0][i : i + 3] not in free[1])
    texts, finishes = ["", ""], [[], []]
    for chunk in client.completions.create(**kwargs, stop=[stop], stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            finishes[c.index] += [c.finish_reason] if c.finish_reason else []
    assert texts == [free[0][: free[0].index(stop)], free[1]]
    assert finishes == [["stop"], ["length"]]  # choice 0 ends first, once


def test_chat_n2_and_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        out = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, n=2, max_tokens=8, temperature=1.0, seed=seed
        )
        assert [c.index for c in out.choices] == [0, 1]
        return [c.message.content for c in out.choices]

    first = sample(11)
    assert sample(11) == first
    assert first[0] != first[1]  # each of the n completions has its own random stream
    assert sample(12) != first


def test_32_concurrent_requests_match_solo_ones(client: openai.OpenAI, server: ServerThread) -> None:
    prompts = [f"Story number {i} about a llama:" for i in range(4)]
    solo = [chat_text(client, messages=[{"role": "user", "content": p}]) for p in prompts]

    async def many() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        async with aclient:
            calls = [
                aclient.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": prompts[i % 4]}], max_tokens=12, **GREEDY
                )
                for i in range(32)
            ]
            return [r.choices[0].message.content for r in await asyncio.gather(*calls)]

    results = asyncio.run(many())
    assert results == [solo[i % 4] for i in range(32)]
    wait_idle(server.url)


def test_sampling_fields_reach_the_sampler(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    forced = tokenizer.encode(" llama", add_special_tokens=False)[0]
    out = chat_text(client, max_tokens=3, logit_bias={str(forced): 100})
    assert out == " llama" * 3
    stop_at = chat_text(client)[4:9]
    assert stop_at not in chat_text(client, stop=[stop_at])
    penalised = chat_text(client, max_tokens=12, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalised  # accepted; the sampler's own tests check the maths
    assert chat_text(client, max_tokens=6, temperature=0.7, top_p=0.9, seed=1, extra_body={"top_k": 5, "min_p": 0.05})


def test_chat_logprobs(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 4 and "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy
        assert bytes(t.bytes).decode() == t.token
    completion = client.completions.create(model=MODEL, prompt="The llama", max_tokens=3, logprobs=2, **GREEDY)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == 3 and all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_native_generate(server: ServerThread, client: openai.OpenAI) -> None:
    url = f"{server.url}/generate"
    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    out = httpx.post(url, json={"text": "The llama is", "sampling_params": params}).json()
    expected = client.completions.create(model=MODEL, prompt="The llama is", max_tokens=6, **GREEDY)
    assert out["text"] == expected.choices[0].text and len(out["output_ids"]) == 6
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert out["meta_info"]["completion_tokens"] == 6
    by_ids = httpx.post(url, json={"input_ids": out["output_ids"][:3], "sampling_params": params}).json()
    assert len(by_ids["output_ids"]) == 6
    batch = httpx.post(url, json={"text": ["The llama is", "Hi"], "sampling_params": params}).json()
    assert isinstance(batch, list) and batch[0]["text"] == out["text"]
    events = []
    with httpx.stream("POST", url, json={"text": "The llama is", "sampling_params": params, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["text"] == out["text"]  # cumulative, as SGLang streams it


def test_metrics_names(server: ServerThread, client: openai.OpenAI) -> None:
    chat_text(client, max_tokens=3)
    m = metrics(server.url)
    for name in (
        "herd:num_requests_running",
        "herd:num_requests_waiting",
        "herd:kv_cache_usage_perc",
        "herd:prefix_cache_hit_rate",
        "herd:prompt_tokens_total",
        "herd:generation_tokens_total",
        "herd:time_to_first_token_seconds_count",
        "herd:inter_token_latency_seconds_count",
        "herd:e2e_request_latency_seconds_count",
    ):
        assert name in m, name
    assert m["herd:generation_tokens_total"] > 0 and m["herd:e2e_request_latency_seconds_count"] > 0


# -- bad input: a 400 (or 404) in OpenAI's shape, and the server carries on --------------------------------

CHAT = "/v1/chat/completions"
OK_CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}

BAD_REQUESTS = [
    # (path, body, status, words the message must contain, param)
    (CHAT, b"{not json", 400, ["malformed JSON"], None),
    (CHAT, b"[1, 2]", 400, ["dictionary"], None),
    (CHAT, {"model": MODEL}, 400, ["messages"], "messages"),
    (CHAT, {**OK_CHAT, "messages": "hello"}, 400, ["messages"], "messages"),
    (CHAT, {**OK_CHAT, "messages": []}, 400, ["messages"], "messages"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, ["wizard"], "messages.0"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user"}]}, 400, ["content"], None),
    (CHAT, {**OK_CHAT, "temperature": "hot"}, 400, ["temperature"], "temperature"),
    (CHAT, {**OK_CHAT, "temperature": -1}, 400, ["temperature", "-1"], "temperature"),
    (CHAT, {**OK_CHAT, "top_p": 1.5}, 400, ["top_p"], "top_p"),
    (CHAT, {**OK_CHAT, "n": 0}, 400, ["n must be"], "n"),
    (CHAT, {**OK_CHAT, "n": 1000}, 400, ["n must be"], "n"),
    (CHAT, {**OK_CHAT, "max_tokens": 0}, 400, ["max_tokens"], "max_tokens"),
    (CHAT, {**OK_CHAT, "presence_penalty": 3}, 400, ["presence_penalty"], "presence_penalty"),
    (CHAT, {**OK_CHAT, "logprobs": True, "top_logprobs": 50}, 400, ["logprobs"], "logprobs"),
    (CHAT, {**OK_CHAT, "top_logprobs": 2}, 400, ["top_logprobs"], "top_logprobs"),
    (CHAT, {**OK_CHAT, "logit_bias": {"5": 500}}, 400, ["logit_bias"], "logit_bias"),
    (CHAT, {**OK_CHAT, "logit_bias": {"999999999": 1}}, 400, ["logit_bias"], "logit_bias"),
    (CHAT, {**OK_CHAT, "stop": 5}, 400, ["stop: "], "stop"),
    (CHAT, {**OK_CHAT, "model": "gpt-5"}, 404, ["gpt-5"], "model"),
    (CHAT, {**OK_CHAT, "max_tokens": CONTEXT}, 400, [f"({CONTEXT})", f"context length ({CONTEXT} tokens)"], None),
    (CHAT, {**OK_CHAT, "stream_options": {"include_usage": True}}, 400, ["stream"], "stream_options"),
    (CHAT, {**OK_CHAT, "tool_choice": "required"}, 400, ["tools"], "tool_choice"),
    (
        CHAT,
        {**OK_CHAT, "response_format": {"type": "json_schema"}},
        400,
        ["json_schema.schema"],
        "response_format.json_schema.schema",
    ),
    (
        CHAT,
        {
            **OK_CHAT,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}
            ],
        },
        400,
        ["--enable-multimodal"],
        "messages.0.content.0",
    ),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, ["prompt"], "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [5, 10**9]}, 400, ["prompt token ids"], None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, ["echo"], "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, ["max_tokens"], "max_tokens"),
    ("/generate", {"text": "x", "input_ids": [1]}, 400, ["exactly one"], "text"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_token": 3}}, 400, ["max_new_token"], None),
    ("/generate", {"text": "x", "sampling_params": {"regex": "a", "ebnf": "root ::= 'a'"}}, 400, ["at most"], None),
    ("/v1/nothing", {}, 404, ["Not Found"], None),
]


@pytest.mark.parametrize(("path", "body", "status", "words", "param"), BAD_REQUESTS)
def test_bad_requests(server: ServerThread, path: str, body: Any, status: int, words: list[str], param: str | None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    assert_still_serving(server)


def assert_still_serving(server: ServerThread) -> None:
    r = httpx.post(f"{server.url}{CHAT}", json={**OK_CHAT, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    wait_idle(server.url)


def test_request_id_in_use_is_refused_without_disturbing_its_owner(server: ServerThread) -> None:
    url = f"{server.url}/generate"
    body = {"text": "Hi", "rid": "twin", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    pool = ThreadPoolExecutor(1)
    with server.paused() as engine_waiting:
        first = pool.submit(httpx.post, url, json=body, timeout=60)
        engine_waiting.wait(timeout=60)  # the first "twin" is in the engine
        second = httpx.post(url, json=body)
        assert second.status_code == 400 and "in use" in second.json()["error"]["message"]
    assert first.result(timeout=60).json()["meta_info"]["completion_tokens"] == 4
    pool.shutdown()
    wait_idle(server.url)


def test_openai_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat_text(client, temperature=-2)
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        chat_text(client, model="no-such-model")


# -- clients that leave ------------------------------------------------------------------------------------


def aborted(server: ServerThread) -> float:
    return metrics(server.url).get('herd:requests_finished_total{finish_reason="abort"}', 0.0)


def test_disconnect_mid_stream_aborts_and_frees_the_kv_cache(server: ServerThread) -> None:
    before = aborted(server)
    body = {**OK_CHAT, "max_tokens": CONTEXT - 40, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}{CHAT}", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events in: the request is decoding
        with server.paused() as engine_waiting:  # ~460 tokens to go: it cannot finish before we leave
            engine_waiting.wait(timeout=60)
            r.close()
            wait_until(lambda: aborted(server) == before + 1, "the server to see the disconnect")
    assert got[0].startswith("data: ")
    wait_idle(server.url)
    assert httpx.post(f"{server.url}/flush_cache").status_code == 200
    assert metrics(server.url)["herd:kv_cache_usage_perc"] == 0
    assert_still_serving(server)


def test_disconnect_while_waiting_for_a_whole_answer(server: ServerThread) -> None:
    before = aborted(server)
    body = json.dumps({**OK_CHAT, "max_tokens": 100, "ignore_eos": True}).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    host, port = server.url.removeprefix("http://").split(":")
    with server.paused() as engine_waiting:
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head.encode() + body)
            engine_waiting.wait(timeout=60)  # the request is in the engine, which is held before its step
        wait_until(lambda: aborted(server) == before + 1, "the server to see the disconnect")
    wait_idle(server.url)
    assert_still_serving(server)
