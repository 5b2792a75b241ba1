"""herd against its peers (llama.cpp's llama-server, vLLM's CPU build) on one checkpoint, one server at a time.

Drives the scripts of ../shared/peers (built by its `setup.sh`): starts each server, runs the same client
against it (`bench.sh`: random prompts, one connection per request, greedy, EOS ignored), stops it, then
prints a table of mean output tokens/s and TPOT per engine and concurrency with herd's ratio to each peer.
This checkout's herd is the one served (PYTHONPATH), whatever the venv has installed.

    python benchmarks/peers.py --model scout-mini --input-len 128 --output-len 64 --points "1:6 16:32" \\
        --engines herd llama-bf16 llama-q8_0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("peers")

REPO = Path(__file__).resolve().parent.parent
PORTS = {"herd": 30000, "vllm": 8000, "llama": 8002}


def peers_scripts() -> Path:
    return Path(os.environ.get("PEERS_SCRIPTS", REPO.parent / "shared" / "peers"))


def peers_dir() -> Path:
    return Path(os.environ.get("PEERS_DIR", Path(os.environ.get("TMPDIR", "/tmp")) / "herd-peers"))


def run(script: str, *args: str, env: dict[str, str]) -> None:
    cmd = [str(peers_scripts() / script), *args]
    logger.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env, cwd=REPO)


def start(engine: str, model: str, max_running: int, env: dict[str, str]) -> tuple[str, Path]:
    """Start `engine` (herd, vllm, llama-<gguf type>); returns (its URL, its pid file)."""
    ckpt = str(peers_dir() / model)
    if engine == "herd":
        port = PORTS["herd"]
        run("start_herd.sh", ckpt, str(port), "--max-running-requests", str(max_running), env=env)
        pid = "herd"
    elif engine == "vllm":
        port = PORTS["vllm"]
        run("start_vllm.sh", ckpt, str(port), env=env)
        pid = "vllm"
    elif engine.startswith("llama-"):
        port = PORTS["llama"]
        run("start_llama_server.sh", f"{ckpt}-{engine.removeprefix('llama-')}.gguf", str(port), env=env)
        pid = "llama-server"
    else:
        raise ValueError(f"unknown engine {engine!r}: herd, vllm or llama-<bf16|q8_0|q4_k_m>")
    return f"http://127.0.0.1:{port}", peers_dir() / f"{pid}-{port}.pid"


def results(tag_prefix: str) -> dict[tuple[str, int], list[dict]]:
    """The records of this run, by (engine, concurrency)."""
    rows: dict[tuple[str, int], list[dict]] = {}
    path = peers_dir() / "results" / "serving.jsonl"
    for line in path.read_text().splitlines():
        record = json.loads(line)
        label, c, _rep = record["tag"].rsplit("/", 2)
        if label.startswith(tag_prefix):
            rows.setdefault((label.removeprefix(tag_prefix), int(c.removeprefix("c="))), []).append(record)
    return rows


def mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def table(rows: dict[tuple[str, int], list[dict]]) -> str:
    lines = [
        "| engine | c | output tok/s (each repeat) | mean TPOT ms | 1000/TPOT | failed | herd/engine |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for (engine, c), records in sorted(rows.items(), key=lambda item: (item[0][1], item[0][0] != "herd")):
        tput = mean(records, "output_throughput")
        herd = rows.get(("herd", c))
        ratio = f"{mean(herd, 'output_throughput') / tput:.2f}" if herd and engine != "herd" else ""
        each = " / ".join(f"{r['output_throughput']:.1f}" for r in records)
        tpot = mean(records, "mean_tpot_ms")
        decode = f"{1000 / tpot:.0f}" if tpot else "-"
        failed = sum(r.get("failed", 0) for r in records)
        lines.append(f"| {engine} | {c} | {each} | {tpot:.2f} | {decode} | {failed} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama4", help="a checkpoint folder of PEERS_DIR")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--points", default="1:8 16:64", help='"C:N ...": N prompts, at most C in flight')
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["herd", "llama-bf16"])
    parser.add_argument("--max-running-requests", type=int, default=64, help="herd's")
    parser.add_argument("--report-only", help="print the table of an earlier run's tag prefix")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.report_only:
        print(table(results(args.report_only)))
        return
    tag = f"{args.model}-{time.strftime('%H%M%S')}-"
    env = {**os.environ, "HERD_DIR": str(REPO), "PYTHONPATH": str(REPO), "PEERS_DIR": str(peers_dir())}
    env.setdefault("HERD_PY", sys.executable)
    # A fresh seed range per run: the same prompts for every engine, none repeated on a server's prefix cache.
    env.setdefault("SEED_OFFSET", str(int(time.time()) % 1000 * 100))
    tokenizer = str(peers_dir() / args.model)
    for engine in args.engines:
        url, pid_file = start(engine, args.model, args.max_running_requests, env)
        try:
            run("bench.sh", tag + engine, url, tokenizer, str(args.input_len), str(args.output_len), args.points,
                str(args.repeats), env=env)  # fmt: skip
            if pid_file.is_file():
                subprocess.run([str(peers_scripts() / "rss.sh"), str(pid_file)], env=env, check=False)
        finally:
            run("stop.sh", str(pid_file), env=env)
    print(f"{args.model}, input {args.input_len}, output {args.output_len}, tag {tag}")
    print(table(results(tag)))


if __name__ == "__main__":
    main()
