"""The server under pressure: metrics that tell the truth, a KV budget far below the load, a full queue.

Each test starts its own small server on 127.0.0.1 (the tiny real-vocabulary checkpoint), since each needs
other limits; traffic is bounded in requests and every wait in seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx
import pytest

from herd.config.server_args import ServerArgs

from server_fixtures import ServerThread, metrics, wait_idle, wait_until

MODEL = "herd-test"
PAGE = 16


def make_args(ckpt, **kwargs) -> ServerArgs:  # type: ignore[no-untyped-def]
    base = {"model_path": str(ckpt[0]), "dtype": "float32", "served_model_name": MODEL, "context_length": 256}
    return ServerArgs(**{**base, **kwargs})


@pytest.fixture
def small_kv_server(real_vocab_ckpt) -> Iterator[ServerThread]:
    # 12 pages of 16 tokens: about 10 requests of 16 prompt + output tokens at a time.
    with ServerThread(make_args(real_vocab_ckpt, max_total_tokens=12 * PAGE, page_size=PAGE)) as running:
        yield running


def prompt_ids(i: int) -> list[int]:
    """Distinct 10-token prompts (ids of ordinary words), so the prefix cache cannot serve them whole."""
    return [1000 + (i * 7 + j) % 5000 for j in range(10)]


def test_kv_usage_counts_only_blocks_held_by_requests(small_kv_server: ServerThread) -> None:
    url = small_kv_server.url
    body = {"model": MODEL, "prompt": prompt_ids(0), "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):  # a few events in: the request is decoding
            next(lines)
        with small_kv_server.paused() as engine_waiting:
            engine_waiting.wait(timeout=60)
            # One request of 10 prompt tokens and a few outputs holds one or two of the 12 pages.
            during = metrics(url)["herd:kv_cache_usage_perc"]
            r.close()
    assert during in (1 / 12, 2 / 12)
    wait_idle(url)
    m = metrics(url)
    # Nothing runs: no request holds a block; its prefix stays in the prefix cache, evictable.
    assert m["herd:kv_cache_usage_perc"] == 0
    assert m["herd:kv_cache_evictable_perc"] > 0
    assert m["herd:num_aborted_requests_total"] == 1
    assert httpx.post(f"{url}/flush_cache").status_code == 200
    assert metrics(url)["herd:kv_cache_evictable_perc"] == 0
    # Within the context length (256) but beyond the whole KV pool (192 tokens): refused at once, not queued.
    never_fits = {"model": MODEL, "prompt": prompt_ids(1), "max_tokens": 200}
    r = httpx.post(f"{url}/v1/completions", json=never_fits, timeout=60)
    assert r.status_code == 400 and "cannot fit the KV cache (192 tokens)" in r.json()["error"]["message"], r.text


def test_500_requests_over_a_kv_budget_for_10(real_vocab_ckpt) -> None:
    # 20 pages; each request needs 2 (10 prompt + 8 output tokens): 10 at a time, and decoding past the
    # first page makes the scheduler preempt, since it admits as many as the prompts alone fit.
    args = make_args(real_vocab_ckpt, max_total_tokens=20 * PAGE, page_size=PAGE)
    with ServerThread(args) as server:
        results = asyncio.run(_many(server.url, 500, concurrency=100))
        wait_idle(server.url)
        assert len(results) == 500
        assert all(usage["completion_tokens"] == 8 for usage in results), "a request lost or gained tokens"
        m = metrics(server.url)
        assert m["herd:num_preemptions_total"] > 0
        assert m["herd:kv_cache_usage_perc"] == 0
        assert m['herd:requests_finished_total{finish_reason="length"}'] == 500
        # With the prefix cache flushed, any block still taken would be a leak.
        assert httpx.post(f"{server.url}/flush_cache").status_code == 200
        assert metrics(server.url)["herd:kv_cache_evictable_perc"] == 0


async def _many(url: str, count: int, concurrency: int) -> list[dict[str, int]]:
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)

    async def one(client: httpx.AsyncClient, i: int) -> dict[str, int]:
        body = {"model": MODEL, "prompt": prompt_ids(i), "max_tokens": 8, "ignore_eos": True, "temperature": 1.0}
        async with limit:
            r = await client.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(one(client, i) for i in range(count)))


def test_a_full_queue_gets_503_with_retry_after(real_vocab_ckpt) -> None:
    args = make_args(real_vocab_ckpt, max_running_requests=2, max_queued_requests=1, max_request_body_bytes=2000)
    with ServerThread(args) as server, ThreadPoolExecutor(3) as pool:
        engine = server.app.state.ctx.engine
        body = {"model": MODEL, "prompt": prompt_ids(0), "max_tokens": 4, "ignore_eos": True}
        post = partial(httpx.post, f"{server.url}/v1/completions", timeout=60)
        with server.paused():
            accepted = [pool.submit(post, json=body) for _ in range(3)]  # 2 may run, 1 may wait
            wait_until(lambda: engine.outputs.num_sequences == 3, "three requests in the engine")
            refused = httpx.post(f"{server.url}/v1/completions", json=body)
            too_many = httpx.post(f"{server.url}/v1/completions", json={**body, "n": 2})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "queue_full" and "--max-queued-requests" in error["message"]
        assert too_many.status_code == 503
        assert [f.result().status_code for f in accepted] == [200, 200, 200]
        assert metrics(server.url)["herd:num_rejected_requests_total"] == 2
        assert httpx.post(f"{server.url}/v1/completions", json=body).status_code == 200  # room again

        # Limits, each a clear refusal naming it.
        big = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": "x" * 3000})
        assert big.status_code == 413 and "--max-request-body-bytes" in big.json()["error"]["message"]
        chunked = httpx.post(f"{server.url}/v1/completions", content=iter([b"{" + b" " * 1500, b" " * 1500 + b"}"]))
        assert chunked.status_code == 413
        for extra, words in (
            ({"n": 129}, ["n must be at most 128"]),
            ({"stop": ["."] * 65}, ["stop must hold at most 64"]),
            ({"logprobs": 21}, ["logprobs", "20"]),
            ({"max_tokens": 300}, ["context length (256 tokens)"]),
        ):
            r = httpx.post(f"{server.url}/v1/completions", json={**body, **extra})
            assert r.status_code == 400 and all(w in r.json()["error"]["message"] for w in words), r.text


def test_a_request_past_request_timeout_gets_504_and_frees_its_kv(real_vocab_ckpt) -> None:
    args = make_args(real_vocab_ckpt, request_timeout=1.0, max_total_tokens=12 * PAGE, page_size=PAGE)
    with ServerThread(args) as server:
        body = {"model": MODEL, "prompt": prompt_ids(0), "max_tokens": 50, "ignore_eos": True}
        with server.paused() as engine_waiting:  # the engine never steps: no request can finish in time
            timed_out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
            engine_waiting.wait(timeout=30)
            with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
                events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert timed_out.status_code == 504, timed_out.text
        error = timed_out.json()["error"]
        assert error["code"] == "request_timeout" and "--request-timeout" in error["message"]
        assert r.status_code == 200 and events[-1] == "data: [DONE]"
        assert '"code":"request_timeout"' in events[-2]
        wait_idle(server.url)
        m = metrics(server.url)
        assert m["herd:kv_cache_usage_perc"] == 0 and m["herd:num_aborted_requests_total"] == 2
        # A request within the limit is served as usual.
        ok = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
