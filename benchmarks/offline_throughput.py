"""Offline generation throughput: herd's LLM vs transformers' generate on the same weights.

Makes each checkpoint from a config in benchmarks/configs/ (random weights, bfloat16, saved in
HF layout under --workdir), then times greedy generation with EOS ignored:
decode tokens/s at batch 1, and total (input + output) tokens/s for N requests, where
transformers runs the N prompts as one static batch. Each figure is the best of --repeats runs,
so that a burst of other work on a shared machine does not decide the ratio.

    python benchmarks/offline_throughput.py --config tiny --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig

from herd.llm import LLM
from herd.sampling import SamplingParams

CONFIGS = Path(__file__).parent / "configs"


def make_checkpoint(name: str, workdir: Path) -> Path:
    path = workdir / name
    if (path / "config.json").is_file():
        return path
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    hf_config = Llama4TextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Llama4ForCausalLM(hf_config).to(torch.bfloat16)
    model.save_pretrained(path)
    return path


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return torch.randint(3, vocab, (n, length), generator=gen).tolist()


def bench_herd(
    path: Path, batch_sizes: list[int], input_len: int, output_len: int, repeats: int, quantization: str | None = None
) -> dict[str, float]:
    llm = LLM(str(path), dtype="bfloat16", quantization=quantization)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    vocab = llm.engine.config.vocab_size
    llm.generate([{"prompt_token_ids": p} for p in prompts(2, input_len, vocab)], params, use_tqdm=False)  # warm up
    results: dict[str, float] = {}
    # Batch 1: time the decode steps only (after the first token).
    engine = llm.engine
    for repeat in range(repeats):
        engine.add_request(f"b1-{repeat}", prompts(1, input_len, vocab)[0], params)
        engine.step()  # prefill + first token
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        _best(results, "decode_tok_s_batch1", (output_len - 1) / (time.perf_counter() - start))
    for n in batch_sizes:
        batch = [{"prompt_token_ids": p} for p in prompts(n, input_len, vocab)]
        for _ in range(repeats):
            start = time.perf_counter()
            outs = llm.generate(batch, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
            _best(results, f"total_tok_s_{n}", n * (input_len + output_len) / elapsed)
            _best(results, f"output_tok_s_{n}", n * output_len / elapsed)
    return results


def _best(results: dict[str, float], key: str, value: float) -> None:
    results[key] = max(results.get(key, 0.0), value)


@torch.no_grad()
def bench_transformers(
    path: Path, batch_sizes: list[int], input_len: int, output_len: int, repeats: int
) -> dict[str, float]:
    model = Llama4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    vocab = model.config.vocab_size

    def generate(batch: list[list[int]], new_tokens: int) -> float:
        ids = torch.tensor(batch)
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        assert out.shape[1] == input_len + new_tokens
        return time.perf_counter() - start

    generate(prompts(2, input_len, vocab), 4)  # warm up
    one = prompts(1, input_len, vocab)
    results: dict[str, float] = {}
    for _ in range(repeats):
        first = generate(one, 1)
        _best(results, "decode_tok_s_batch1", (output_len - 1) / (generate(one, output_len) - first))
    for n in batch_sizes:
        for _ in range(repeats):
            elapsed = generate(prompts(n, input_len, vocab), output_len)
            _best(results, f"total_tok_s_{n}", n * (input_len + output_len) / elapsed)
            _best(results, f"output_tok_s_{n}", n * output_len / elapsed)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["tiny", "scout_mini"], default="tiny")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/herd-bench"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[16, 64], help="none: batch 1 only")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument(
        "--quantization",
        nargs="+",
        default=["none"],
        choices=["none", "w8a16", "w4a16", "fp8"],
        help="a herd column for each",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = make_checkpoint(args.config, args.workdir)
    sizes, lengths = args.batch_sizes, (args.input_len, args.output_len)
    rows = {}
    for q in args.quantization:
        name = "herd" if q == "none" else f"herd-{q}"
        rows[name] = bench_herd(path, sizes, *lengths, args.repeats, None if q == "none" else q)
        print(name, json.dumps(rows[name]), flush=True)  # as each column ends: a long run shows progress
    if not args.skip_transformers:
        rows["transformers"] = bench_transformers(path, sizes, *lengths, args.repeats)
    keys = list(next(iter(rows.values())))
    print(
        f"config={args.config} threads={args.threads} input={args.input_len} output={args.output_len} "
        f"repeats={args.repeats} torch={torch.__version__} cpu={platform.processor() or platform.machine()}"
    )
    print(f"{'metric':<24}" + "".join(f"{name:>14}" for name in rows) + ("       ratio" if len(rows) == 2 else ""))
    for key in keys:
        values = [rows[name][key] for name in rows]
        ratio = f"{values[0] / values[1]:>11.2f}x" if len(values) == 2 else ""
        print(f"{key:<24}" + "".join(f"{v:>14.1f}" for v in values) + ratio)


if __name__ == "__main__":
    main()
