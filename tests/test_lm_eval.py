"""Real `lm_eval` (the PyPI package, offline) against herd serving the demo model, both ways, with the
tasks and commands of benchmarks/lm_eval: a generation task through local-chat-completions, scored as
scripts/eval_demo_model.py scores the same items, and a multiple-choice loglikelihood task through
local-completions (/v1/completions echo + logprobs), checked against transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from herd.config.server_args import ServerArgs
from herd.demo import MODEL_PATH

from demo import data
from demo.evaluate import evaluate, generate_herd, prompt_of
from server_fixtures import ServerThread

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "benchmarks" / "lm_eval"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(ServerArgs(dtype="float32", context_length=2048, max_total_tokens=8192)) as running:
        yield running


def lm_eval(tmp_path: Path, *argv: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the lm_eval command line as the README gives it (from the repo root); its results and samples."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path)}
    cmd = [sys.executable, "-m", "lm_eval", *argv, "--include_path", str(TASKS), "--output_path", str(out)]
    proc = subprocess.run([*cmd, "--log_samples"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob("samples_*.jsonl")).read_text().splitlines()]
    return results, samples


def test_generation_task_through_chat_completions(server: ServerThread, tmp_path: Path) -> None:
    base_url = f"{server.url}/v1/chat/completions"
    results, samples = lm_eval(
        tmp_path,
        "--model", "local-chat-completions",
        "--model_args", f"model=herd-demo,base_url={base_url},num_concurrent=4,max_retries=1",
        "--apply_chat_template", "--tasks", "herd_demo_arithmetic", "--limit", "8",
    )  # fmt: skip
    score = results["results"]["herd_demo_arithmetic"]["exact_match,final_number"]
    # The same held-out items through scripts/eval_demo_model.py's herd backend and scoring.
    keys = [s["doc"]["key"] for s in samples]
    by_key = {r["key"]: r for r in data.generate("heldout", {"arithmetic": 60}, seed=0)}
    records = [by_key[k] for k in keys]
    answers = generate_herd(MODEL_PATH, [prompt_of(r) for r in records], 64, dtype="float32")
    correct, total = map(sum, zip(*evaluate(records, answers).values(), strict=True))
    assert total == len(samples) == 8
    assert score == pytest.approx(correct / total)
    assert [s["resps"][0][0] for s in samples] == answers  # the same greedy answers, item by item


def test_loglikelihood_task_through_completions(server: ServerThread, tmp_path: Path) -> None:
    base_url = f"{server.url}/v1/completions"
    results, samples = lm_eval(
        tmp_path,
        "--model", "local-completions",
        "--model_args",
        f"model=herd-demo,base_url={base_url},tokenizer={MODEL_PATH},tokenizer_backend=huggingface,max_retries=1",
        "--tasks", "herd_demo_capital_mc", "--limit", "5", "--batch_size", "20",
    )  # fmt: skip
    from tokenizers import Tokenizer
    from transformers import Llama4ForConditionalGeneration

    tokenizer = Tokenizer.from_file(str(MODEL_PATH / "tokenizer.json"))
    model = Llama4ForConditionalGeneration.from_pretrained(MODEL_PATH, dtype=torch.float32, use_kernels=False).eval()
    for sample in samples:
        doc = sample["doc"]
        # lm_eval moves the context's trailing whitespace (the header's "\n\n") into the continuation.
        context = tokenizer.encode(doc["prompt"].rstrip(), add_special_tokens=False).ids
        scores = []
        for choice, resp in zip(doc["choices"], sample["resps"], strict=True):  # resp: [[loglikelihood, greedy]]
            ids = tokenizer.encode(doc["prompt"] + choice, add_special_tokens=False).ids  # as lm_eval splits it
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
            want = sum(logprobs[p - 1, ids[p]].item() for p in range(len(context), len(ids)))
            assert float(resp[0][0]) == pytest.approx(want, abs=1e-3)
            scores.append(want)
        assert sample["acc"] == float(scores.index(max(scores)) == doc["gold"])
    assert results["results"]["herd_demo_capital_mc"]["acc,none"] == pytest.approx(
        sum(s["acc"] for s in samples) / len(samples)
    )
