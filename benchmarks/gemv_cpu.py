"""Linear layers on the CPU at decode batch sizes, per weight format: herd's kernels vs PyTorch's.

bf16: herd's `gemv_bf16` vs oneDNN (packed and plain `F.linear`); INT8 (one scale per row): `gemv_int8` vs
`_weight_int8pack_mm`; W8A8 (INT8 weights, activations quantized per token, int32 sums): `w8a8_int8_linear` (AVX-512
VNNI) vs the same arithmetic on `torch._int_mm`; INT4 (groups of 128, which herd runs on
`_weight_int4pack_mm_for_cpu`) for scale. Shapes are scout-mini's (hidden 2048); GB/s counts the weight's bytes once
per call. Each pass calls a kernel once on each of several copies of the weight (256 MB of bf16 in all: beyond the
last-level cache, so the bytes come from memory as in a decode step); the best of --passes passes counts, and the
kernels take turns pass by pass, so that a busy spell on a shared machine hits all of them.

    python benchmarks/gemv_cpu.py --threads 2 --batches 1 4 8
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from herd.kernels.cpu import gemv_ops
from herd.kernels.cpu.int8_vnni import pack_for_vnni, w8a8_reference
from herd.layers.quantization.int4 import pack_for_kernel, quantize_int4_groups
from herd.layers.quantization.int8 import quantize_rows
from herd.layers.quantization.unquantized import pack, packed_linear
from herd.layers.quantization.w8a8_int8 import quantize_weight

SHAPES = {  # name: (out, in)
    "scout-mini qkv": (3072, 2048),
    "scout-mini o / down": (2048, 2048),
    "scout-mini gate_up": (4096, 2048),
    "scout-mini lm_head": (32000, 2048),
}
GROUP = 128

# format -> kernel name -> (prepare a bf16 weight, call on (x, prepared))
Kernel = tuple[Callable[[torch.Tensor], object], Callable[[torch.Tensor, object], torch.Tensor]]


def kernels(ops: object) -> dict[str, dict[str, Kernel]]:
    def int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_rows(w)

    def w8a8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        q, scales, sums = quantize_weight(w)
        return q, scales, sums, pack_for_vnni(q)

    def int4_torch(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, scales = quantize_int4_groups(w, GROUP)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
        zeros = torch.zeros_like(scales.t())
        return packed, torch.stack([scales.t(), zeros], dim=-1).bfloat16().contiguous()

    def int4_herd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, scales = quantize_int4_groups(w, GROUP)
        return pack_for_kernel(q, scales, torch.bfloat16, cpu_layout=False)

    return {
        "bf16": {
            "herd": (lambda w: w, lambda x, w: ops.gemv_bf16(x, w)),
            "oneDNN packed": (pack, packed_linear),
            "F.linear": (lambda w: w, F.linear),
        },
        "int8": {
            "herd": (int8, lambda x, w: ops.gemv_int8(x, *w)),
            "_weight_int8pack_mm": (int8, lambda x, w: torch.ops.aten._weight_int8pack_mm(x, *w)),
        },
        "w8a8": {
            "herd VNNI": (w8a8, lambda x, w: ops.w8a8_int8_linear(x, w[3], w[1], w[2])),
            "torch._int_mm": (w8a8, lambda x, w: w8a8_reference(x, w[0], w[1])),
            # w8a16's kernel on the same weight, interleaved with the others (its diff: x's rounding to INT8).
            "herd gemv_int8 (w8a16)": (w8a8, lambda x, w: ops.gemv_int8(x, w[0], w[1])),
        },
        "int4": {
            **(
                {"herd (AVX512-BF16)": (int4_herd, lambda x, w: ops.w4a16_linear(x, w[0], w[1], GROUP))}
                if ops.int4_bf16_supported()
                else {}
            ),
            "_weight_int4pack_mm_for_cpu": (
                int4_torch,
                lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], GROUP, w[1]),
            ),
        },
    }


BYTES_PER_WEIGHT = {"bf16": 2.0, "int8": 1.0, "w8a8": 1.0, "int4": 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--formats", nargs="+", default=list(BYTES_PER_WEIGHT))
    parser.add_argument("--passes", type=int, default=15, help="best of this many passes per kernel")
    parser.add_argument("--working-set-mb", type=int, default=256, help="bf16 weight copies per shape, in all")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time by this thread's CPU time (with --threads 1): steadier than wall time on a busy machine",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    ops = gemv_ops()
    assert ops is not None, "the CPU kernels did not build (or this CPU lacks AVX-512)"
    print("| format | shape | M | kernel | GB/s | us/call | max abs diff vs the first kernel |")
    print("|---|---|---:|---|---:|---:|---:|")
    for fmt in args.formats:
        table = kernels(ops)[fmt]
        for name, (n, k) in SHAPES.items():
            copies = max(1, args.working_set_mb * 2**20 // (n * k * 2))
            ws = [torch.randn(n, k).bfloat16() * 0.05 for _ in range(copies)]
            prepared = {key: [prep(w) for w in ws] for key, (prep, _) in table.items()}
            for m in args.batches:
                x = torch.randn(m, k).bfloat16()
                best = dict.fromkeys(table, float("inf"))
                for _ in range(args.passes):  # interleaved: a busy spell hits every kernel
                    for key, (_, fn) in table.items():
                        start = clock()
                        for w in prepared[key]:
                            fn(x, w)
                        best[key] = min(best[key], clock() - start)
                first = next(iter(table))  # the others are compared with the first
                ref = table[first][1](x, prepared[first][0]).float()
                for key, (_, fn) in table.items():
                    diff = (fn(x, prepared[key][0]).float() - ref).abs().max().item()
                    gbs = copies * n * k * BYTES_PER_WEIGHT[fmt] / best[key] / 1e9
                    us = best[key] / copies * 1e6
                    print(f"| {fmt} | {name} | {m} | {key} | {gbs:.1f} | {us:.0f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
