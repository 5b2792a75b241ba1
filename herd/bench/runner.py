"""Drive a benchmark run: warm up, send every request on its arrival schedule, collect timed outputs.

One `httpx.AsyncClient` sends every request of a run, each on a connection of its own as SGLang's client
does: a server may close a kept-alive connection just as the next request goes out on it (llama-server
does), and that request would be lost. Arrivals are all at once for an infinite request rate, else a
Poisson process (exponential gaps); `max_concurrency` caps requests in flight whatever the arrival rate,
as in SGLang.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from herd.bench.backends import Backend, send_request
from herd.bench.datasets import DatasetRow
from herd.bench.request import RequestInput, RequestOptions, RequestOutput

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 6 * 60 * 60  # SGLang's: a benchmark request may legitimately take hours
CONNECT_TIMEOUT_S = 30.0
WARMUP_MAX_TOKENS = 32


class BenchmarkError(RuntimeError):
    """The run cannot start: the server is unreachable, or every warmup request failed."""


@dataclass(frozen=True)
class RunConfig:
    backend: Backend
    base_url: str
    model: str
    request_rate: float = float("inf")
    max_concurrency: int | None = None
    options: RequestOptions = field(default_factory=RequestOptions)
    extra_request_body: Mapping[str, Any] = field(default_factory=dict)
    warmup_requests: int = 1
    flush_cache: bool = False
    disable_tqdm: bool = False
    seed: int = 1

    @property
    def api_url(self) -> str:
        return self.base_url + self.backend.route


@dataclass(frozen=True)
class RunResult:
    outputs: list[RequestOutput]
    duration_s: float
    accept_length: float | None
    server_info: dict[str, Any] | None


def auth_headers() -> dict[str, str]:
    """SGLang's: OPENAI_API_KEY as a bearer token, else API_KEY as given."""
    if key := os.environ.get("OPENAI_API_KEY"):
        return {"Authorization": f"Bearer {key}"}
    if key := os.environ.get("API_KEY"):
        return {"Authorization": key}
    return {}


def raise_open_file_limit(target: int = 65535) -> None:
    """Lift the soft limit on open files toward `target`: every request in flight holds a socket."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as e:
            logger.warning("could not raise the open-file limit: %s", e)


def make_client(max_concurrency: int | None) -> httpx.AsyncClient:
    # No cap on connections unless the run caps concurrency: a burst must not queue inside the client.
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=0)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S, pool=None)
    return httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)


async def arrivals(
    rows: Sequence[DatasetRow], request_rate: float, rng: np.random.Generator
) -> AsyncIterator[DatasetRow]:
    """Yield rows at the request rate: at once for inf, else after exponential gaps of mean 1/rate."""
    for row in rows:
        yield row
        if request_rate != float("inf"):
            await asyncio.sleep(float(rng.exponential(1.0 / request_rate)))


def _request(config: RunConfig, row: DatasetRow, output_len: int | None = None) -> RequestInput:
    return RequestInput(
        prompt=row.prompt,
        api_url=config.api_url,
        prompt_len=row.prompt_len,
        output_len=row.output_len if output_len is None else output_len,
        model=config.model,
        image_data=row.image_data,
        extra_request_body=config.extra_request_body,
    )


async def _warmup(client: httpx.AsyncClient, config: RunConfig, row: DatasetRow) -> None:
    if config.warmup_requests <= 0:
        return
    logger.info("Starting warmup with %d sequences...", config.warmup_requests)
    inp = _request(config, row, output_len=min(row.output_len, WARMUP_MAX_TOKENS))
    sends = [send_request(client, config.backend, inp, config.options) for _ in range(config.warmup_requests)]
    outputs = await asyncio.gather(*sends)
    if not any(o.success for o in outputs):
        raise BenchmarkError(f"warmup failed; check the benchmark arguments. Error: {outputs[0].error}")
    logger.info("Warmup completed. Starting main benchmark run...")


async def _get_json(client: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
    """GET url as a JSON object; None when the server does not have it or answers otherwise."""
    try:
        resp = await client.get(url, headers=auth_headers())
        data = resp.json() if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    return data if isinstance(data, dict) else None


async def _flush_cache(client: httpx.AsyncClient, base_url: str) -> None:
    try:
        resp = await client.post(base_url + "/flush_cache", headers=auth_headers())
        if resp.status_code != 200:
            logger.warning("/flush_cache answered %d: %s", resp.status_code, resp.text[:200])
    except httpx.HTTPError as e:
        logger.warning("/flush_cache failed: %s", e)


def accept_length_of(server_info: dict[str, Any] | None) -> float | None:
    """Speculative decoding's average accept length from SGLang's /get_server_info, if reported."""
    if not server_info:
        return None
    if isinstance(server_info.get("decode"), list) and server_info["decode"]:  # PD-disaggregated servers
        server_info = server_info["decode"][0]
    states = server_info.get("internal_states") or [{}]
    value = states[0].get("avg_spec_accept_length") if isinstance(states[0], dict) else None
    return float(value) if isinstance(value, int | float) else None


async def run_benchmark(config: RunConfig, rows: Sequence[DatasetRow]) -> RunResult:
    """Warm up, then send every row and return their timed outputs (in row order)."""
    if not rows:
        raise BenchmarkError("the dataset has no requests")
    rng = np.random.default_rng(config.seed)
    async with make_client(config.max_concurrency) as client:
        await _warmup(client, config, rows[0])
        if config.flush_cache:
            await _flush_cache(client, config.base_url)
        semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        pbar = None if config.disable_tqdm else tqdm(total=len(rows))

        async def limited(row: DatasetRow) -> RequestOutput:
            if semaphore is None:
                out = await send_request(client, config.backend, _request(config, row), config.options)
            else:
                async with semaphore:
                    out = await send_request(client, config.backend, _request(config, row), config.options)
            if pbar is not None:
                pbar.update(1)
            return out

        start = time.perf_counter()
        tasks = [asyncio.create_task(limited(row)) async for row in arrivals(rows, config.request_rate, rng)]
        outputs = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        if pbar is not None:
            pbar.close()
        server_info = await _get_json(client, config.base_url + "/get_server_info")
    return RunResult(outputs, duration, accept_length_of(server_info), server_info)
