"""Where a batch-1 decode step's time goes in herd's offline engine: per-step time of its phases (no HTTP).

Wraps the engine's phase functions (scheduling, step inputs, attention metadata, the forward and its parts, the LM
head, sampling) with timers, decodes one greedy request and prints microseconds per step of each, slowest first.
The timers cost ~1 us a call, and the phases nest (`forward` holds `model op` or, where it does not serve, the
modules' `rope angles`, `embedding`, ...).

    python benchmarks/cpu_step_phases.py /tmp/herd-peers/tiny-llama4 --output-len 1024
"""

from __future__ import annotations

import argparse
import collections
import functools
import time
from collections.abc import Callable
from typing import Any

import torch

import herd.engine.core as core_module
import herd.layers.norm as norm_module
import herd.layers.vocab as vocab_module
import herd.models.llama4_cpu_decode as fused_module
import herd.models.llama4_text as text_module
import herd.worker.worker as worker_module
from herd.llm import LLM
from herd.sampling import SamplingParams

seconds: collections.Counter[str] = collections.Counter()
calls: collections.Counter[str] = collections.Counter()


def timed(owner: Any, name: str, label: str | None = None) -> None:
    """Replace owner.name (a function or method) by a timed call of it."""
    inner: Callable[..., Any] = getattr(owner, name)
    key = label or name

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - start
            calls[key] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for owner, name, label in [
        (core_module.EngineCore, "step", "core step"),
        (core_module.EngineCore, "_plan", "core plan"),
        (core_module.EngineCore, "_append", "core append"),
        (worker_module.Worker, "_execute", "worker execute"),
        (worker_module, "build_step_inputs", "step inputs"),
        (worker_module, "sample_chunks", "sampling"),
        (text_module.Llama4ForCausalLM, "forward", "forward"),
        (text_module.Llama4ForCausalLM, "compute_logits", "LM head"),
        (text_module, "fused_step", "fused step setup"),
        (fused_module.FusedStep, "__call__", "model op"),
        # The modules' steps only (prefills; decode steps where the model op does not serve):
        (text_module, "rope_angles", "rope angles"),
        (vocab_module.VocabParallelEmbedding, "forward", "embedding"),
        (norm_module.RMSNorm, "forward", "norms"),
    ]:
        timed(owner, name, label)
    llm = LLM(args.checkpoint, dtype="bfloat16")
    engine = llm.engine
    timed(type(engine.core.scheduler), "schedule", "scheduler")
    timed(type(engine.core.workers[0].backend), "build_metadata", "attention metadata")
    greedy = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for request_id in ("warm-up", "timed"):
        seconds.clear()
        calls.clear()
        prompt = torch.randint(3, engine.config.vocab_size, (args.input_len,)).tolist()
        engine.add_request(request_id, prompt, greedy)
        steps, start = 0, time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        wall = time.perf_counter() - start
    print(f"{steps} steps, {wall / steps * 1e6:.0f} us a step (LLMEngine.step, with its output processing)")
    for key, total in seconds.most_common():
        print(f"{key:20s} {total / steps * 1e6:8.1f} us/step  {calls[key] / steps:4.1f} calls/step")


if __name__ == "__main__":
    main()
