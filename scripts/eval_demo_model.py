"""Held-out accuracy of the demo model, per task (issue 7), greedy.

    .venv/bin/python scripts/eval_demo_model.py --model /tmp/herd-demo/model --data /tmp/herd-demo/data \\
        --backend transformers
    .venv/bin/python scripts/eval_demo_model.py --model /tmp/herd-demo/model --backend herd   # through herd

`--limit N` scores the first N held-out records of every task. Prints a markdown table (the model card's);
`--show-errors K` prints K wrong answers per task.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
from pathlib import Path

from herd.demo import MODEL_PATH

from demo.evaluate import evaluate, format_table, generate_herd, generate_transformers, is_correct, prompt_of
from demo.train import read_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL_PATH, help="model folder (default: the packaged one)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/herd-demo/data"), help="folder with heldout.jsonl")
    parser.add_argument("--backend", choices=["transformers", "herd"], default="transformers")
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="herd's --dtype (auto: the model's, but float32 on a CPU that cannot pack bfloat16); transformers "
        "always runs float32",
    )
    parser.add_argument("--tasks", nargs="*", help="only these tasks (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="records per task")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--show-errors", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write every answer as JSONL here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    per_task: dict[str, int] = collections.Counter()
    records = []
    for record in read_jsonl(args.data / "heldout.jsonl"):
        if args.tasks and record["task"] not in args.tasks:
            continue
        if args.limit is None or per_task[record["task"]] < args.limit:
            per_task[record["task"]] += 1
            records.append(record)
    prompts = [prompt_of(r) for r in records]
    if args.backend == "transformers":
        answers = generate_transformers(args.model, prompts, args.max_new_tokens)
    else:
        answers = generate_herd(args.model, prompts, args.max_new_tokens, dtype=args.dtype)
    if args.output:
        with args.output.open("w", encoding="utf-8") as f:
            for record, answer in zip(records, answers, strict=True):
                line = {"key": record["key"], "task": record["task"], "answer": answer}
                f.write(json.dumps(line | {"correct": is_correct(record, answer)}) + "\n")
    shown: dict[str, int] = collections.Counter()
    for record, answer in zip(records, answers, strict=True):
        if shown[record["task"]] < args.show_errors and not is_correct(record, answer):
            shown[record["task"]] += 1
            expected = record["messages"][-1].get("content") or record["messages"][-1].get("tool_calls")
            print(f"[{record['task']}] {prompt_of(record).text[-120:]!r}\n  got {answer!r}\n  want {expected!r}")
    dtype = "float32" if args.backend == "transformers" else args.dtype
    print(f"backend: {args.backend}, dtype: {dtype}, model: {args.model}")
    print(format_table(evaluate(records, answers)))


if __name__ == "__main__":
    main()
