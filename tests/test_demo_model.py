"""The packaged demo model (herd/demo/model): its files, transformers answering held-out questions from each
task with the data's reference answers, and herd giving transformers' greedy answers, text and pictures."""

from __future__ import annotations

import json
from typing import Any

import pytest

from herd.demo import MODEL_PATH

from demo import data
from demo.evaluate import generate_herd, generate_transformers, is_correct, prompt_of

pytest.importorskip("transformers")

# Held-out questions (never in the training data) of every kind, named by their keys (the first record with
# each). The model card's table gives the accuracy per task over the whole held-out split; these are ones it
# answers, so that a broken checkpoint, loader or preprocessing shows up as a wrong answer.
KEYS = (
    "multiply|4|83",
    "add|98|22",
    "capital|Mongolia|country|2",
    "capital|Mexico|capital|3",
    "chat|Hey",
    "multiturn|name|Dave|What is my name?|",
    "multiturn|word|planet|reverse",
    "repeat|Mallory 217 Alice Edthia",
    "repeat|Liowaubru",
    'tool|get_weather|{"location": "Accra", "unit": "celsius"}',
    'tool|get_stock_price|{"symbol": "FDS"}',
    'tool|web_search|{"query": "bread garden"}',
    'tool|send_email|{"subject": "holidays", "to": "zantazan@example.com"}',
    "tool_everyday|get_weather|How's the weather in Shioboull this morning? Give it in celsius.",
    'tool_answer|tool|calculator|{"expression": "4850 / 89"}|{"result": 54.49}',
    'tool_answer|tool|web_search|{"query": "milk copper"}|{"top_result": "A short article about milk copper"}',
    'tool_answer|tool|web_search|{"query": "sourdough bread"}|{"top_result": "A short article about sourdough bread"}',
    "image|white|blue circle,yellow triangle|What color is the circle?",
    "image|black|orange square|What is the color of the square?",
    "image|black|pink circle,purple triangle,yellow square|Which shape is purple?",
)
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    first: dict[str, dict[str, Any]] = {}
    for record in data.generate("heldout", data.HELDOUT_COUNTS, seed=0):
        first.setdefault(record["key"], record)  # a key repeats when the same question has other context
    return [first[key] for key in KEYS]


@pytest.fixture(scope="module")
def transformers_answers(records: list[dict[str, Any]]) -> list[str]:
    return generate_transformers(MODEL_PATH, [prompt_of(r) for r in records], MAX_NEW_TOKENS)


def test_packaged_files() -> None:
    names = {p.name for p in MODEL_PATH.iterdir()}
    assert names == {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert sum(p.stat().st_size for p in MODEL_PATH.iterdir()) <= 25_000_000
    config = json.loads((MODEL_PATH / "config.json").read_text())
    assert config["architectures"] == ["Llama4ForConditionalGeneration"]
    generation = json.loads((MODEL_PATH / "generation_config.json").read_text())
    assert (generation["temperature"], generation["top_p"]) == (0.6, 0.9)


def test_transformers_answers_held_out_questions(
    records: list[dict[str, Any]], transformers_answers: list[str]
) -> None:
    wrong = [(r["key"], a) for r, a in zip(records, transformers_answers, strict=True) if not is_correct(r, a)]
    assert not wrong


def test_herd_gives_transformers_answers(records: list[dict[str, Any]], transformers_answers: list[str]) -> None:
    answers = generate_herd(MODEL_PATH, [prompt_of(r) for r in records], MAX_NEW_TOKENS, dtype="float32")
    assert answers == transformers_answers
