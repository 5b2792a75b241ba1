"""Per-step collective time under tensor parallelism, measured on rank 0 (issue 21).

Runs the `tiny` config (benchmarks/configs/tiny.json, random weights) through `LLM` at --tp-size 1 and 2 and
times, on rank 0, each step's `execute` and, inside it, every torch.distributed call: the plan's broadcast
(pickled, over gloo) and the layers' all-reduces and the LM head's all-gather. Prefill and decode steps
are reported apart. On a 2-core CPU two ranks share the cores that one rank had: TP=2 is not expected
to be faster there; the figure of interest is what the collectives cost per step.

    python benchmarks/tp_collectives.py --batch 1 8 --input-len 32 --output-len 32
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from statistics import median

import torch
import torch.distributed as dist

from herd.llm import LLM
from herd.sampling import SamplingParams
from herd.worker import Worker
from herd.worker.distributed import TensorParallelDriver

CONFIGS = Path(__file__).parent / "configs"
TIMED = ("all_reduce", "all_gather", "broadcast_object_list")


class StepTimes:
    """Wraps the distributed calls and each step's execute; keeps (kind, step s, {call: (count, s)}) per step."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float, dict[str, list[float]]]] = []
        self._current: dict[str, list[float]] | None = None

    def install(self) -> None:
        for name in TIMED:
            setattr(dist, name, self._timed(name, getattr(dist, name)))
        for cls in (Worker, TensorParallelDriver):
            cls.execute = self._timed_step(cls.execute)  # type: ignore[method-assign]

    def _timed(self, name: str, fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self._current is not None:
                    self._current[name].append(time.perf_counter() - start)

        return wrapper

    def _timed_step(self, fn):  # type: ignore[no-untyped-def]
        def wrapper(worker, plan):  # type: ignore[no-untyped-def]
            if self._current is not None:  # the driver's inner Worker.execute: timed by the driver's
                return fn(worker, plan)
            self._current = defaultdict(list)
            start = time.perf_counter()
            try:
                return fn(worker, plan)
            finally:
                kind = "decode" if all(len(c.token_ids) == 1 for c in plan.chunks) else "prefill"
                self.steps.append((kind, time.perf_counter() - start, self._current))
                self._current = None

        return wrapper


def run(path: Path, tp: int, batch: int, input_len: int, output_len: int, times: StepTimes) -> dict[str, dict]:
    llm = LLM(str(path), load_format="dummy", dtype="float32", tp_size=tp, max_running_requests=batch)
    gen = torch.Generator().manual_seed(batch)
    prompts = [{"prompt_token_ids": p} for p in torch.randint(3, 32000, (batch, input_len), generator=gen).tolist()]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    times.steps.clear()
    llm.generate(prompts, params, use_tqdm=False)
    llm.engine.core.close()
    out = {}
    for kind in ("prefill", "decode"):
        steps = [s for s in times.steps if s[0] == kind]
        if not steps:
            continue
        row = {"steps": len(steps), "step_ms": 1e3 * median(s[1] for s in steps)}
        for name in TIMED:
            row[f"{name}_ms"] = 1e3 * median(sum(s[2].get(name, [])) for s in steps)
            row[f"{name}_calls"] = median(len(s[2].get(name, [])) for s in steps)
        out[kind] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    times = StepTimes()
    times.install()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        (path / "config.json").write_text((CONFIGS / "tiny.json").read_text())
        results = {
            f"tp{tp} batch{batch}": run(path, tp, batch, args.input_len, args.output_len, times)
            for batch in args.batch
            for tp in (1, 2)
        }
    print(json.dumps(results, indent=1))
    print("| run | kind | steps | step ms | collectives ms (calls) | plan broadcast ms | share |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, kinds in results.items():
        for kind, r in kinds.items():
            coll = r["all_reduce_ms"] + r["all_gather_ms"]
            calls = r["all_reduce_calls"] + r["all_gather_calls"]
            share = (coll + r["broadcast_object_list_ms"]) / r["step_ms"]
            print(f"| {name} | {kind} | {r['steps']} | {r['step_ms']:.2f} | {coll:.2f} ({calls:.0f}) | "
                  f"{r['broadcast_object_list_ms']:.2f} | {share:.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
