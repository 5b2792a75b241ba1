"""Offline EAGLE-3 chain acceptance of the demo draft on held-out demo prompts (issue 22).

    PYTHONPATH=.:scripts .venv/bin/python benchmarks/eagle3_acceptance.py --per-task 10

For each held-out prompt (seed 0's held-out split, `--per-task` of each task): herd answers greedily in
float32 (the target's greedy output); transformers reads prompt + answer once for the target's hidden states
at the draft's layers. Then speculative decoding is replayed with `Eagle3Drafter` exactly as the engine drives
it: extend over the prompt, then per round draft `--num-steps` tokens, accept the longest prefix that matches
the greedy answer, and extend over the verified positions. Acceptance length of a round = accepted drafts + 1
(the target's own token), as SGLang reports it; the figure is their mean over all rounds.
"""

from __future__ import annotations

import argparse
import collections
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from herd.models.llama4_eagle3 import Eagle3Drafter, load_eagle3_draft

logger = logging.getLogger(__name__)


def replay(drafter: Eagle3Drafter, full: list[int], prompt_len: int, aux: torch.Tensor, steps: int) -> list[int]:
    """Tokens produced per verification round while generating full[prompt_len:] (the first comes from prefill)."""
    seq = 0
    drafter.release(seq)
    ids = torch.tensor(full)
    # Entry p reads the token at p + 1: the prompt's positions, the last reading the prefill's answer token.
    drafter.extend(seq, ids[1 : prompt_len + 1], aux[:prompt_len], 0)
    answer, known, rounds = full[prompt_len:], 1, []
    while known < len(answer):
        drafts = drafter.draft(seq, steps)
        truth = answer[known : known + steps]
        accepted = 0
        while accepted < len(truth) and drafts[accepted] == truth[accepted]:
            accepted += 1
        produced = min(accepted + 1, len(answer) - known)  # no bonus token past the answer's end
        rounds.append(produced)
        # The target verified positions of the last known token and the accepted drafts.
        first = prompt_len + known - 1
        drafter.extend(seq, ids[first + 1 : first + 1 + produced], aux[first : first + produced], first)
        known += produced
    return rounds


def greedy_answers(
    model_dir: Path, records: list[dict[str, Any]], max_new_tokens: int, patches_per_tile: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids with each picture's patch tokens written out, greedy answer ids) per record, herd in float32."""
    from herd import LLM, SamplingParams

    from demo import images
    from demo.evaluate import image_size, prompt_of
    from demo.train import image_prompt

    llm = LLM(str(model_dir), enable_multimodal=True, dtype="float32")
    tokenizer = llm.get_tokenizer()
    requests, prompts = [], []
    for record in records:
        prompt = prompt_of(record)
        request: dict[str, Any] = {"prompt_token_ids": tokenizer.encode(prompt.text, add_special_tokens=False)}
        if prompt.image is not None:
            request["multi_modal_data"] = {"image": [images.render(prompt.image, size=image_size(model_dir))]}
        requests.append(request)
        expanded = prompt.text.replace("<|image|>", image_prompt(patches_per_tile))
        prompts.append(tokenizer.encode(expanded, add_special_tokens=False))
    outs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    return [(p, list(o.outputs[0].token_ids)) for p, o in zip(prompts, outs, strict=True)]


def main() -> None:
    from herd.demo import DRAFT_PATH, MODEL_PATH

    from demo.data import HELDOUT_COUNTS, generate
    from demo.train import load_reference, use_routed_experts
    from demo.train_eagle3 import capture, per_tile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL_PATH)
    parser.add_argument("--draft", type=Path, default=DRAFT_PATH)
    parser.add_argument("--per-task", type=int, default=10, help="held-out prompts of each task")
    parser.add_argument("--num-steps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    records = generate("heldout", {task: min(n, args.per_task) for task, n in HELDOUT_COUNTS.items()}, seed=0)
    target = load_reference(args.model).eval()
    answers = greedy_answers(args.model, records, args.max_new_tokens, per_tile(target))
    use_routed_experts(target)
    drafter = load_eagle3_draft(
        args.draft,
        target.config.text_config,
        torch.float32,
        "cpu",
        target_embedding=target.language_model.model.embed_tokens.weight.detach(),
    )
    per_task: dict[str, list[int]] = collections.defaultdict(list)
    disagree = 0
    for record, (prompt, answer) in zip(records, answers, strict=True):
        full = prompt + answer
        ((aux, greedy),) = capture(target, [(full, record.get("image"))], drafter.target_layer_ids)
        # herd's float32 answer should be transformers' greedy answer too; count where it is not.
        disagree += int((greedy[len(prompt) - 1 : len(full) - 1] != torch.tensor(answer)).any())
        per_task[record["task"]] += replay(drafter, full, len(prompt), aux, args.num_steps)

    rounds = [r for rs in per_task.values() for r in rs]
    print(f"draft {args.draft}, num_steps {args.num_steps}, {len(records)} held-out prompts, {len(rounds)} rounds")
    for task, rs in per_task.items():
        print(f"  {task:12s} mean acceptance length {sum(rs) / len(rs):.2f} over {len(rs)} rounds")
    print(f"mean acceptance length {sum(rounds) / len(rounds):.3f} (accepted drafts + 1, per verification round)")
    print(f"answers where herd float32 and transformers greedy differ: {disagree} of {len(records)}")
    print(f"{platform.node()}, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
