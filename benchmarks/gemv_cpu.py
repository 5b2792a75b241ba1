"""bf16 linear layers on the CPU, per shape and batch: herd's GEMV kernel vs oneDNN (packed and plain).

Shapes are scout-mini's (hidden 2048) and tiny's; GB/s counts the weight's bytes once per call. Each pass
calls a kernel once on each of several copies of the weight (256 MB in all: beyond the last-level cache, so
the bytes come from memory as in a decode step); the best of --passes passes counts, and the kernels take
turns pass by pass, so that a busy spell on a shared machine hits all of them.

    python benchmarks/gemv_cpu.py --threads 2 --batches 1 4 16 64
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from herd.kernels.cpu import gemv_ops
from herd.layers.quantization.unquantized import pack, packed_linear

SHAPES = {  # name: (out, in)
    "scout-mini qkv": (3072, 2048),
    "scout-mini o / down": (2048, 2048),
    "scout-mini gate_up": (4096, 2048),
    "scout-mini lm_head": (32000, 2048),
    "tiny gate_up": (1024, 256),
    "tiny lm_head": (32000, 256),
}


def pass_seconds(fn, xs: list[torch.Tensor], weights: list[object], clock=time.perf_counter) -> float:
    """One call on each weight copy: together they exceed the last-level cache, as a decode step's do."""
    start = clock()
    for x, w in zip(xs, weights, strict=True):
        fn(x, w)
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--passes", type=int, default=20, help="best of this many passes per kernel")
    parser.add_argument("--working-set-mb", type=int, default=256, help="weight copies per shape, in all")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by this thread's CPU time (with --threads 1): steadier than wall time on a busy machine",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    ops = gemv_ops()
    assert ops is not None, "the CPU kernels did not build"
    kernels = {
        "herd": (lambda x, w: ops.gemv_bf16(x, w), lambda w: w),
        "packed": (packed_linear, pack),
        "plain": (F.linear, lambda w: w),
    }
    print("| shape | M | herd GB/s | oneDNN packed GB/s | F.linear GB/s | max abs diff vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (n, k) in SHAPES.items():
        copies = max(1, args.working_set_mb * 2**20 // (n * k * 2))
        ws = [torch.randn(n, k).bfloat16() * 0.05 for _ in range(copies)]
        prepared = {key: [prep(w) for w in ws] for key, (_, prep) in kernels.items()}
        for m in args.batches:
            xs = [torch.randn(m, k).bfloat16() for _ in ws]
            ref = xs[0].float() @ ws[0].float().t()
            diff = (ops.gemv_bf16(xs[0], ws[0]).float() - ref).abs().max().item()
            best = dict.fromkeys(kernels, float("inf"))
            for _ in range(args.passes):  # interleaved: a busy spell hits every kernel
                for key, (fn, _) in kernels.items():
                    best[key] = min(best[key], pass_seconds(fn, xs, prepared[key], clock))
            gbs = {key: copies * n * k * 2 / t / 1e9 for key, t in best.items()}
            print(f"| {name} | {m} | {gbs['herd']:.1f} | {gbs['packed']:.1f} | {gbs['plain']:.1f} | {diff:.2e} |")


if __name__ == "__main__":
    main()
