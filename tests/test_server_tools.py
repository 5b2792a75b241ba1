"""Tool calling end to end, API keys, and the multimodal flag: a server whose model writes a known call.

The checkpoint (see server_fixtures.make_chain_checkpoint) answers any chat with
`[get_weather(city="Paris")]`, continues a reply forced to start with `[` the same way, and one forced to
start with `[get_time(` with `city="Paris")]`, so every tool_choice mode has a known right answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from herd.config.server_args import ServerArgs

from local_web import data_url, encode
from server_fixtures import ServerThread, make_chain_checkpoint, wait_idle

MODEL = "herd-tools"
KEY = "sk-herd-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CALL = '[get_weather(city="Paris")]'
CHAINS = [("\n\n", CALL), ("[", CALL[1:]), ("[get_time(", 'city="Paris")]')]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"The {what} in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    for name, what in (("get_weather", "weather"), ("get_time", "local time"))
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    path: Path = tmp_path_factory.mktemp("chain")
    make_chain_checkpoint(path, CHAINS)
    args = ServerArgs(
        model_path=str(path),
        dtype="float32",
        served_model_name=MODEL,
        api_key=KEY,
        enable_multimodal=True,
        max_total_tokens=4096,
    )
    with ServerThread(args) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def ask(client: openai.OpenAI, **kwargs):  # type: ignore[no-untyped-def]
    return client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=32, **kwargs)


def calls(message) -> list[tuple[str, dict]]:  # type: ignore[no-untyped-def]
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_the_model_writes_the_call(client: openai.OpenAI) -> None:
    out = ask(client)
    assert out.choices[0].message.content == CALL and out.choices[0].finish_reason == "stop"


def test_tool_call_non_streaming(client: openai.OpenAI) -> None:
    out = ask(client, tools=TOOLS)
    choice = out.choices[0]
    assert calls(choice.message) == [("get_weather", {"city": "Paris"})]
    assert choice.message.content is None and choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].id.startswith("call_") and choice.message.tool_calls[0].type == "function"


def test_tool_call_streaming(client: openai.OpenAI) -> None:
    content, deltas, finish = "", [], []
    for chunk in ask(client, tools=TOOLS, tool_choice="auto", stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            deltas += c.delta.tool_calls or []
            finish += [c.finish_reason] if c.finish_reason else []
    assert content == "" and finish == ["tool_calls"]
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (0, "get_weather", {"city": "Paris"})
    ]
    assert deltas[0].id.startswith("call_")


def test_tool_choice_required_and_named(client: openai.OpenAI) -> None:
    required = ask(client, tools=TOOLS, tool_choice="required")
    assert calls(required.choices[0].message) == [("get_weather", {"city": "Paris"})]
    named = ask(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert calls(named.choices[0].message) == [("get_time", {"city": "Paris"})]
    streamed = [
        d
        for chunk in ask(
            client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}, stream=True
        )
        for c in chunk.choices
        for d in c.delta.tool_calls or []
    ]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in streamed] == [("get_time", {"city": "Paris"})]


def test_tool_choice_none_offers_no_tool(client: openai.OpenAI) -> None:
    out = ask(client, tools=TOOLS, tool_choice="none")
    assert out.choices[0].message.content == CALL and not out.choices[0].message.tool_calls
    assert out.usage.prompt_tokens == ask(client).usage.prompt_tokens  # the prompt carries no tool list
    assert ask(client, tools=TOOLS).usage.prompt_tokens > out.usage.prompt_tokens


def test_tool_results_round_trip(client: openai.OpenAI) -> None:
    first = ask(client, tools=TOOLS).choices[0].message
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in first.tool_calls]},
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"temperature_c": 21}'},
    ]
    out = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=32)
    assert out.choices[0].finish_reason == "tool_calls"  # this model calls again, whatever it is told


def test_bad_tool_requests(server: ServerThread) -> None:
    cases = [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "name"),
        ({"tools": "get_weather"}, "tools"),
    ]
    for extra, word in cases:
        body = {"model": MODEL, "messages": ASK, "tools": TOOLS, **extra}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH)
        assert r.status_code == 400 and word in r.json()["error"]["message"], r.text
    wait_idle(server.url, AUTH)


def test_api_key(server: ServerThread, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200  # open: load balancers probe it
    for path in ("/v1/models", "/metrics", "/get_model_info"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}{path}", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{server.url}{path}", headers=AUTH).status_code == 200
    # Refused before the body is read: a malformed body still gets 401, not 400.
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{oops")
    assert r.status_code == 401
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=ASK)
    assert client.models.list().data[0].id == MODEL


def test_images_to_a_model_without_vision(server: ServerThread) -> None:
    # --enable-multimodal is on, but this checkpoint is text-only: a good image is refused by the engine,
    # a bad one before it (tests/test_server_images.py serves a vision model).
    bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "What?"}, bad]}]}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.1"
    good = {"type": "image_url", "image_url": {"url": data_url(encode(Image.new("RGB", (4, 4))))}}
    body["messages"][0]["content"][1] = good
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 400 and "no vision tower" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/generate", json={"text": "x", "image_data": "a.png"}, headers=AUTH)
    assert r.status_code == 400 and "--allowed-local-media-path" in r.json()["error"]["message"]


def test_engine_crash_fails_requests_and_health(server: ServerThread) -> None:
    with ServerThread(replace(server.args, api_key=None)) as crashing:

        def broken_step() -> None:
            raise RuntimeError("boom")

        crashing.engine.step = broken_step  # type: ignore[method-assign]
        body = {"model": MODEL, "messages": ASK, "stream": True}
        with httpx.stream("POST", f"{crashing.url}/v1/chat/completions", json=body) as r:
            events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and events[-1] == "[DONE]"
        assert "boom" in json.loads(events[-2])["error"]["message"]  # the stream ends with the error
        assert httpx.get(f"{crashing.url}/health").status_code == 503
        r = httpx.post(f"{crashing.url}/v1/chat/completions", json={**body, "stream": False})
        assert r.status_code == 503 and "not running" in r.json()["error"]["message"]
