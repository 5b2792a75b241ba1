"""TTFT over one kept-alive connection vs a fresh connection per request, against any OpenAI-compatible server.

A pooled client (the openai SDK, httpx.Client) sends each request on a connection that already exists; if the
server leaves Nagle's algorithm on, the response's first bytes wait for the client's delayed ACK (~40 ms on
Linux). Fresh connections do not show it, which is why a benchmark client that opens one per request misses it.

    python benchmarks/ttft_pooled.py --base-url http://127.0.0.1:30000 --requests 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx


def ttft_ms(client: httpx.Client, url: str, body: dict[str, object]) -> float:
    start = time.perf_counter()
    first: float | None = None
    with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: ") and line != "data: [DONE]":
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError("the server streamed no data event")
    return first * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:30000")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=4)
    args = parser.parse_args()
    model = httpx.get(f"{args.base_url}/v1/models", trust_env=False).json()["data"][0]["id"]
    url = f"{args.base_url}/v1/completions"
    body = {"model": model, "prompt": "What is 2+3?", "max_tokens": args.max_tokens, "stream": True, "temperature": 0}
    with httpx.Client(trust_env=False) as client:
        for _ in range(3):  # warm up, and open the connection
            ttft_ms(client, url, body)
        pooled = [ttft_ms(client, url, body) for _ in range(args.requests)]
    fresh = []
    for _ in range(args.requests):
        with httpx.Client(trust_env=False) as client:
            fresh.append(ttft_ms(client, url, body))
    print(f"median TTFT: kept-alive connection {statistics.median(pooled):.1f} ms, "
          f"fresh connection {statistics.median(fresh):.1f} ms ({args.requests} requests each)")  # fmt: skip


if __name__ == "__main__":
    main()
