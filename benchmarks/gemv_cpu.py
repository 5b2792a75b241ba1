"""bf16 linear layers on the CPU, per shape and batch: herd's GEMV kernel vs oneDNN (packed and plain).

Shapes are scout-mini's (hidden 2048) and tiny's; GB/s counts the weight's bytes once per call. Each
configuration is timed in rounds that alternate between the kernels, so a busy spell hits all of them.

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


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ops = gemv_ops()
    assert ops is not None, "the CPU kernels did not build"
    print("| shape | M | herd GB/s | oneDNN packed GB/s | F.linear GB/s | fp32 GB/s | max abs diff vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k).bfloat16() * 0.05
        packed, w32 = pack(w), w.float()
        for m in args.batches:
            x = torch.randn(m, k).bfloat16()
            x32 = x.float()
            ref = x32 @ w32.t()
            diff = (ops.gemv_bf16(x, w).float() - ref).abs().max().item()
            kernels = {
                "herd": lambda x=x, w=w: ops.gemv_bf16(x, w),
                "packed": lambda x=x, p=packed: packed_linear(x, p),
                "plain": lambda x=x, w=w: F.linear(x, w),
                "fp32": lambda x=x32, w=w32: F.linear(x, w),
            }
            calls = max(3, int(2e8 / (n * k * 2)))
            best = dict.fromkeys(kernels, float("inf"))
            for _ in range(args.rounds):
                for key, fn in kernels.items():
                    best[key] = min(best[key], timed(fn, calls))
            gbs = {key: n * k * 2 / t / 1e9 for key, t in best.items()}
            gbs["fp32"] /= 2  # it reads fp32 weights: count the bf16 bytes it stands for
            print(f"| {name} | {m} | {gbs['herd']:.1f} | {gbs['packed']:.1f} | {gbs['plain']:.1f} | "
                  f"{gbs['fp32']:.1f} | {diff:.2e} |")  # fmt: skip


if __name__ == "__main__":
    main()
