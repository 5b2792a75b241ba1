"""Stopping: SIGTERM drains (503 for new requests, the running ones finish, exit 0); a killed engine
process fails the requests in flight with a 500 naming the cause and stops the server non-zero.

The real command line in its own process (signals and exit statuses are the point); every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn

from herd.server.shutdown import DrainMiddleware, GracefulServer, ShutdownState

from server_fixtures import wait_until

MODEL = "shutdown-test"
MAX_TOKENS = 100  # long enough to be in flight at the signal, short enough for a busy 2-core machine


@dataclass
class Launched:
    proc: subprocess.Popen[str]
    url: str
    engine_pid: int
    log: list[str]


@pytest.fixture
def launched(real_vocab_ckpt) -> Iterator[Launched]:
    cmd = [sys.executable, "-m", "herd.launch_server", "--model-path", str(real_vocab_ckpt[0]), "--port", "0"]
    cmd += ["--dtype", "float32", "--max-total-tokens", "8192", "--served-model-name", MODEL]
    cmd += ["--context-length", "512", "--graceful-shutdown-timeout", "120"]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.stderr is not None
    log: list[str] = []
    url = engine_pid = None
    try:
        for line in proc.stderr:
            log.append(line)
            if match := re.search(r"engine core runs in process (\d+)", line):
                engine_pid = int(match.group(1))
            if match := re.search(rf"serving {MODEL} at (http://\S+)", line):
                url = match.group(1)
                break
        assert url is not None and engine_pid is not None, "".join(log)
        # Keep reading the log, so that the server never blocks on a full pipe.
        threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
        yield Launched(proc, url, engine_pid, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stream_chat(
    url: str, started: threading.Barrier, max_tokens: int = MAX_TOKENS, timeout: float = 60
) -> list[dict[str, Any]]:
    """A streamed chat's events; waits at `started` once the first one has come."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count the llamas."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=timeout) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line.removeprefix("data: ")))
            if len(events) == 1:
                started.wait(timeout=60)
    return events


def running(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return float(re.search(r"^herd:num_requests_running (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def test_sigterm_drains_in_flight_streams_and_exits_0(launched: Launched) -> None:
    started = threading.Barrier(9)
    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream_chat, launched.url, started) for _ in range(8)]
        started.wait(timeout=60)  # all 8 are streaming
        launched.proc.send_signal(signal.SIGTERM)
        # Draining: new work and health checks are refused while the 8 go on (they have ~90 tokens left).
        new = httpx.post(f"{launched.url}/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=30)
        health = httpx.get(f"{launched.url}/health", timeout=30)
        results = [s.result(timeout=120) for s in streams]
    assert new.status_code == 503 and "shutting down" in new.json()["error"]["message"]
    assert health.status_code == 503
    for events in results:
        assert events[-1]["usage"]["completion_tokens"] == MAX_TOKENS
        assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
    assert launched.proc.wait(timeout=60) == 0, "".join(launched.log)


def test_killed_engine_fails_requests_in_flight_and_exits_nonzero(launched: Launched) -> None:
    started = threading.Barrier(3)
    whole = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 400,
        "ignore_eos": True,
    }
    with ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(stream_chat, launched.url, started, 400, 10) for _ in range(2)]
        started.wait(timeout=60)
        # A non-streamed request, in the engine before the kill (the engine is decoding the 2 streams).
        answer = pool.submit(httpx.post, f"{launched.url}/v1/chat/completions", json=whole, timeout=10)
        wait_until(lambda: running(launched.url) == 3, "the third request in the engine")
        httpx.get(f"{launched.url}/health", timeout=10).raise_for_status()
        os.kill(launched.engine_pid, signal.SIGKILL)
        # Each client waits at most 10 s (its httpx timeout): an error must come before that.
        results = [s.result(timeout=30) for s in streams]
        response = answer.result(timeout=30)
    for events in results:
        error = events[-1]["error"]
        assert error["type"] == "server_error" and "killed by SIGKILL" in error["message"], events[-1]
    assert response.status_code == 500 and "killed by SIGKILL" in response.json()["error"]["message"]
    assert launched.proc.wait(timeout=30) == 1, "".join(launched.log)


def test_the_drain_waits_for_responses_still_being_sent() -> None:
    """A stream's sequence leaves the engine before its last events reach the client: the drain must wait
    for the response, not only for the engine."""
    state = ShutdownState()
    seen: list[int] = []

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        seen.append(state.in_flight)

    asyncio.run(DrainMiddleware(app, state)({"type": "http"}, None, None))  # type: ignore[arg-type]
    assert seen == [1] and state.in_flight == 0

    engine = SimpleNamespace(outputs=SimpleNamespace(num_sequences=0))
    server = GracefulServer(uvicorn.Config(app), engine, state, timeout_s=60)  # type: ignore[arg-type]
    server.handle_exit(signal.SIGTERM, None)
    state.in_flight = 1  # the engine is done, a response is not
    assert asyncio.run(server.on_tick(1)) is False
    state.in_flight = 0
    assert asyncio.run(server.on_tick(1)) is True
    assert state.exit_code == 0
