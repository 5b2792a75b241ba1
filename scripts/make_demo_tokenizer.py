"""Train the demo model's byte-level BPE tokenizer on the demo data and save it in Hugging Face layout.

    .venv/bin/python scripts/make_demo_data.py --out /tmp/herd-demo/data
    .venv/bin/python scripts/make_demo_tokenizer.py --data /tmp/herd-demo/data --out /tmp/herd-demo/tokenizer

Writes tokenizer.json and tokenizer_config.json (with the llama-4 jinja chat template), then checks that
the jinja template and herd's built-in llama-4 template give the same ids on records of every task.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from herd.frontend.tokenizer import load_tokenizer

from demo.data import TASKS
from demo.tokenizer import DEFAULT_VOCAB_SIZE, save_tokenizer, train_tokenizer, training_texts


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def check_templates(folder: Path, records: list[dict[str, Any]], per_task: int = 20) -> int:
    """Records whose prompt ids differ between the checkpoint's jinja template and herd's built-in one."""
    jinja, builtin = load_tokenizer(folder), load_tokenizer(folder, chat_template="llama-4")
    sample = [r for task in TASKS for r in [r for r in records if r["task"] == task][:per_task]]
    bad = 0
    for record in sample:
        for prompt, gen in [(record["messages"][:-1], True), (record["messages"], False)]:
            kwargs = {"tools": record.get("tools"), "add_generation_prompt": gen}
            bad += jinja.apply_chat_template(prompt, **kwargs) != builtin.apply_chat_template(prompt, **kwargs)
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/herd-demo/data"), help="folder with train.jsonl")
    parser.add_argument("--out", type=Path, default=Path("/tmp/herd-demo/tokenizer"))
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    args = parser.parse_args()

    train = read_jsonl(args.data / "train.jsonl")
    folder = save_tokenizer(train_tokenizer(training_texts(train), args.vocab_size), args.out)
    tokenizer = load_tokenizer(folder)
    print(f"{folder}: vocab size {tokenizer.vocab_size}")
    heldout = read_jsonl(args.data / "heldout.jsonl")
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tools=r.get("tools"))) for r in heldout]
    print(f"held-out dialogs: mean {sum(lengths) / len(lengths):.0f} tokens, max {max(lengths)}")
    bad = check_templates(folder, train + heldout)
    if bad:
        raise SystemExit(f"jinja and built-in llama-4 templates differ on {bad} prompts")
    print("jinja chat template == herd's built-in llama-4 template on every task")


if __name__ == "__main__":
    main()
