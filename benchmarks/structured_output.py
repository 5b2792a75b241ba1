"""What constrained decoding costs: decode throughput of the same requests with and without a JSON schema.

The tiny config of benchmarks/configs/ (random weights) with the real Llama 4 vocabulary (202,048 tokens,
Meta's tokenizer.model from the llama-models package), so the grammar's per-step work (xgrammar's
bitmask over the whole vocabulary, unpacking it, masking the logits) is what a Llama 4 checkpoint pays.
16 requests run at once, temperature 1, EOS ignored, the same prompts and seeds both ways. The schema
(an array of at least 100 {name, n} objects) cannot close within --output-len tokens, so every step of
every constrained sequence is constrained. The sampler draws such a row (plain temperature) from the unmasked
distribution first and masks only when the grammar refuses the draw; the random model's draws are refused
often (inside a JSON number only ~1k of the 202k tokens are allowed), so the share refused is printed too.
Each side is the best of --repeats runs, interleaved, so a burst of
other work on a shared machine does not decide the ratio. Also timed: the CPU time of the grammar's own work
(advancing matchers, filling bitmasks, masking logits, sampling refused rows again) per constrained output
token, which load inflates far less than the ratio of two throughputs.

    python benchmarks/structured_output.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path

import llama_models
import torch
from offline_throughput import CONFIGS, prompts
from transformers import Llama4ForCausalLM, Llama4TextConfig

from herd.llm import LLM
from herd.sampling import SamplingParams, grammar, sampler
from herd.sampling.grammar import StructuredOutput

SCHEMA = {
    "type": "array",
    "minItems": 100,
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["name", "n"],
        "additionalProperties": False,
    },
}
VOCAB = 202048


def real_vocab_tiny(workdir: Path) -> Path:
    """The tiny config over the real vocabulary, random weights, Meta's tokenizer.model beside them."""
    path = workdir / "tiny_real_vocab"
    if not (path / "config.json").is_file():
        config = json.loads((CONFIGS / "tiny.json").read_text())
        config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
        torch.manual_seed(0)
        model = Llama4ForCausalLM(Llama4TextConfig(**{**config, "vocab_size": VOCAB, "bos_token_id": 200000}))
        model.to(torch.bfloat16).save_pretrained(path)
    shutil.copy(Path(llama_models.__file__).parent / "llama4" / "tokenizer.model", path / "tokenizer.model")
    return path


class GrammarClock:
    """Thread CPU time spent inside the grammar's per-step calls (the engine runs in this process's thread): the
    matchers' accepting (`try_accept` is the draw-first check), filling bitmasks, masking whole rows, and
    sampling refused rows again among their allowed tokens."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.draws = {True: 0, False: 0}  # first draws the grammar allowed / refused
        for owner, name in (
            (grammar.GrammarState, "accept"),
            (grammar.GrammarState, "try_accept"),
            (grammar.GrammarMasker, "fill"),
            (grammar.StepMask, "apply"),
            (sampler, "sample_allowed"),  # a refused draw sampled again among the allowed tokens
        ):
            setattr(owner, name, self._timed(getattr(owner, name)))
        counted = grammar.GrammarState.try_accept

        def try_accept(state, token_id):  # type: ignore[no-untyped-def]
            allowed = counted(state, token_id)
            self.draws[allowed] += 1
            return allowed

        grammar.GrammarState.try_accept = try_accept  # type: ignore[method-assign]

    def _timed(self, method):  # type: ignore[no-untyped-def]
        def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/herd-bench"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(str(real_vocab_tiny(args.workdir)), dtype="bfloat16", max_running_requests=args.requests)
    clock = GrammarClock()
    free = SamplingParams(temperature=1.0, max_tokens=args.output_len, ignore_eos=True, seed=0)
    constrained = replace(free, structured=StructuredOutput("json_schema", json.dumps(SCHEMA)))
    batch = [{"prompt_token_ids": p} for p in prompts(args.requests, args.input_len, VOCAB)]
    for params in (free, constrained):  # warm up (and compile the grammar once)
        llm.generate(batch[:2], replace(params, max_tokens=4), use_tqdm=False)
    best = {"free": 0.0, "constrained": 0.0}
    cpu_ms = {"free": float("inf"), "constrained": float("inf")}  # process CPU time per output token, least
    clock.seconds, clock.draws = 0.0, {True: 0, False: 0}
    loads = [os.getloadavg()[0]]
    tokens = args.requests * args.output_len
    for _ in range(args.repeats):
        for name, params in (("free", free), ("constrained", constrained)):
            start, cpu_start = time.perf_counter(), time.process_time()
            outs = llm.generate(batch, params, use_tqdm=False)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
            best[name] = max(best[name], tokens / elapsed)
            cpu_ms[name] = min(cpu_ms[name], 1e3 * cpu / tokens)
            loads.append(os.getloadavg()[0])
    grammar_ms = 1e3 * clock.seconds / (args.repeats * args.requests * args.output_len)
    draws = dict(clock.draws)
    sample = llm.generate(batch[:1], constrained, use_tqdm=False)[0].outputs[0].text
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}))
    print(f"output tok/s, {args.requests} at once: free {best['free']:.1f}, constrained {best['constrained']:.1f}")
    print(f"cost of the grammar: {100 * (1 - best['constrained'] / best['free']):.1f}% of decode throughput")
    # On a shared machine the wall clock measures the neighbours; CPU time per token is what this process spent.
    print(f"process CPU ms per output token: free {cpu_ms['free']:.2f}, constrained {cpu_ms['constrained']:.2f}")
    print(f"cost of the grammar in CPU time: {100 * (cpu_ms['constrained'] / cpu_ms['free'] - 1):.1f}%")
    print(f"grammar CPU time: {grammar_ms:.3f} ms per constrained output token")
    n_draws = sum(draws.values())
    print(f"first draws refused by the grammar: {100 * draws[False] / max(1, n_draws):.0f}% of {n_draws}")
    print(f"load average (1 min) during the runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs")
    print(f"a constrained output begins: {sample[:80]!r}")


if __name__ == "__main__":
    main()
