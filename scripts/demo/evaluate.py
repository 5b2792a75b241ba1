"""Score a demo model on the held-out split, per task (issue 7), through transformers or through herd.

Every held-out record ends with the assistant's reference answer; the model sees the conversation before it
(with its tools and picture), answers greedily, and the answer is scored by what the task asks for:
arithmetic by the final number, tool calls by function name and arguments, answers after a tool result by
the result's values, everything else by the exact reference sentence.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from herd.frontend.chat.llama4 import Llama4ChatTemplate
from herd.frontend.tool_calls import pythonic_calls

from demo import images

Record = dict[str, Any]

# The rows of the accuracy table, in order, with the acceptance thresholds where it sets one.
TARGETS: dict[str, float | None] = {
    "arithmetic (1-2 digits)": 0.95,
    "arithmetic (3 digits)": None,
    "string": None,
    "capital": 0.95,
    "chat": None,
    "multiturn": None,
    "repeat": None,
    "tool_call": 0.90,
    "tool_everyday": None,
    "tool_none": None,
    "tool_answer": 0.85,
    "image": 0.85,
}


def row_of(record: Record) -> str:
    if record["task"] == "arithmetic":
        return "arithmetic (1-2 digits)" if record["digits"] <= 2 else "arithmetic (3 digits)"
    return record["task"]


def reference(record: Record) -> dict[str, Any]:
    return record["messages"][-1]


def is_correct(record: Record, answer: str) -> bool:
    """Whether `answer` (the generated assistant text, special tokens removed) does what the record asks."""
    answer = answer.strip()
    ref = reference(record)
    task = record["task"]
    if task == "arithmetic":
        expected = ref["content"].rstrip(".").rsplit("=", 1)[1].strip()
        final = re.search(r"=\s*(-?\d+)\.?$", answer)
        return final is not None and final.group(1) == expected
    if task in ("tool_call", "tool_everyday"):
        calls = pythonic_calls(answer)
        wanted = ref["tool_calls"][0]["function"]
        return calls is not None and calls == [(wanted["name"], wanted["arguments"])]
    if task == "tool_answer":
        result = json.loads(record["messages"][-2]["content"])
        return pythonic_calls(answer) is None and all(_mentions(answer, str(v)) for v in result.values())
    return answer == ref["content"]


def _mentions(answer: str, value: str) -> bool:
    """Whether `value` stands in `answer` as a whole word or number: 569.7 is not in "569.77", 72 not in "172"."""
    return re.search(rf"(?<![\w.]){re.escape(value)}(?!\w|\.\d)", answer) is not None


@dataclasses.dataclass
class Prompt:
    text: str  # the chat template's rendering, ending in the assistant header; one <|image|> per picture
    image: dict[str, Any] | None  # the picture's spec (demo.images)


def prompt_of(record: Record) -> Prompt:
    text = Llama4ChatTemplate().render_text(record["messages"][:-1], tools=record.get("tools"))
    return Prompt(text, record.get("image"))


def image_size(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return int(config["vision_config"]["image_size"])


def generate_transformers(model_dir: Path, prompts: Sequence[Prompt], max_new_tokens: int) -> list[str]:
    """Greedy answers from transformers' Llama4ForConditionalGeneration in float32, one prompt at a time."""
    from tokenizers import Tokenizer

    from demo.train import image_prompt, image_tile, load_reference

    model = load_reference(model_dir).eval()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vision = model.config.vision_config
    tile = vision.image_size
    per_tile = int((tile // vision.patch_size) ** 2 * vision.pixel_shuffle_ratio**2)
    eos = model.generation_config.eos_token_id
    answers = []
    for prompt in tqdm(prompts, desc="transformers", unit="prompt", disable=None):
        text = prompt.text.replace("<|image|>", image_prompt(per_tile))
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False).ids])
        kwargs: dict[str, Any] = {}
        if prompt.image is not None:
            kwargs["pixel_values"] = image_tile(prompt.image, tile)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, **kwargs
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    return answers


def generate_herd(model_dir: Path, prompts: Sequence[Prompt], max_new_tokens: int, **engine_args: Any) -> list[str]:
    """Greedy answers from herd's offline engine, all prompts batched."""
    from herd import LLM, SamplingParams

    multimodal = any(p.image is not None for p in prompts)
    llm = LLM(str(model_dir), enable_multimodal=multimodal, **engine_args)
    tokenizer = llm.get_tokenizer()
    tile = image_size(model_dir)
    requests: list[dict[str, Any]] = []
    for prompt in prompts:
        request: dict[str, Any] = {"prompt_token_ids": tokenizer.encode(prompt.text, add_special_tokens=False)}
        if prompt.image is not None:
            request["multi_modal_data"] = {"image": [images.render(prompt.image, size=tile)]}
        requests.append(request)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    return [out.outputs[0].text for out in llm.generate(requests, params)]


def evaluate(records: Sequence[Record], answers: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(correct, total) per table row."""
    counts: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for record, answer in zip(records, answers, strict=True):
        row = counts[row_of(record)]
        row[0] += is_correct(record, answer)
        row[1] += 1
    return {name: (counts[name][0], counts[name][1]) for name in TARGETS if name in counts}


def format_table(scores: dict[str, tuple[int, int]]) -> str:
    lines = ["| task | accuracy | held-out samples | target |", "|---|---:|---:|---:|"]
    for name, (correct, total) in scores.items():
        target = TARGETS[name]
        lines.append(
            f"| {name} | {100 * correct / total:.1f}% | {total} | {f'≥ {100 * target:.0f}%' if target else ''} |"
        )
    return "\n".join(lines)
