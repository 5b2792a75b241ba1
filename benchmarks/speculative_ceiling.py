"""The most speculative decoding can gain on a target: drafts that cost nothing, with a chosen accept length.

An oracle proposer drafts from the plain greedy answer it was given beforehand: per verify step, the next
`--correct` tokens of that answer and then wrong ones, `--draft` tokens in all. So every verify step has
`draft + 1` rows (as a real chain of that length does) and accepts exactly `correct + 1` tokens (fewer near the
answer's end). Decode tokens/s against the plain engine on the same prompts, alternately, at batch 1, greedy.
The ratio is the ceiling for any draft with that accept length and verify width on this target and machine;
a real draft's own cost comes on top.

    python benchmarks/speculative_ceiling.py --draft 3 --correct 0 1 2 3    # EAGLE-3's chain of 3 (4 rows)
    python benchmarks/speculative_ceiling.py --draft 7 --correct 0 1 3 5 7  # NGRAM's 8-token window
"""

from __future__ import annotations

import argparse
import json
import logging

import torch
from speculative import CHAT_PROMPTS, COPY_PROMPTS, decode_run, encode

from herd.demo import MODEL_PATH
from herd.llm import LLM
from herd.speculative import Proposer, StepSeq


class OracleProposer(Proposer):
    """Drafts `correct` tokens of the known answer, then wrong ones up to `num_draft`."""

    def __init__(self, num_draft: int, correct: int, vocab_size: int) -> None:
        super().__init__(num_draft)
        self.correct, self.vocab_size = correct, vocab_size
        self.answers: dict[str, list[int]] = {}  # request id -> prompt + the plain greedy answer

    def propose(self, seqs: list[StepSeq], aux_hidden: torch.Tensor | None) -> dict[str, list[int]]:
        drafts = {}
        for s in seqs:
            if not s.wants_draft:
                continue
            answer, done = self.answers[s.seq_id.split("#")[0]], len(s.tokens)  # "<request id>#<choice>"
            right = answer[done : done + self.correct]
            # Verification stops at the first wrong draft, so only it needs to differ from the answer's next token;
            # the rest of the chain repeats it.
            after = done + len(right)
            wrong = (answer[after] + 1) % self.vocab_size if after < len(answer) else 0
            drafts[s.seq_id] = right + [wrong] * (self.num_draft - len(right))
        return drafts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", type=int, default=3, help="draft tokens per verify step")
    parser.add_argument("--correct", type=int, nargs="+", default=[0, 1, 2, 3], help="of them right, per run")
    parser.add_argument("--prompts", choices=("chat", "copy"), default="chat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    common = {"dtype": "auto", "disable_radix_cache": True}
    plain = LLM(str(MODEL_PATH), **common)
    # NGRAM sets up the speculative path with no draft model (its draft tokens count the verified one); its
    # proposer is then swapped for the oracle.
    spec = LLM(str(MODEL_PATH), **common, speculative_algorithm="NGRAM", speculative_num_draft_tokens=args.draft + 1)
    worker = spec.engine.core.workers[0]
    vocab = plain.get_tokenizer().vocab_size
    prompts = encode(plain, CHAT_PROMPTS if args.prompts == "chat" else COPY_PROMPTS)
    answers = [ids + decode_run(plain, ids, args.max_tokens, f"ref-{i}")[0] for i, ids in enumerate(prompts)]
    for correct in args.correct:
        oracle = worker.proposer = OracleProposer(args.draft, min(correct, args.draft), vocab)
        best = {"plain": 0.0, "oracle": 0.0}
        stats = spec.engine.core.spec_stats
        for repeat in range(args.repeats):
            steps0, tokens0 = stats.verify_steps, stats.tokens
            totals = {name: [0, 0.0] for name in best}
            for i, ids in enumerate(prompts):
                name = f"{correct}-{repeat}-{i}"
                oracle.answers[name] = answers[i]
                for side, llm in (("plain", plain), ("oracle", spec)):
                    out, secs = decode_run(llm, ids, args.max_tokens, name)
                    if out != answers[i][len(ids) :]:
                        raise RuntimeError(f"{side} answered prompt {i} differently from the reference")
                    totals[side][0] += len(out) - 1
                    totals[side][1] += secs
            for side, (n, secs) in totals.items():
                best[side] = max(best[side], n / secs)
            accept = (stats.tokens - tokens0) / max(1, stats.verify_steps - steps0)
        row = {"draft": args.draft, "correct": correct, "accept_length": round(accept, 3), "prompts": args.prompts,
               "decode_tok_s_plain": round(best["plain"], 1), "decode_tok_s_oracle": round(best["oracle"], 1),
               "speedup": round(best["oracle"] / best["plain"], 2)}  # fmt: skip
        print(json.dumps(row))


if __name__ == "__main__":
    main()
