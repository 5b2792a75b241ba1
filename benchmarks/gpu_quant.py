"""Quantized Llama 4 on one GPU (issue 20's GPU acceptance), through the engine (`LLM`) on dummy weights.

1. Scout's shape at full depth (48 layers) with --quantization w4a16: does it load on one GPU with at least
   16k tokens of KV cache, and what is the batch-1 decode time per token (target <= 5 ms)?
2. FP8 experts vs bf16 on the same GPU: --quantization fp8 against no quantization on --layers layers of
   Scout's shape (bf16 Scout does not fit one GPU at full depth), batch-1 decode time per token.

Decode time per token = (time to generate N tokens - time to generate 1) / (N - 1), best of --repeats, for
one 16-token prompt, greedy, EOS ignored. Dummy weights are made and quantized layer by layer, so the
full-precision model never exists in memory.

    python benchmarks/gpu_quant.py --out /tmp/gpu_quant.json          # on a GPU
    python benchmarks/gpu_quant.py --device cpu --tiny                 # a smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from herd.llm import LLM
from herd.sampling import SamplingParams

CONFIGS = Path(__file__).parent / "configs"


def decode_ms(llm: LLM, tokens: int, repeats: int) -> float:
    prompt = {"prompt_token_ids": list(range(3, 19))}

    def run(n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        return time.perf_counter() - start

    run(4)  # warm-up: kernels compiled, graphs captured
    one = min(run(1) for _ in range(repeats))
    many = min(run(tokens) for _ in range(repeats))
    return (many - one) / (tokens - 1) * 1e3


def measure(cfg: dict[str, Any], layers: int, quantization: str | None, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
        if args.device == "cuda":
            torch.cuda.empty_cache()
        start = time.perf_counter()
        llm = LLM(folder, load_format="dummy", dtype="bfloat16", device=args.device, quantization=quantization,
                  context_length=32768, max_running_requests=4)  # fmt: skip
        load_s = time.perf_counter() - start
        core = llm.engine.core
        result = {
            "layers": layers,
            "quantization": quantization or "bf16",
            "load_s": round(load_s, 1),
            "weight_gib": round(core.workers[0].weight_bytes() / 2**30, 2),
            "kv_tokens": core.info.max_request_tokens,
            "decode_ms_per_token": round(decode_ms(llm, args.tokens, args.repeats), 3),
        }
        if args.device == "cuda":
            result["max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(json.dumps(result), flush=True)
        del llm
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="benchmarks/configs/tiny.json instead of Scout's shape")
    p.add_argument("--layers", type=int, default=8, help="layers for the FP8 vs bf16 comparison")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-full", action="store_true", help="skip the 48-layer W4A16 run")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cfg = json.loads((CONFIGS / ("tiny.json" if args.tiny else "scout_shape.json")).read_text())
    results = []
    if not args.skip_full:
        results.append(measure(cfg, cfg["num_hidden_layers"] if args.tiny else 48, "w4a16", args))
        ok = (results[-1]["kv_tokens"] or 0) >= 16384 and results[-1]["decode_ms_per_token"] <= 5.0
        print(f"target (>= 16k KV tokens, <= 5 ms/token at batch 1): {'met' if ok else 'NOT met'}", flush=True)
    for quantization in (None, "fp8", "w4a16"):
        results.append(measure(cfg, min(args.layers, cfg["num_hidden_layers"]) if args.tiny else args.layers,
                               quantization, args))  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
