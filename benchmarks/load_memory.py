"""Peak resident memory of loading a checkpoint, against the checkpoint's size.

Loads the model as the CPU worker does (bfloat16, oneDNN-packed weights) in this process and reports the
growth of resident memory over the load: the peak (VmHWM, reset after imports) and what stays. A load
without transient copies peaks near 1.0x the checkpoint's bytes (plus the one tensor in flight).

    python benchmarks/load_memory.py /tmp/herd-peers/scout-mini [--plain] [--engine]

--engine measures the whole offline engine instead (weights, KV cache and warm-up); the KV pool's size is
then part of the growth.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from herd.layers.factory import LayerFactory
from herd.layers.quantization.unquantized import UnquantizedConfig
from herd.models.loader import load_model


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--plain", action="store_true", help="weights as stored (no oneDNN packing)")
    parser.add_argument("--engine", action="store_true", help="the whole offline engine (herd.llm.LLM)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.engine:
        from herd.llm import LLM  # imported before the baseline, so its import is not counted

    reset_peak()
    before = status_kib("VmRSS")
    if args.engine:
        loaded: object = LLM(str(args.checkpoint), dtype="bfloat16")
    else:
        factory = LayerFactory(UnquantizedConfig(cpu_packed=not args.plain))
        loaded = load_model(args.checkpoint, dtype=torch.bfloat16, factory=factory)
    peak, held = status_kib("VmHWM"), status_kib("VmRSS")
    del loaded
    ckpt = checkpoint_bytes(args.checkpoint)
    result = {
        "checkpoint_gib": round(ckpt / 2**30, 3),
        "baseline_rss_gib": round(before / 2**20, 3),
        "peak_growth_gib": round((peak - before) / 2**20, 3),
        "peak_growth_ratio": round((peak - before) * 1024 / ckpt, 3),
        "held_growth_gib": round((held - before) / 2**20, 3),
        "mode": "engine" if args.engine else ("plain" if args.plain else "cpu methods"),
        "HERD_CPU_GEMV": os.environ.get("HERD_CPU_GEMV", "1"),
    }
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
