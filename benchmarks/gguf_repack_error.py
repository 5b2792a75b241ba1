"""The error herd adds when it repacks GGUF weights into its own layouts (--quantization w8a16 | w4a16 on a
.gguf file): each tensor is dequantized by the `gguf` package, then requantized to INT8 per output channel or
to INT4 per group of 128 inputs (64 or 32 on narrower ones).

Reported per GGML type: relative RMS error (||w' - w|| / ||w||) of the repack against the GGUF-dequantized
weight w, mean over the tensors of that type. Two sources:
- the committed K/IQ fixture (tests/fixtures/gguf/tiny-kquants.gguf, real llama.cpp blocks, tiny widths);
- Scout-width rows (2048 random normal inputs) quantized here by gguf-py (the types it can write), where the
  GGUF type's own error against the original is shown beside the repack's.

    python benchmarks/gguf_repack_error.py
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import gguf
import numpy as np
import torch

from herd.layers.quantization.int4 import group_for, quantize_int4_groups
from herd.layers.quantization.int8 import quantize_rows

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "gguf" / "tiny-kquants.gguf"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def repack_errors(w: torch.Tensor) -> tuple[float, float]:
    q8, s8 = quantize_rows(w)
    group = group_for(w.shape[1])
    q4, s4 = quantize_int4_groups(w, group)
    int4 = (q4.float().reshape(w.shape[0], -1, group) * s4[..., None]).reshape(w.shape)
    return rel(q8.float() * s8[:, None], w), rel(int4, w)


def main() -> None:
    by_type: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for tensor in gguf.GGUFReader(FIXTURE).tensors:
        data = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if data.ndim < 2 or tensor.tensor_type.name in ("F32", "F16", "BF16"):
            continue
        for matrix in data.reshape(-1, *data.shape[-2:]):
            by_type[tensor.tensor_type.name].append(repack_errors(torch.from_numpy(matrix.copy())))
    print("fixture (tiny widths): type, tensors, INT8 repack error, INT4 repack error")
    for name, errors in sorted(by_type.items()):
        e8, e4 = np.mean(errors, axis=0)
        print(f"  {name:8} {len(errors):4d} {e8:8.2%} {e4:8.2%}")
    print("Scout-width rows [256, 2048]: type, type's own error, INT8 repack error, INT4 repack error")
    w = np.random.default_rng(0).standard_normal((256, 2048)).astype(np.float32) / 2048**0.5
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q5_0):
        try:
            deq = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
        except NotImplementedError:
            continue
        own = rel(torch.from_numpy(deq), torch.from_numpy(w))
        e8, e4 = repack_errors(torch.from_numpy(np.array(deq, dtype=np.float32)))
        print(f"  {qtype.name:8} {own:8.2%} {e8:8.2%} {e4:8.2%}")


if __name__ == "__main__":
    main()
