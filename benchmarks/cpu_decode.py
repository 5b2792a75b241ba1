"""Batch-1 decode speed of herd's offline engine on a checkpoint (no HTTP): tokens/s after the first token.

Each repeat is a fresh random prompt (no prefix-cache hit), greedy, EOS ignored; prints each repeat's
tokens/s and their median. Compare herd's CPU kernels with PyTorch's (HERD_CPU_GEMV=0) by running it on the
same checkpoint, alternating, e.g.

    for v in 1 0 1 0; do HERD_CPU_GEMV=$v python benchmarks/cpu_decode.py /tmp/herd-peers/scout-mini; done
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch

from herd.llm import LLM
from herd.sampling import SamplingParams


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantization", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.checkpoint, dtype="bfloat16", quantization=args.quantization)
    engine, vocab = llm.engine, llm.engine.config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    rates = []
    for repeat in range(args.repeats + 1):  # the first is a warm-up
        prompt = torch.randint(3, vocab, (args.input_len,), generator=gen).tolist()
        engine.add_request(f"r{repeat}", prompt, params)
        engine.step()  # prefill and the first token
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        if repeat:
            rates.append((args.output_len - 1) / (time.perf_counter() - start))
    result = {
        "checkpoint": os.path.basename(args.checkpoint.rstrip("/")),
        "HERD_CPU_GEMV": os.environ.get("HERD_CPU_GEMV", "1"),
        "quantization": args.quantization,
        "tok_s": [round(r, 1) for r in rates],
        "median_tok_s": round(statistics.median(rates), 1),
        "rss_gib": round(resident_bytes() / 2**30, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
