"""Serving overhead: throughput over HTTP (herd's server, N concurrent clients) vs the offline engine.

Both sides run the same workload on the same checkpoint: --num-prompts random prompts of
--input-len tokens, --output-len tokens each, greedy, EOS ignored, at most --concurrency at a
time. The server side starts `python -m herd.launch_server` on a free local port and keeps
--concurrency streaming `/v1/completions` requests in flight; the offline side calls
`LLM.generate` with all prompts and `max_running_requests=--concurrency`. Each side's figure is
the best of --repeats runs.

    python benchmarks/server_vs_offline.py --config tiny --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

# Run as `python benchmarks/...`: this folder is on sys.path.
from offline_throughput import make_checkpoint, prompts

from herd.llm import LLM
from herd.sampling import SamplingParams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline(path: Path, batch: list[list[int]], output_len: int, concurrency: int, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    llm = LLM(str(path), dtype="bfloat16", max_running_requests=concurrency)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in batch[:4]], params, use_tqdm=False)  # warm up
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
        best = max(best, len(batch) * output_len / elapsed)
    return best


async def _client(base: str, batch: list[list[int]], output_len: int, concurrency: int, repeats: int) -> float:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        async def one(ids: list[int]) -> None:
            body = {
                "prompt": ids,
                "max_tokens": output_len,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            usage = None
            async with limit, client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        usage = json.loads(line[6:]).get("usage") or usage
            assert usage is not None and usage["completion_tokens"] == output_len

        await asyncio.gather(*(one(ids) for ids in batch[:4]))  # warm up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            await asyncio.gather(*(one(ids) for ids in batch))
            best = min(best, time.perf_counter() - start)
        return best


def served(
    path: Path, batch: list[list[int]], output_len: int, concurrency: int, threads: int | None, repeats: int
) -> float:
    port = free_port()
    # Without --server-threads the server picks its own thread count (one core left to HTTP on a CPU host).
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, "-m", "herd.launch_server", "--model-path", str(path), "--port", str(port)]
    server = subprocess.Popen([*cmd, "--dtype", "bfloat16", "--log-level", "warning"], env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("the server did not become healthy")
        elapsed = asyncio.run(_client(base, batch, output_len, concurrency, repeats))
        return len(batch) * output_len / elapsed
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=["tiny", "scout_mini"], default="tiny")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/herd-bench"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the offline engine")
    parser.add_argument("--server-threads", type=int, default=None, help="default: the server's own choice")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs on each side")
    args = parser.parse_args()
    path = make_checkpoint(args.config, args.workdir)
    batch = prompts(args.num_prompts, args.input_len, 32000)
    http = served(path, batch, args.output_len, args.concurrency, args.server_threads, args.repeats)
    local = offline(path, batch, args.output_len, args.concurrency, args.threads, args.repeats)
    print(
        f"config={args.config} prompts={args.num_prompts} concurrency={args.concurrency} "
        f"offline threads={args.threads} server threads={args.server_threads or 'default'} repeats={args.repeats}"
    )
    print(f"output tok/s  server {http:.1f}  offline {local:.1f}  server/offline {http / local:.2f}")


if __name__ == "__main__":
    main()
