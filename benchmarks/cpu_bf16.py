"""bfloat16 against float32 on this CPU: one linear layer at 1, 16 and 128 rows, then the demo model answering 32
chats greedily, alternated. On a CPU without AVX-512 nor AVX-NE-CONVERT oneDNN emulates bf16, and herd's
`--dtype auto` serves a bf16 checkpoint in float32 there (herd/worker/worker.py).

    python benchmarks/cpu_bf16.py
"""

from __future__ import annotations

import time

import torch

from herd.demo import MODEL_PATH
from herd.llm import LLM
from herd.sampling import SamplingParams

QUESTIONS = [[{"role": "user", "content": f"What is {a} * {a + 7}?"}] for a in range(12, 44)]


def time_linear(rows: int, dtype: torch.dtype, calls: int = 100) -> float:
    weight, x = torch.randn(1536, 256, dtype=dtype), torch.randn(rows, 256, dtype=dtype)
    for _ in range(5):
        torch.nn.functional.linear(x, weight)
    start = time.perf_counter()
    for _ in range(calls):
        torch.nn.functional.linear(x, weight)
    return (time.perf_counter() - start) / calls


def main() -> None:
    print(f"torch threads: {torch.get_num_threads()}")
    for rows in (1, 16, 128):
        for dtype in (torch.float32, torch.bfloat16):
            print(f"linear [{rows}, 256] x [1536, 256]^T, {dtype}: {time_linear(rows, dtype) * 1e6:.0f} us")
    params = SamplingParams(temperature=0.0, max_tokens=64)
    for dtype in ("float32", "bfloat16", "float32", "bfloat16"):
        llm = LLM(str(MODEL_PATH), dtype=dtype)
        llm.chat(QUESTIONS[:2], params, use_tqdm=False)
        start = time.perf_counter()
        outputs = llm.chat(QUESTIONS, params, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        print(f"demo model, {dtype}: {len(QUESTIONS)} chats, {tokens} tokens in {time.perf_counter() - start:.2f} s")
        del llm


if __name__ == "__main__":
    main()
