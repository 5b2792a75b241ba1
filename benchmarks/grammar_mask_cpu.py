"""What a grammar mask costs on the CPU per step: xgrammar's kernel, torch's bit unpacking, and softmax.

16 rows of Llama 4's 202,048 logits in float32 (the sampler's dtype), a bitmask that allows only the first
320 tokens (a JSON grammar's structural positions allow few). Prints the mean ms of each operation.

    python benchmarks/grammar_mask_cpu.py
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import xgrammar as xgr


def mean_ms(fn: Callable[[], object], runs: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - start) / runs * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=202_048)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    rows, vocab = args.rows, args.vocab
    logits = torch.randn(rows, vocab)
    bitmask = torch.zeros(rows, (vocab + 31) // 32, dtype=torch.int32)
    bitmask[:, :10] = -1  # 320 allowed tokens per row
    masked = logits.clone()
    xgr.apply_token_bitmask_inplace(masked, bitmask)
    shifts = torch.arange(32, dtype=torch.int32)

    def torch_unpack() -> None:
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(rows, -1)[:, :vocab]
        logits.clone().masked_fill_(~allowed, float("-inf"))

    print(f"{rows} x {vocab} float32, {torch.get_num_threads()} torch threads, mean of {args.runs}")
    print(f"softmax, no mask:                 {mean_ms(lambda: torch.softmax(logits, -1), args.runs):6.2f} ms")
    print(f"softmax, masked rows:             {mean_ms(lambda: torch.softmax(masked, -1), args.runs):6.2f} ms")
    print(f"clone:                            {mean_ms(logits.clone, args.runs):6.2f} ms")
    xgr_ms = mean_ms(lambda: xgr.apply_token_bitmask_inplace(logits.clone(), bitmask), args.runs)
    print(f"clone + xgrammar apply:           {xgr_ms:6.2f} ms")
    print(f"clone + torch unpack, masked_fill: {mean_ms(torch_unpack, args.runs):6.2f} ms")


if __name__ == "__main__":
    main()
