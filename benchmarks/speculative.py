"""Speculative decoding at batch 1 on the CPU: decode tokens/s with and without, in one run.

Two modes, each on the packaged demo model (herd/demo/model), greedy, natural stops:
- eagle3: the EAGLE-3 draft trained for the demo model (herd/demo/draft), on chat prompts of its tasks;
- ngram: prompt lookup, on prompts whose answers repeat their context (the model says back what it was given).

Each prompt is timed with and without speculation, alternately (so a busy spell on a shared machine hits both),
as decode time only: from the step after the first token to the last. The greedy tokens are compared: in
float32 they are identical; in bfloat16 a verify step's wider matmuls round differently from a one-token
step's, so a near tie may go the other way (as it may between two batch sizes). The figure is total decode
tokens / total decode seconds over the prompts, best of --repeats; the mean accept length is the engine's
(tokens per verify step).

    python benchmarks/speculative.py --mode eagle3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from herd.demo import DRAFT_PATH, MODEL_PATH
from herd.llm import LLM
from herd.sampling import SamplingParams

logger = logging.getLogger("benchmarks.speculative")

# Held-out-style questions of the demo model's tasks: arithmetic with place-value steps, capitals, repeats.
CHAT_PROMPTS = [
    "What is 37 * 48?",
    "What is 64 * 79?",
    "Compute 58 * 26.",
    "What is 93 * 47?",
    "What is the capital of Peru?",
    "Which country has Canberra as its capital?",
    "Repeat after me: quarterly report draft",
    "What is 312 + 589?",
]
# Answers that copy the prompt: "say back" requests and products whose steps restate the operands.
COPY_PROMPTS = [
    "Repeat after me: sourdough bread recipe for beginners",
    "Repeat after me: quarterly report draft",
    "Repeat after me: 4821.37",
    "What is 37 * 48?",
    "What is 86 * 57?",
    "Multiply 73 by 68.",
]


def encode(llm: LLM, prompts: list[str]) -> list[list[int]]:
    tokenizer = llm.get_tokenizer()
    assert tokenizer is not None
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        for p in prompts
    ]


def decode_run(llm: LLM, ids: list[int], max_tokens: int, name: str) -> tuple[list[int], float]:
    """(output tokens, seconds of decode steps after the first token) of one request alone."""
    engine = llm.engine
    engine.add_request(name, {"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    outputs = engine.step()  # prefill + first token (and, with speculation, the first drafts)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outputs = engine.step() or outputs
    elapsed = time.perf_counter() - start
    return list(outputs[-1].outputs[0].token_ids), elapsed


def bench(
    mode: str, repeats: int, max_tokens: int, dtype: str, num_draft: int, ngram_min_match: int
) -> dict[str, object]:
    if mode == "eagle3":
        spec = {
            "speculative_algorithm": "EAGLE3",
            "speculative_draft_model_path": str(DRAFT_PATH),
            "speculative_num_steps": num_draft - 1,
            "speculative_num_draft_tokens": num_draft,
        }
    else:
        spec = {
            "speculative_algorithm": "NGRAM",
            "speculative_num_draft_tokens": num_draft,
            "speculative_ngram_min_match_window_size": ngram_min_match,
        }
    common = {"dtype": dtype, "disable_radix_cache": True}  # every prompt prefilled afresh, on both sides
    plain, fast = LLM(str(MODEL_PATH), **common), LLM(str(MODEL_PATH), **common, **spec)
    prompts = encode(plain, CHAT_PROMPTS if mode == "eagle3" else COPY_PROMPTS)
    decode_run(plain, prompts[0], 8, "warm-plain")
    decode_run(fast, prompts[0], 8, "warm-spec")
    core = fast.engine.core
    best = {"plain": 0.0, "spec": 0.0}
    for repeat in range(repeats):
        steps0, tokens0 = core.spec_stats.verify_steps, core.spec_stats.tokens
        totals = {"plain": [0, 0.0], "spec": [0, 0.0]}
        differ = 0
        for i, ids in enumerate(prompts):
            a, t_a = decode_run(plain, ids, max_tokens, f"plain-{repeat}-{i}")
            b, t_b = decode_run(fast, ids, max_tokens, f"spec-{repeat}-{i}")
            differ += a != b
            totals["plain"][0] += len(a) - 1
            totals["plain"][1] += t_a
            totals["spec"][0] += len(b) - 1
            totals["spec"][1] += t_b
        for side, (n, secs) in totals.items():
            best[side] = max(best[side], n / secs)
        accept = (core.spec_stats.tokens - tokens0) / max(1, core.spec_stats.verify_steps - steps0)
        logger.info("repeat %d: %s, accept length %.2f", repeat, totals, accept)
    return {
        "mode": mode,
        "dtype": dtype,
        "num_draft_tokens": num_draft,
        "prompts": len(prompts),
        "prompts_with_other_tokens": differ,
        "accept_length": round(accept, 3),
        "decode_tok_s_plain": round(best["plain"], 1),
        "decode_tok_s_spec": round(best["spec"], 1),
        "speedup": round(best["spec"] / best["plain"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("eagle3", "ngram", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--eagle-draft-tokens", type=int, default=4, help="SGLang's --speculative-num-draft-tokens")
    parser.add_argument("--ngram-draft-tokens", type=int, default=8)
    parser.add_argument("--ngram-min-match", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    for mode in ("eagle3", "ngram") if args.mode == "both" else (args.mode,):
        num_draft = args.eagle_draft_tokens if mode == "eagle3" else args.ngram_draft_tokens
        print(json.dumps(bench(mode, args.repeats, args.max_tokens, args.dtype, num_draft, args.ngram_min_match)))


if __name__ == "__main__":
    main()
