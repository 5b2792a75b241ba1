"""Soak test: many short requests, some clients leaving mid-stream, and memory and KV usage afterwards.

Starts `herd serve` on 127.0.0.1 over the tiny random checkpoint of benchmarks/configs/tiny.json (made under
--workdir; no tokenizer, so prompts are token ids to SGLang's /generate), sends `--requests` short requests
`--concurrency` at a time, of which `--disconnect-share` are streamed and dropped after their first event.
Reports the resident memory (server + engine process) after the first `--checkpoint` requests and at the
end, and the server's KV usage once idle. Exits 1 if memory grew more than `--max-rss-growth` or KV usage
does not return to 0.

The KV pool is fixed (`--max-total-tokens`, 8192 by default) so that the prefix cache has filled it before
the checkpoint. On the CPU the pool is allocated untouched and its pages become resident as blocks are first
used; the prefix cache keeps each finished request's blocks until the pool is full, so with the default
8 GiB CPU budget the engine's memory would grow by the KV of one cached block per request (16 KiB on the
tiny model) for millions of tokens: the pool filling, bounded by its size, not a leak. A GPU allocates the
pool up front.

    python benchmarks/soak.py --requests 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from offline_throughput import make_checkpoint  # this folder


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.M).group(1)) / 1024  # type: ignore[union-attr]


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen[str], str, int]:
    cmd = [sys.executable, "-m", "herd.launch_server", "--model-path", model, "--port", "0", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert proc.stderr is not None
    url = engine_pid = None
    for line in proc.stderr:
        if match := re.search(r"engine core runs in process (\d+)", line):
            engine_pid = int(match.group(1))
        if match := re.search(r"serving \S+ at (http://\S+)", line):
            url = match.group(1)
            break
    if url is None or engine_pid is None:
        proc.kill()
        raise SystemExit("the server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    return proc, url, engine_pid


async def one(client: httpx.AsyncClient, url: str, i: int, drop: bool, max_tokens: int) -> str:
    # 16 prompt tokens, a quarter of them shared with other requests (the prefix cache gets some use).
    ids = [3 + (i % 4)] * 4 + [3 + (i * 31 + j * 7) % 31000 for j in range(12)]
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}}
    if not drop:
        r = await client.post(f"{url}/generate", json=body)
        return "ok" if r.status_code == 200 else f"http {r.status_code}"
    async with client.stream("POST", f"{url}/generate", json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break  # leave after the first event: the server must abort it and free its KV
    return "dropped"


async def run(args: argparse.Namespace, url: str, pids: list[int]) -> dict[str, object]:
    rng = random.Random(args.seed)
    drops = [rng.random() < args.disconnect_share for _ in range(args.requests)]
    outcomes: dict[str, int] = {}
    done = 0
    rss_at_checkpoint: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=args.concurrency)
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal done, rss_at_checkpoint
            while not queue.empty():
                i = queue.get_nowait()
                outcome = await one(client, url, i, drops[i], args.max_tokens)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                done += 1
                if done == args.checkpoint:
                    rss_at_checkpoint = [rss_mib(p) for p in pids]
                if done % 1000 == 0:
                    rss = " + ".join(f"{rss_mib(p):.1f}" for p in pids)
                    print(
                        f"{done} requests, {time.monotonic() - start:.0f} s, RSS {rss} MiB", file=sys.stderr, flush=True
                    )

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.monotonic() - start
    for _ in range(600):  # the dropped requests' aborts reach the engine within a step or two
        if metric(url, "herd:num_requests_running") == 0 and metric(url, "herd:num_requests_waiting") == 0:
            break
        await asyncio.sleep(0.1)
    rss_end = [rss_mib(p) for p in pids]
    return {
        "requests": args.requests,
        "outcomes": outcomes,
        "seconds": round(elapsed, 1),
        "requests_per_s": round(args.requests / elapsed, 1),
        "rss_mib_after_checkpoint": round(sum(rss_at_checkpoint), 1),
        "rss_mib_end": round(sum(rss_end), 1),
        "rss_growth": round(sum(rss_end) / sum(rss_at_checkpoint) - 1, 4),
        # [server process, engine process]
        "rss_mib_by_process_checkpoint": [round(x, 1) for x in rss_at_checkpoint],
        "rss_mib_by_process_end": [round(x, 1) for x in rss_end],
        "kv_cache_usage_perc_idle": metric(url, "herd:kv_cache_usage_perc"),
        "kv_cache_evictable_perc_idle": metric(url, "herd:kv_cache_evictable_perc"),
        "aborted": metric(url, "herd:num_aborted_requests_total"),
        "preemptions": metric(url, "herd:num_preemptions_total"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/herd-bench"), help="where the checkpoint is made")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--checkpoint", type=int, default=1_000, help="requests after which RSS is the baseline")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--disconnect-share", type=float, default=0.10)
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-total-tokens", type=int, default=8192, help="KV pool size: small enough to be full by the checkpoint"
    )
    parser.add_argument("--server-args", default="", help="more flags for herd serve, one string")
    args = parser.parse_args()
    model = make_checkpoint("tiny", args.workdir)
    flags = ["--skip-tokenizer-init", "--dtype", "bfloat16", "--max-total-tokens", str(args.max_total_tokens)]
    flags += args.server_args.split()
    proc, url, engine_pid = start_server(str(model), flags)
    try:
        result = asyncio.run(run(args, url, [proc.pid, engine_pid]))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(json.dumps(result, indent=2))
    ok = result["rss_growth"] <= args.max_rss_growth and result["kv_cache_usage_perc_idle"] == 0  # type: ignore[operator]
    print("PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
