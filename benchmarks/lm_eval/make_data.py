"""The JSONL files behind the lm_eval tasks in this folder, from the demo model's held-out split.

    PYTHONPATH=scripts .venv/bin/python benchmarks/lm_eval/make_data.py

- `data/demo_arithmetic.jsonl`: held-out arithmetic questions and their final numbers (generation task
  `herd_demo_arithmetic`, scored like scripts/eval_demo_model.py: the number after the last `=`).
- `data/demo_capital_mc.jsonl`: held-out "capital of <country>" questions, as the chat prompt the model
  sees, with four answer sentences (the right city and three others) for the loglikelihood task
  `herd_demo_capital_mc`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from demo import data
from demo.evaluate import prompt_of

HERE = Path(__file__).parent
NUM_CHOICES = 4


def arithmetic_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        if r["task"] == "arithmetic":
            final = r["messages"][-1]["content"].rstrip(".").rsplit("=", 1)[1].strip()
            rows.append({"key": r["key"], "question": r["messages"][0]["content"], "answer": final})
    return rows


def capital_rows(records: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for r in records:
        if r["task"] != "capital" or r["subtask"] != "capital":
            continue
        country = r["key"].split("|")[1]
        others = rng.sample([c for c in data.COUNTRIES if c != country], NUM_CHOICES - 1)
        cities = [data.CAPITALS[c] for c in [country, *others]]
        rng.shuffle(cities)
        choices = [f"The capital of {country} is {city}." for city in cities]
        prompt = prompt_of(r).text  # the chat template's rendering, <|begin_of_text|> to the assistant header
        rows.append(
            {"key": r["key"], "prompt": prompt, "choices": choices, "gold": cities.index(data.CAPITALS[country])}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "data")
    parser.add_argument("--count", type=int, default=60, help="held-out records per task before filtering")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    records = data.generate("heldout", {"arithmetic": args.count, "capital": args.count}, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (
        ("demo_arithmetic.jsonl", arithmetic_rows(records)),
        ("demo_capital_mc.jsonl", capital_rows(records, args.seed)),
    ):
        with (args.out / name).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{args.out / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
