"""The demo model's synthetic data and tokenizer (scripts/demo): deterministic, disjoint splits, correct answers,
and a tokenizer whose jinja chat template gives the same ids as herd's built-in llama-4 template."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from herd.demo import MODEL_PATH
from herd.frontend.chat.llama4 import format_tool_calls
from herd.frontend.tokenizer import Tokenizer, load_tokenizer
from herd.frontend.tool_parser import get_tool_parser

from demo import data, images
from demo.tokenizer import SPECIAL_TOKENS, TOOL_TEXT_TOKENS, save_tokenizer, train_tokenizer, training_texts
from demo.tools import (
    CITIES,
    PHRASES,
    STOCKS,
    SUBJECTS,
    TOOLS,
    TOPICS,
    UNSEEN_CITIES,
    UNSEEN_WEATHER_QUESTIONS,
)
from demo.vocab import NAMES, WORDS, TokenPieces

COUNTS = dict.fromkeys(data.TASKS, 60)


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict[str, Any]]]:
    return {split: data.generate(split, COUNTS, seed=0) for split in ("train", "heldout")}


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory: pytest.TempPathFactory, splits: dict[str, list[dict[str, Any]]]) -> Path:
    tokenizer = train_tokenizer(training_texts(splits["train"]), vocab_size=800)
    return save_tokenizer(tokenizer, tmp_path_factory.mktemp("demo_tokenizer"))


def _by_task(records: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    return [r for r in records if r["task"] == task]


def test_generation_is_deterministic_for_a_seed() -> None:
    counts = dict.fromkeys(data.TASKS, 5)
    assert data.generate("train", counts, seed=3) == data.generate("train", counts, seed=3)
    assert data.generate("train", counts, seed=3) != data.generate("train", counts, seed=4)


def test_every_task_in_both_splits(splits: dict[str, list[dict[str, Any]]]) -> None:
    for records in splits.values():
        assert {r["task"] for r in records} == set(data.TASKS)
        assert all(r["messages"][-1]["role"] == "assistant" for r in records)


def test_heldout_does_not_overlap_train(splits: dict[str, list[dict[str, Any]]]) -> None:
    train, heldout = splits["train"], splits["heldout"]
    heldout_keys = {r["key"] for r in heldout}
    # No training record is, or contains (first turn, refused question, tool call), a held-out sample.
    train_keys = {k for r in train for k in [r["key"], *r.get("uses", [])]}
    assert not train_keys & heldout_keys
    # Nor is any held-out conversation (with its picture) a training one, whatever the keys say.
    train_dialogs = {json.dumps([r["messages"], r.get("image")]) for r in train}
    assert not any(json.dumps([r["messages"], r.get("image")]) in train_dialogs for r in heldout)


def test_arithmetic_answers_are_correct(splits: dict[str, list[dict[str, Any]]]) -> None:
    for record in _by_task(splits["train"] + splits["heldout"], "arithmetic"):
        a, b = map(int, re.findall(r"\d+", record["messages"][0]["content"]))
        expected = {"add": a + b, "subtract": a - b, "multiply": a * b}[record["subtask"]]
        answer = record["messages"][-1]["content"]
        assert re.fullmatch(rf"{a} [-+*] {b} = (.* = )?{expected}\.", answer), (record, answer)
        assert eval(answer.replace("=", "==").rstrip(".")) is True  # every step of a worked product holds
        assert record["digits"] == max(len(str(a)), len(str(b)))
    assert data.equation("add", 37, 48) == "37 + 48 = 85."
    assert data.equation("multiply", 37, 8) == "37 * 8 = 296."
    assert data.equation("multiply", 37, 40) == "37 * 40 = 1480."
    assert data.equation("multiply", 37, 48) == "37 * 48 = 37 * 40 + 37 * 8 = 1480 + 296 = 1776."
    assert data.equation("multiply", 12, 305) == "12 * 305 = 12 * 300 + 12 * 5 = 3600 + 60 = 3660."


def test_tool_calls_parse_into_the_intended_call(splits: dict[str, list[dict[str, Any]]]) -> None:
    records = splits["train"] + splits["heldout"]
    for record in _by_task(records, "tool_call") + _by_task(records, "tool_answer"):
        call = record["messages"][1]["tool_calls"][0]["function"]
        offered = [t["function"]["name"] for t in record["tools"]]
        assert call["name"] in offered and 2 <= len(offered) <= 4
        parsed = get_tool_parser("pythonic").parse(format_tool_calls(record["messages"][1]["tool_calls"]))
        assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [(call["name"], call["arguments"])]
    for record in _by_task(records, "tool_none"):
        assert not get_tool_parser("pythonic").parse(record["messages"][-1]["content"]).tool_calls
        if record["subtask"] == "unavailable":
            assert record["refused"] not in [t["function"]["name"] for t in record["tools"]]
        assert 2 <= len(record["tools"]) <= 4


def test_tool_arguments_are_copied_from_the_request_and_not_from_a_closed_pool() -> None:
    records = data.generate("train", {"tool_call": 400}, seed=0)
    for record in records:
        request = record["messages"][0]["content"]
        for value in record["messages"][1]["tool_calls"][0]["function"]["arguments"].values():
            assert str(value) in request, (value, request)
    args = [r["messages"][1]["tool_calls"][0]["function"]["arguments"] for r in records]
    symbols = {a["symbol"] for a in args if "symbol" in a}
    places = {a["location"] for a in args if "location" in a}
    # Made-up symbols and places as well as the pool's: a model cannot answer by recalling the pool.
    assert symbols - set(STOCKS) and symbols & set(STOCKS)
    assert places - set(CITIES) and places & set(CITIES)


def test_everyday_requests_name_places_the_benchmark_never_asks_about() -> None:
    """tool_everyday: made-up places copied into the call, never one of the unseen cities nor in their phrasings."""
    records = data.generate("train", {"tool_everyday": 600}, seed=0) + data.generate(
        "heldout", {"tool_everyday": 100}, seed=0
    )
    unseen_questions = {q.format(city) for q in UNSEEN_WEATHER_QUESTIONS for city in UNSEEN_CITIES}
    templates = {q.split("{}")[0] for q in UNSEEN_WEATHER_QUESTIONS}
    unseen_words = {word for city in UNSEEN_CITIES for word in city.split()}
    single = 0
    for record in records:
        request = record["messages"][0]["content"]
        call = record["messages"][1]["tool_calls"][0]["function"]
        place = call["arguments"]["location"]
        assert call["name"] in ("get_weather", "get_time") and place in request
        assert place not in UNSEEN_CITIES and not set(place.split()) & unseen_words
        assert request not in unseen_questions and not any(request.startswith(t) for t in templates)
        offered = [t["function"]["name"] for t in record["tools"]]
        assert call["name"] in offered
        single += offered == [call["name"]]
        parsed = get_tool_parser("pythonic").parse(format_tool_calls(record["messages"][1]["tool_calls"]))
        assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [(call["name"], call["arguments"])]
    assert 0.3 < single / len(records) < 0.7  # the single offered tool, as the benchmark offers it, and a choice
    assert len({r["messages"][1]["tool_calls"][0]["function"]["arguments"]["location"] for r in records}) > 650


def test_place_styles_set_how_places_are_made_up_and_never_name_an_unseen_city() -> None:
    unseen_words = {word for city in UNSEEN_CITIES for word in city.split()}
    known = " ".join(WORDS + NAMES).lower()

    def places(styles: tuple[float, float], pieces: list[str] | None = None) -> list[str]:
        records = data.generate("train", {"tool_everyday": 400}, seed=0, place_styles=styles, place_pieces=pieces)
        return [r["messages"][1]["tool_calls"][0]["function"]["arguments"]["location"] for r in records]

    assert (
        places((0.1, 0.0))
        == places((0.1, 0.0))
        == [  # the default: the data of the shipped stages
            r["messages"][1]["tool_calls"][0]["function"]["arguments"]["location"]
            for r in data.generate("train", {"tool_everyday": 400}, seed=0)
        ]
    )
    glued = [w for place in places((0.0, 1.0)) for w in place.split()]
    # Every word of two or three pieces of the pools' words, each piece of 2-4 letters.
    assert all(4 <= len(w) <= 12 and w[:2].lower() in known for w in glued)
    assert not set(glued) & unseen_words
    letters = [w for place in places((1.0, 0.0)) for w in place.split()]
    assert all(3 <= len(w) <= 8 for w in letters) and not set(letters) & unseen_words
    pieces = ["ab", "cde", "fgh"]
    glued = [w for place in places((0.0, 1.0), pieces) for w in place.split()]
    assert {w.lower() for w in glued} == {a + b for a in pieces for b in pieces} | {
        a + b + c for a in pieces for b in pieces for c in pieces
    }  # two or three pieces, each drawn evenly: every combination turns up in 400 places


def test_token_pieces_glue_places_from_whole_tokens_of_the_tokenizer() -> None:
    """--place-tokens: each word splits back into the tokens it was drawn as, a capitalized one first, so the
    capitalized tokens that start real names ("Port", "Colo") are copied as answers as often as any other."""
    tokenizer = HFTokenizer.from_file(str(MODEL_PATH / "tokenizer.json"))
    pieces = TokenPieces.of(tokenizer)
    assert {"Port", "Colo", "Min", "B"} <= set(pieces.first) and {"land", "gary", "ab"} <= set(pieces.rest)
    assert not set(pieces.first) & set(pieces.rest)
    unseen_words = {word for city in UNSEEN_CITIES for word in city.split()}
    records = data.generate("train", {"tool_everyday": 400}, seed=0, place_styles=(0.0, 1.0), place_pieces=pieces)
    words = [w for r in records for w in r["messages"][1]["tool_calls"][0]["function"]["arguments"]["location"].split()]
    firsts = set()
    for word in words:
        tokens = tokenizer.encode(word, add_special_tokens=False).tokens
        assert tokens[0] in pieces.first and 2 <= len(tokens) <= 3 and set(tokens[1:]) <= set(pieces.rest), word
        firsts.add(tokens[0])
    assert not set(words) & unseen_words
    assert len(firsts) > len(words) / 3  # drawn evenly from hundreds, not from a favoured few


def test_two_word_places_sets_the_share_of_made_up_places_of_two_words() -> None:
    def words_per_place(two_words: float) -> set[int]:
        records = data.generate("train", {"tool_everyday": 300}, seed=0, made_up_share=1.0, two_word_places=two_words)
        return {len(r["messages"][1]["tool_calls"][0]["function"]["arguments"]["location"].split()) for r in records}

    assert words_per_place(0.0) == {1}
    assert words_per_place(0.15) == {1, 2}
    assert words_per_place(1.0) == {2}


def test_made_up_share_sets_how_many_arguments_leave_the_pool() -> None:
    before = data.generate("train", {"tool_call": 50}, seed=1)

    def pool_shares(share: float | None) -> tuple[float, float]:
        records = data.generate("train", {"tool_call": 600}, seed=0, made_up_share=share)
        args = [r["messages"][1]["tool_calls"][0]["function"]["arguments"] for r in records]
        symbols = [a["symbol"] in STOCKS for a in args if "symbol" in a]
        places = [a["location"] in CITIES for a in args if "location" in a]
        return sum(symbols) / len(symbols), sum(places) / len(places)

    assert pool_shares(0.0) == (1.0, 1.0)
    assert pool_shares(1.0) == (0.0, 0.0)
    symbols, places = pool_shares(None)  # each argument's own share: half the symbols, three quarters the places
    assert 0.35 < symbols < 0.65 and 0.6 < places < 0.9
    symbols, places = pool_shares(0.9)
    assert symbols < 0.2 and places < 0.2
    assert data.generate("train", {"tool_call": 50}, seed=1) == before  # the setting ends with its generation


def test_repeat_answers_say_back_what_was_asked(splits: dict[str, list[dict[str, Any]]]) -> None:
    for record in _by_task(splits["train"] + splits["heldout"], "repeat"):
        question, answer = record["messages"][0]["content"], record["messages"][-1]["content"]
        assert 1 <= len(answer.split()) <= 16 and answer.strip() == answer  # up to four values of four words
        assert any(q.format(answer) == question for q in data.REPEAT_QUESTIONS), (question, answer)


def test_repeat_says_back_the_values_held_out_tool_calls_need() -> None:
    # A held-out call's search topic or phrase is never an argument of that tool in training; the repeat task
    # is where the model meets (and copies) its words.
    said = " | ".join(r["messages"][-1]["content"] for r in data.generate("train", {"repeat": 3000}, seed=0))
    for value in [*TOPICS, *PHRASES, *SUBJECTS]:
        assert value in said, value
    assert re.search(r"\b\d+\.\d{1,2}\b", said)  # decimals, as in prices and quotients


def test_answers_after_a_tool_result_use_its_values(splits: dict[str, list[dict[str, Any]]]) -> None:
    for record in _by_task(splits["train"] + splits["heldout"], "tool_answer"):
        tool_msg, answer = record["messages"][2], record["messages"][3]["content"]
        assert tool_msg["role"] == "tool"
        for value in json.loads(tool_msg["content"]).values():
            assert str(value) in answer, (value, answer)


def test_image_specs_render_their_named_colors(splits: dict[str, list[dict[str, Any]]]) -> None:
    for record in _by_task(splits["train"] + splits["heldout"], "image")[:40]:
        spec = record["image"]
        pixels = np.asarray(images.render(spec, size=96)).reshape(-1, 3)
        colors = {tuple(int(c) for c in p) for p in np.unique(pixels, axis=0)}
        named = {images.COLORS[s["color"]] for s in spec["shapes"]} | {images.BACKGROUNDS[spec["background"]]}
        assert colors == named, record
        answer = record["messages"][-1]["content"]
        if record["subtask"] == "count":
            assert str(len(spec["shapes"])) in answer
        else:
            assert any(f"The {s['kind']} is {s['color']}." == answer for s in spec["shapes"])


def test_shapes_lie_apart_inside_the_picture() -> None:
    rng = random.Random(0)
    for _ in range(300):
        boxes = []
        for shape in images.random_spec(rng)["shapes"]:
            half = shape["size"] / 2
            box = (shape["x"] - half, shape["y"] - half, shape["x"] + half, shape["y"] + half)
            assert min(box) >= 0 and max(box) <= 1, shape
            boxes.append(box)
        for i, a in enumerate(boxes):
            for b in boxes[:i]:
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_tokenizer_round_trips_and_keeps_special_tokens_whole(tok_folder: Path) -> None:
    tok = load_tokenizer(tok_folder)
    for text in ["What is 37+48?", "Héllo, 東京 🙂\n\n\tend", '[get_weather(location="Paris", unit="celsius")]']:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    for special in SPECIAL_TOKENS:
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] in tok.all_special_ids, special
    assert tok.encode("hi")[0] == tok.bos_token_id == tok.token_to_id("<|begin_of_text|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (
        tok.token_to_id("<|eot|>"),
        tok.token_to_id("<|finetune_right_pad|>"),
    )
    # Numbers split into single digits (see SPLIT_PATTERN).
    assert [tok.decode([i]) for i in tok.encode("12345", add_special_tokens=False)] == list("12345")


def test_tokenizer_gives_a_word_one_id_wherever_it_stands(tok_folder: Path) -> None:
    # The word in the question, after a quote in the call, and at the start of the answer: the same id.
    tok = load_tokenizer(tok_folder)
    paris = tok.encode("Paris", add_special_tokens=False)
    for text in ["What's the weather in Paris?", '[get_weather(location="Paris")]', "\n\nParis is"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert any(ids[i : i + len(paris)] == paris for i in range(len(ids))), text


def test_tool_instructions_are_one_token_each_and_round_trip(
    tok_folder: Path, splits: dict[str, list[dict[str, Any]]]
) -> None:
    tok = load_tokenizer(tok_folder)
    for text in TOOL_TEXT_TOKENS:
        assert len(tok.encode(text, add_special_tokens=False)) == 1
    record = _by_task(splits["train"], "tool_answer")[0]
    ids = tok.apply_chat_template(record["messages"], tools=record["tools"])
    assert sum(i in {tok.token_to_id(t) for t in TOOL_TEXT_TOKENS} for i in ids) == 2
    text = tok.apply_chat_template(record["messages"], tools=record["tools"], tokenize=False)
    assert tok.decode(ids) == text


EDGE_DIALOGS: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = [
    (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"}],
        [TOOLS["get_weather"].schema(), {"name": "bare", "description": None, "parameters": {}}],
    ),
    (
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Shapes?"}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"function": {"name": "f", "arguments": {"a": True, "b": None, "c": 2.5, "d": [1], "e": {"k": 0}}}},
                {"function": {"name": "g", "arguments": {}}},
            ]},
            {"role": "tool", "content": {"ok": "ja", "n": 3}},
            {"role": "ipython", "content": "plain"},
        ],
        [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "d": {"type": "array", "items": {"type": "string"}}, "e": {"type": "object"}}}}}],
    ),
    ([{"role": "system", "content": [{"type": "text", "text": "Sys"}]}, {"role": "user", "content": "hi"}], None),
]  # fmt: skip


def _prompts(records: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None, bool]]:
    # Each record as a prompt (generation prompt after the last user/tool turn) and as a whole training dialog.
    out = [(r["messages"][:-1], r.get("tools"), True) for r in records]
    return out + [(r["messages"], r.get("tools"), False) for r in records]


def test_jinja_chat_template_equals_builtin_llama4(tok_folder: Path, splits: dict[str, list[dict[str, Any]]]) -> None:
    jinja: Tokenizer = load_tokenizer(tok_folder)
    builtin: Tokenizer = load_tokenizer(tok_folder, chat_template="llama-4")
    assert jinja.chat_template.name == "checkpoint" and builtin.chat_template.name == "llama-4"
    sample = [r for task in data.TASKS for r in _by_task(splits["train"] + splits["heldout"], task)[::10]]
    edge = [(m, t, g) for m, t in EDGE_DIALOGS for g in (True, False)]
    for messages, tools, gen in _prompts(sample) + edge:
        kwargs: dict[str, Any] = {"tools": tools, "add_generation_prompt": gen}
        text = builtin.apply_chat_template(messages, tokenize=False, **kwargs)
        assert jinja.apply_chat_template(messages, tokenize=False, **kwargs) == text
        assert jinja.apply_chat_template(messages, **kwargs) == builtin.apply_chat_template(messages, **kwargs)
