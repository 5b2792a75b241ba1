"""Tool-call parsers: whole outputs, and the same outputs streamed split anywhere."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herd.frontend.chat.llama4 import format_tool_calls
from herd.frontend.tool_parser import TOOL_PARSERS, ParsedOutput, ToolParser, get_tool_parser, merge_deltas

Calls = list[tuple[str, dict[str, Any]]]

# (parser, model output, expected content, expected calls)
CASES: list[tuple[str, str, str | None, Calls]] = [
    ("pythonic", '[get_weather(city="San Francisco")]', None, [("get_weather", {"city": "San Francisco"})]),
    (
        "pythonic",
        '[get_weather(location="Beijing", unit="celsius"), f2()]',
        None,
        [("get_weather", {"location": "Beijing", "unit": "celsius"}), ("f2", {})],
    ),
    (
        "pythonic",
        "[search(q={'filters': [1, 2.5, -3, True, None], 'nested': {'a': ['x', {'b': False}]}}, tags=('t', 'u'))]",
        None,
        [
            (
                "search",
                {"q": {"filters": [1, 2.5, -3, True, None], "nested": {"a": ["x", {"b": False}]}}, "tags": ["t", "u"]},
            )
        ],
    ),
    (
        "pythonic",
        r"""[echo(text="a ] b ) c [ d ( { \" quote", other='it\'s "fine" ]')]""",
        None,
        [("echo", {"text": 'a ] b ) c [ d ( { " quote', "other": 'it\'s "fine" ]'})],
    ),
    (
        "pythonic",
        '<|python_start|>[get_user_info(user_id=7890, special="black")]<|python_end|>',
        None,
        [("get_user_info", {"user_id": 7890, "special": "black"})],
    ),
    (
        "pythonic",
        'Let me check the weather.\n\n[get_weather(city="Paris"), get_weather(city="Lyon")]',
        "Let me check the weather.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon"})],
    ),
    ("pythonic", "Sure <|python_start|>[f(x=true, y=null)]<|python_end|>", "Sure", [("f", {"x": True, "y": None})]),
    ("pythonic", "[f(a=1)] and then some words", "and then some words", [("f", {"a": 1})]),
    ("pythonic", '天气 [查询(城市="北京")]', "天气", [("查询", {"城市": "北京"})]),
    # Not calls: plain content, kept exactly.
    (
        "pythonic",
        "A list [1, 2, 3] and a [link](http://x.y) and [x] .",
        "A list [1, 2, 3] and a [link](http://x.y) and [x] .",
        [],
    ),
    ("pythonic", "[f(1, 2)]", "[f(1, 2)]", []),
    ("pythonic", "[f(a=g(1))]", "[f(a=g(1))]", []),
    ("pythonic", "[f(**kw)]", "[f(**kw)]", []),
    ("pythonic", "[os.system(cmd='rm -rf /')]", "[os.system(cmd='rm -rf /')]", []),
    ("pythonic", "[f(a=1), 2]", "[f(a=1), 2]", []),
    ("pythonic", "[f(a=1)", "[f(a=1)", []),
    ("pythonic", "[f(a=1))] tail", "[f(a=1))] tail", []),
    ("pythonic", "[f(a=float('nan'))]", "[f(a=float('nan'))]", []),
    ("pythonic", "[f(a=1e999)]", "[f(a=1e999)]", []),
    ("pythonic", "[f(a=1 +)]", "[f(a=1 +)]", []),
    ("pythonic", "[xs for xs in f(a)]", "[xs for xs in f(a)]", []),
    ("pythonic", "  trailing spaces\n", "  trailing spaces\n", []),
    ("pythonic", '{"name": "f", "parameters": {}}', '{"name": "f", "parameters": {}}', []),
    # JSON forms.
    ("llama4_json", '{"name": "get_weather", "parameters": {"city": "SF"}}', None, [("get_weather", {"city": "SF"})]),
    (
        "json",
        '{"type": "function", "name": "f", "parameters": {"a": [1, {"b": "}]"}]}}',
        None,
        [("f", {"a": [1, {"b": "}]"}]})],
    ),
    ("json", '{"name": "f", "arguments": "{\\"a\\": 1}"}', None, [("f", {"a": 1})]),
    ("json", '{"name": "f", "arguments": {"a": 1}}', None, [("f", {"a": 1})]),
    (
        "json",
        '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]',
        None,
        [("a", {"x": 1}), ("b", {})],
    ),
    (
        "json",
        '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": "2"}}',
        None,
        [("a", {"x": 1}), ("b", {"y": "2"})],
    ),
    (
        "json",
        'I will call it: <|python_start|>{"name": "f", "parameters": {"q": "a;b"}}<|python_end|>',
        "I will call it:",
        [("f", {"q": "a;b"})],
    ),
    ("json", "{'name': 'f', 'parameters': {'flag': True}}", None, [("f", {"flag": True})]),
    ("json", '{"name": "Bob", "age": 42} is a person', '{"name": "Bob", "age": 42} is a person', []),
    ("json", '{"name": "f", "parameters": [1]}', '{"name": "f", "parameters": [1]}', []),
    ("json", '{"name": "f", "parameters": {"a": }', '{"name": "f", "parameters": {"a": }', []),
    ("json", '[get_weather(city="SF")]', '[get_weather(city="SF")]', []),
    ("json", "function() { return 1; }", "function() { return 1; }", []),
    # llama4 accepts both shapes.
    ("llama4", '[get_weather(city="SF")]', None, [("get_weather", {"city": "SF"})]),
    ("llama4", 'Ok. {"name": "f", "parameters": {"a": 1}}', "Ok.", [("f", {"a": 1})]),
]


def summary(result: ParsedOutput) -> tuple[str | None, Calls]:
    return result.content, [(c.name, json.loads(c.arguments)) for c in result.tool_calls]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_parse(parser, text, content, calls):
    assert summary(get_tool_parser(parser).parse(text)) == (content, calls)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_streaming_split_anywhere_matches_parse(parser, text, content, calls):
    for cut in range(len(text) + 1):
        p = get_tool_parser(parser)
        assert summary(merge_deltas([p.feed(text[:cut]), p.feed(text[cut:]), p.finish()])) == (content, calls)
    p = get_tool_parser(parser)
    assert summary(merge_deltas([*(p.feed(ch) for ch in text), p.finish()])) == (content, calls)
    rng = random.Random(len(text))
    for _ in range(5):
        p, deltas, at = get_tool_parser(parser), [], 0
        while at < len(text):
            step = rng.randint(1, 6)
            deltas.append(p.feed(text[at : at + step]))
            at += step
        assert summary(merge_deltas([*deltas, p.finish()])) == (content, calls)


def test_streamed_deltas_have_openai_shape():
    p = get_tool_parser("pythonic")
    text = 'Checking. [a(x=1), b(y="z")]'
    deltas = [p.feed(text[:12]), p.feed(text[12:20]), p.feed(text[20:]), p.finish()]
    assert "".join(d.content for d in deltas) == "Checking. "
    calls = [c.to_openai() for d in deltas for c in d.tool_calls]
    assert [c["index"] for c in calls] == [0, 1]
    assert calls[0]["type"] == "function" and calls[0]["function"] == {"name": "a", "arguments": '{"x": 1}'}
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) for c in calls)
    assert calls[0]["id"] != calls[1]["id"]
    # Content before the call arrives while streaming, not at the end.
    assert deltas[0].content == "Checking. "


def test_content_looking_like_a_call_start_is_held_then_released():
    p = get_tool_parser("pythonic")
    assert p.feed("see [ref").content == "see "
    assert p.feed("erence] now").content == "[reference] now"
    p = get_tool_parser("pythonic")
    assert p.feed("<|python_st").content == ""
    assert p.feed("art|>[f()]").tool_calls[0].name == "f"


def test_complete_call_objects():
    result = get_tool_parser("pythonic").parse('[f(a="x")]')
    call = result.tool_calls[0].to_openai()
    assert set(call) == {"id", "type", "function"} and call["function"] == {"name": "f", "arguments": '{"a": "x"}'}


def test_builtin_template_calls_round_trip_through_the_parser():
    args = {"s": 'a "quoted" [text] (with) {braces}', "n": [1, 2.5, None, {"k": True}]}
    text = format_tool_calls([{"function": {"name": "f", "arguments": json.dumps(args)}}])
    assert summary(get_tool_parser("pythonic").parse(text)) == (None, [("f", args)])


def test_unknown_parser_names_the_accepted_ones():
    with pytest.raises(ValueError) as err:
        get_tool_parser("hermes")
    for name in ("pythonic", "llama4_json", "json"):
        assert name in str(err.value)
    assert set(TOOL_PARSERS) >= {"pythonic", "llama4_json", "json"}


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("[](){}\"'=,;:ab1 \\\n"), max_size=40), st.sampled_from(sorted(TOOL_PARSERS)))
def test_arbitrary_text_never_raises_and_is_kept_when_no_call(text, parser):
    result = get_tool_parser(parser).parse(text)
    if not result.tool_calls:
        assert (result.content or "") == text
    p: ToolParser = get_tool_parser(parser)
    streamed = merge_deltas([*(p.feed(ch) for ch in text), p.finish()])
    assert summary(streamed) == summary(result)
