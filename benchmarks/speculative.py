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
    python benchmarks/speculative.py --mode eagle3 --eagle-shapes 3,1,4 3,4,8 4,2,8  # chain vs trees, interleaved

--eagle-shapes takes SGLang's num_steps,eagle_topk,num_draft_tokens per EAGLE-3 server; each prompt runs on the
plain server, then on each of them in turn.
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
    mode: str, repeats: int, max_tokens: int, dtype: str, shapes: list[tuple[int, int, int]], ngram: tuple[int, int]
) -> list[dict[str, object]]:
    """One row per speculative server (each EAGLE-3 shape, or NGRAM), all timed against one plain server."""
    if mode == "eagle3":
        specs = {
            f"S{s}K{k}N{n}": {
                "speculative_algorithm": "EAGLE3",
                "speculative_draft_model_path": str(DRAFT_PATH),
                "speculative_num_steps": s,
                "speculative_eagle_topk": k,
                "speculative_num_draft_tokens": n,
            }
            for s, k, n in shapes
        }
    else:
        specs = {
            f"N{ngram[0]}": {
                "speculative_algorithm": "NGRAM",
                "speculative_num_draft_tokens": ngram[0],
                "speculative_ngram_min_match_window_size": ngram[1],
            }
        }
    common = {"dtype": dtype, "disable_radix_cache": True}  # every prompt prefilled afresh, on both sides
    llms = {"plain": LLM(str(MODEL_PATH), **common)}
    llms.update({name: LLM(str(MODEL_PATH), **common, **spec) for name, spec in specs.items()})
    prompts = encode(llms["plain"], CHAT_PROMPTS if mode == "eagle3" else COPY_PROMPTS)
    for name, llm in llms.items():
        decode_run(llm, prompts[0], 8, f"warm-{name}")
    best = dict.fromkeys(llms, 0.0)
    accept = dict.fromkeys(specs, 0.0)
    differ = dict.fromkeys(specs, 0)
    for repeat in range(repeats):
        before = {name: (llms[name].engine.core.spec_stats.verify_steps, llms[name].engine.core.spec_stats.tokens)
                  for name in specs}  # fmt: skip
        totals = {name: [0, 0.0] for name in llms}
        for i, ids in enumerate(prompts):
            want = None
            for name, llm in llms.items():  # interleaved: a busy spell on a shared machine hits every side
                out, secs = decode_run(llm, ids, max_tokens, f"{name}-{repeat}-{i}")
                if want is None:
                    want = out
                elif repeat == 0:
                    differ[name] += out != want
                totals[name][0] += len(out) - 1
                totals[name][1] += secs
        for name, (n, secs) in totals.items():
            best[name] = max(best[name], n / secs)
        for name in specs:
            stats = llms[name].engine.core.spec_stats
            steps0, tokens0 = before[name]
            accept[name] = (stats.tokens - tokens0) / max(1, stats.verify_steps - steps0)
        logger.info("repeat %d: %s, accept lengths %s", repeat, totals, accept)
    return [
        {
            "mode": mode,
            "shape": name,
            "dtype": dtype,
            "prompts": len(prompts),
            "prompts_with_other_tokens": differ[name],
            "accept_length": round(accept[name], 3),
            "decode_tok_s_plain": round(best["plain"], 1),
            "decode_tok_s_spec": round(best[name], 1),
            "speedup": round(best[name] / best["plain"], 2),
        }
        for name in specs
    ]


def shape(text: str) -> tuple[int, int, int]:
    s, k, n = (int(x) for x in text.split(","))
    return s, k, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("eagle3", "ngram", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument(
        "--eagle-shapes",
        type=shape,
        nargs="+",
        default=[(3, 1, 4)],
        help="num_steps,eagle_topk,num_draft_tokens per EAGLE-3 server (SGLang's flags)",
    )
    parser.add_argument("--ngram-draft-tokens", type=int, default=8)
    parser.add_argument("--ngram-min-match", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    for mode in ("eagle3", "ngram") if args.mode == "both" else (args.mode,):
        ngram = (args.ngram_draft_tokens, args.ngram_min_match)
        for row in bench(mode, args.repeats, args.max_tokens, args.dtype, args.eagle_shapes, ngram):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
