"""The demo model's scoring (demo.evaluate): reference answers pass, near misses fail."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from demo import data
from demo.evaluate import evaluate, format_table, is_correct, prompt_of, row_of


@pytest.fixture(scope="module")
def heldout() -> list[dict[str, Any]]:
    return data.generate("heldout", dict.fromkeys(data.TASKS, 30), seed=0)


def _answer_text(record: dict[str, Any]) -> str:
    """What a perfect model writes: the reference content, or its tool call in pythonic form."""
    ref = record["messages"][-1]
    if ref.get("tool_calls"):
        fn = ref["tool_calls"][0]["function"]
        args = ", ".join(f"{k}={json.dumps(v)}" for k, v in fn["arguments"].items())
        return f"[{fn['name']}({args})]"
    return ref["content"]


def test_reference_answers_score_full_marks(heldout: list[dict[str, Any]]) -> None:
    answers = [_answer_text(r) for r in heldout]
    scores = evaluate(heldout, answers)
    assert all(correct == total for correct, total in scores.values()), scores
    assert {"arithmetic (1-2 digits)", "tool_call", "tool_answer", "image"} <= set(scores)
    assert "| capital | 100.0% |" in format_table(scores)


def test_wrong_answers_fail(heldout: list[dict[str, Any]]) -> None:
    arithmetic = next(r for r in heldout if r["task"] == "arithmetic")
    right = _answer_text(arithmetic)
    number = int(right.rstrip(".").rsplit("=", 1)[1])
    assert not is_correct(arithmetic, right.replace(f"= {number}.", f"= {number + 1}."))
    assert not is_correct(arithmetic, "I don't know.")

    call = next(r for r in heldout if r["task"] == "tool_call")
    fn = call["messages"][-1]["tool_calls"][0]["function"]
    assert is_correct(call, _answer_text(call))
    assert not is_correct(call, _answer_text(call).replace(fn["name"], "other_tool"))
    changed = copy.deepcopy(call)
    key = next(iter(changed["messages"][-1]["tool_calls"][0]["function"]["arguments"]))
    changed["messages"][-1]["tool_calls"][0]["function"]["arguments"][key] = "something else"
    assert not is_correct(changed, _answer_text(call))

    after_tool = next(r for r in heldout if r["task"] == "tool_answer")
    assert not is_correct(after_tool, "Done.")
    assert not is_correct(after_tool, _answer_text(call))  # a call again instead of the answer
    value = str(next(iter(json.loads(after_tool["messages"][-2]["content"]).values())))
    assert is_correct(after_tool, _answer_text(after_tool))
    assert not is_correct(after_tool, _answer_text(after_tool).replace(value, value + "7"))  # 569.7 is not 569.77
    assert not is_correct(after_tool, _answer_text(after_tool).replace(value, "1" + value))

    picture = next(r for r in heldout if r["task"] == "image")
    assert not is_correct(picture, "The circle is blue." if "circle is blue" not in _answer_text(picture) else "No.")


def test_prompts_end_in_the_assistant_header_and_keep_the_picture(heldout: list[dict[str, Any]]) -> None:
    for record in heldout:
        prompt = prompt_of(record)
        assert prompt.text.endswith("<|header_start|>assistant<|header_end|>\n\n")
        assert prompt.text.count("<|image|>") == (record["task"] == "image")
        assert (prompt.image is not None) == (record["task"] == "image")
    assert {row_of(r) for r in heldout if r["task"] == "arithmetic"} == {
        "arithmetic (1-2 digits)",
        "arithmetic (3 digits)",
    }
