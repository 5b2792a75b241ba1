"""Batch-1 decode speed of herd's offline engine on a checkpoint (no HTTP): tokens/s after the first token.

Each repeat is a fresh random prompt (no prefix-cache hit), greedy, EOS ignored; prints each repeat's
tokens/s and their median. Compare herd's CPU kernels with PyTorch's (HERD_CPU_GEMV=0) by running it on the
same checkpoint, alternating, e.g.

    for v in 1 0 1 0; do HERD_CPU_GEMV=$v python benchmarks/cpu_decode.py /tmp/herd-peers/scout-mini; done

weights in huge pages with 4 KiB ones the same way (HERD_CPU_HUGE_PAGES=0), and the compiled decode step with
eager (`--enable-torch-compile`; `slowest_warmup_step_s` is about the compilation, `load_s` the engine's start).
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
    parser.add_argument("--enable-torch-compile", action="store_true", help="compile the decode step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    llm = LLM(
        args.checkpoint,
        dtype="bfloat16",
        quantization=args.quantization,
        enable_torch_compile=args.enable_torch_compile,
    )
    load_s = time.perf_counter() - start
    engine, vocab = llm.engine, llm.engine.config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    gen = torch.Generator().manual_seed(0)
    rates, cpu_ms, slowest_warmup_step = [], [], 0.0
    for repeat in range(args.repeats + 1):  # the first is a warm-up (and compiles the step when compiled)
        prompt = torch.randint(3, vocab, (args.input_len,), generator=gen).tolist()
        engine.add_request(f"r{repeat}", prompt, params)
        while engine.has_unfinished_requests():
            step_start = time.perf_counter()
            outputs = engine.step()  # prefill until the first token
            if repeat == 0:
                slowest_warmup_step = max(slowest_warmup_step, time.perf_counter() - step_start)
            if any(o.outputs[0].token_ids for o in outputs):
                break
        start, cpu_start = time.perf_counter(), time.process_time()
        while engine.has_unfinished_requests():
            step_start = time.perf_counter()
            engine.step()
            if repeat == 0:
                slowest_warmup_step = max(slowest_warmup_step, time.perf_counter() - step_start)
        if repeat:
            rates.append((args.output_len - 1) / (time.perf_counter() - start))
            # CPU time per step (all threads): under a shared machine's load it moves less than wall time, which
            # also counts the time other processes hold the cores.
            cpu_ms.append(1000 * (time.process_time() - cpu_start) / (args.output_len - 1))
    result = {
        "checkpoint": os.path.basename(args.checkpoint.rstrip("/")),
        "HERD_CPU_GEMV": os.environ.get("HERD_CPU_GEMV", "1"),
        "quantization": args.quantization,
        "compiled": args.enable_torch_compile,
        "load_s": round(load_s, 1),
        "slowest_warmup_step_s": round(slowest_warmup_step, 1),  # the compilation, when compiled
        "tok_s": [round(r, 1) for r in rates],
        "median_tok_s": round(statistics.median(rates), 1),
        "median_ms_per_step": round(1000 / statistics.median(rates), 2),
        "median_cpu_ms_per_step": round(statistics.median(cpu_ms), 2),
        "rss_gib": round(resident_bytes() / 2**30, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
