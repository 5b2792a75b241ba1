"""Server parts without a server: sampling defaults, tool_choice plans, the tool reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xgrammar as xgr

from herd.frontend.structured import GrammarCompiler
from herd.frontend.tokenizer import Tokenizer, load_tokenizer
from herd.frontend.tool_parser import get_tool_parser
from herd.server.context import load_generation_defaults
from herd.server.errors import APIError
from herd.server.params import build_sampling_params
from herd.server.protocol import ChatCompletionRequest
from herd.server.tools import ToolReader, plan_tools

from checkpoints import llama4_tokenizer_model

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_generation_config_gives_the_defaults(tmp_path: Path) -> None:
    config = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [1, 2], "max_length": 9}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    defaults = load_generation_defaults(tmp_path)
    assert defaults == {"temperature": 0.6, "top_p": 0.9}
    assert build_sampling_params({"temperature": None}, defaults, None).temperature == 0.6
    given = build_sampling_params({"temperature": 0.0, "top_p": None}, defaults, None)
    assert (given.temperature, given.top_p, given.max_tokens) == (0.0, 0.9, None)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert load_generation_defaults(tmp_path)["temperature"] == 0.0  # greedy, as transformers would be
    assert load_generation_defaults(tmp_path / "absent") == {}


def test_bad_sampling_value_is_a_400_naming_it() -> None:
    with pytest.raises(APIError) as info:
        build_sampling_params({"min_p": 2.0}, {}, 16)
    assert info.value.status == 400 and info.value.param == "min_p"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(llama4_tokenizer_model())  # no chat template beside it: the built-in llama-4


@pytest.fixture(scope="module")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, tokenizer.vocab_size, tokenizer.eos_token_ids)


GET_TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("choice", "parser", "accepted", "refused"),
    [
        (
            "required",
            "llama4",
            ['[get_weather(city="Paris")]', '{"name": "get_time", "parameters": {}}'],
            ["Hi", "[f()]"],
        ),
        (
            "required",
            "pythonic",
            ['[get_time(), get_weather(city="x", days=2)]'],
            ['{"name": "get_time", "parameters": {}}'],
        ),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            "llama4",
            ['[get_weather(city="a")]'],
            ["[get_time()]"],
        ),
        ("required", "llama3_json", ['{"name": "get_time", "parameters": {}}'], ["[get_time()]"]),
        ("auto", "llama4", ['Sure. [get_weather(city="Oslo")] Done.', "No call at all."], ["Calling [get_date()]"]),
        ("auto", "pythonic", ['[get_weather(city="Oslo", days=1)]'], ["[get_weather(days=1)]"]),
    ],
)
def test_tool_choice_grammar_takes_calls_to_offered_tools_only(
    tokenizer: Tokenizer,
    compiler: GrammarCompiler,
    choice: object,
    parser: str,
    accepted: list[str],
    refused: list[str],
) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "tools": [weather, GET_TIME], "tool_choice": choice}
    )
    plan = plan_tools(req, parser, tokenizer)
    assert plan.structured is not None and plan.tools and plan.parser_name == parser
    blob = compiler.compile(plan.structured)
    grammar = xgr.CompiledGrammar.deserialize_json(blob.compiled, compiler.info)
    for text in accepted:
        matcher = xgr.GrammarMatcher(grammar)
        assert matcher.accept_string(text) and matcher.is_completed(), text
        assert plan.reader().parse(text).tool_calls or choice == "auto"  # type: ignore[union-attr]
    for text in refused:
        matcher = xgr.GrammarMatcher(grammar)
        assert not (matcher.accept_string(text) and matcher.is_completed()), text


def test_tool_call_constraint_off_leaves_auto_free(tokenizer: Tokenizer) -> None:
    req = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL]})
    assert plan_tools(req, "llama4", tokenizer, constrain_auto=False).structured is None
    assert plan_tools(req, "llama4", tokenizer, constrain_auto=True).structured is not None


def test_tool_choice_none_offers_nothing(tokenizer: Tokenizer) -> None:
    req = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL], "tool_choice": "none"}
    )
    plan = plan_tools(req, "llama4", tokenizer)
    assert plan.tools is None and plan.reader() is None


def test_tool_reader_prefix_and_parallel_calls() -> None:
    output = 'get_weather(city="Paris"), get_weather(city="Lyon")]'
    whole = ToolReader(get_tool_parser("pythonic"), "[", parallel=True).parse(output)
    assert [json.loads(c.arguments)["city"] for c in whole.tool_calls] == ["Paris", "Lyon"]
    for split in range(len(output) + 1):  # streamed, split anywhere: the same calls
        reader = ToolReader(get_tool_parser("pythonic"), "[", parallel=False)
        deltas = [reader.feed(output[:split]), reader.feed(output[split:]), reader.finish()]
        calls = [c for d in deltas for c in d.tool_calls]
        assert [(c.index, c.name, json.loads(c.arguments)) for c in calls] == [(0, "get_weather", {"city": "Paris"})]
