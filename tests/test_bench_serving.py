"""The serving benchmark client: its datasets, and whole runs against a stub OpenAI-compatible server.

The stub (FastAPI + uvicorn on a free port, in a thread) streams a few tokens per request with small
delays, reports usage, and can be told to fail requests. When herd's server lands, the end-to-end runs
here are the ones to point at it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_models
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from herd.bench import runner
from herd.bench.datasets import (
    DatasetRow,
    SharedPrefixSpec,
    load_sharegpt_pairs,
    random_lens,
    sample_generated_shared_prefix,
    sample_random,
    sample_sharegpt,
    with_chat_template,
)
from herd.bench.images import ImageSpec, llama4_image_tokens, llama4_tile_grid, parse_resolution, sample_image
from herd.bench.tokenizer import BenchTokenizer, load_bench_tokenizer
from herd.bench_serving import main

LLAMA4_TOKENIZER = str(Path(llama_models.__file__).parent / "llama4" / "tokenizer.model")
STUB_MODEL = "stub/llama-4-tiny"


@pytest.fixture(scope="module")
def tok() -> BenchTokenizer:
    return load_bench_tokenizer(LLAMA4_TOKENIZER)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- datasets ------------------------------------------------------------------------------------------


def test_random_lens_follow_the_range_ratio() -> None:
    lens = random_lens(rng(), 100, 0.5, 2000)
    assert min(lens) >= 50 and max(lens) <= 100
    assert min(lens) == 50 and max(lens) == 100  # both ends are reachable
    assert set(random_lens(rng(), 100, 1.0, 50)) == {100}
    assert min(random_lens(rng(), 10, 0.0, 500)) == 1  # ratio 0: from max(0, 1) = 1
    assert random_lens(rng(7), 64, 0.25, 20) == random_lens(rng(7), 64, 0.25, 20)
    assert random_lens(rng(7), 64, 0.25, 20) != random_lens(rng(8), 64, 0.25, 20)


@pytest.mark.parametrize("random_ids", [False, True])
def test_random_prompts_have_the_token_counts_they_report(tok: BenchTokenizer, random_ids: bool) -> None:
    rows = sample_random(tok, rng(1), 30, input_len=64, output_len=16, range_ratio=0.5, random_ids=random_ids)
    assert len(rows) == 30
    for row in rows:
        assert tok.count(row.prompt) == row.prompt_len  # the reported length is what a tokenizer sees
        assert 32 <= row.prompt_len <= 64 and 8 <= row.output_len <= 16
    targets = random_lens(rng(1), 64, 0.5, 30)  # the same seed draws the same target lengths first
    assert sum(r.prompt_len == t for r, t in zip(rows, targets, strict=True)) >= 28
    again = sample_random(tok, rng(1), 30, input_len=64, output_len=16, range_ratio=0.5, random_ids=random_ids)
    assert again == rows
    assert sample_random(tok, rng(2), 30, 64, 16, 0.5, random_ids=random_ids) != rows


def test_random_from_sharegpt_text_repeats_it_to_length(tok: BenchTokenizer) -> None:
    rows = sample_random(tok, rng(), 5, 200, 8, 1.0, source_texts=["The quick brown fox jumps over the dog."])
    for row in rows:
        assert row.prompt.startswith("The quick brown fox") and row.prompt.count("fox") >= 10
        assert row.prompt_len == tok.count(row.prompt)


def _write_sharegpt(path: Path) -> Path:
    data = [
        {"id": "a", "conversations": [{"from": "human", "value": "Explain paged attention in two lines."},
                                      {"from": "gpt", "value": "Blocks of KV cache, mapped by a table."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Only one turn here."}]},
        {"id": "c", "conversation": [{"from": "human", "value": "What is a mixture of experts layer?"},
                                     {"from": "gpt", "value": "A router picks one expert MLP per token."}]},
        {"id": "d", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "e", "conversations": [{"from": "human", "value": "Write a long story. " * 30},
                                      {"from": "gpt", "value": "Once upon a time. " * 30}]},
    ]  # fmt: skip
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_sharegpt_file_parsing_and_filters(tok: BenchTokenizer, tmp_path: Path) -> None:
    pairs = load_sharegpt_pairs(_write_sharegpt(tmp_path / "sharegpt.json"))
    assert len(pairs) == 4  # the one-turn conversation is dropped; "conversation" is read too
    assert ("What is a mixture of experts layer?", "A router picks one expert MLP per token.") in pairs

    rows = sample_sharegpt(tok, rng(), pairs, num_prompts=10)
    assert {r.prompt for r in rows} == {p for p, _ in pairs} - {"Hi"}  # 1-token prompts are too short
    for row in rows:
        reply = dict(pairs)[row.prompt]
        assert (row.prompt_len, row.output_len) == (tok.count(row.prompt), tok.count(reply))

    fixed = sample_sharegpt(tok, rng(), pairs, num_prompts=2, fixed_output_len=7)
    assert len(fixed) == 2 and {r.output_len for r in fixed} == {7}
    short = sample_sharegpt(tok, rng(), pairs, num_prompts=10, context_len=40)
    assert all(r.prompt_len + r.output_len <= 40 for r in short) and len(short) == 2
    assert sample_sharegpt(tok, rng(3), pairs, 3) == sample_sharegpt(tok, rng(3), pairs, 3)

    templated = with_chat_template(tok, rows)[0]
    assert templated.prompt_len == tok.count(templated.prompt) and templated.output_len == rows[0].output_len
    assert templated.prompt.startswith("<|header_start|>user<|header_end|>")  # BOS left to the server
    assert templated.prompt.endswith("<|header_start|>assistant<|header_end|>\n\n")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_sharegpt_pairs(tmp_path / "missing.json")


def test_generated_shared_prefix_structure(tok: BenchTokenizer) -> None:
    spec = SharedPrefixSpec(num_groups=3, prompts_per_group=4, system_prompt_len=48, question_len=8, output_len=5)
    rows = sample_generated_shared_prefix(tok, rng(), spec)
    assert len(rows) == 12 and {r.output_len for r in rows} == {5}
    # Random text may itself hold "\n\n", so group by leading characters, then check the shared prefix.
    heads = [r.prompt[:12] for r in rows]
    assert sorted(heads.count(h) for h in set(heads)) == [4, 4, 4]
    for head in set(heads):
        group = [r.prompt for r in rows if r.prompt.startswith(head)]
        shared = os.path.commonprefix(group)  # noqa: RUF071 (a character prefix is what is wanted)
        assert "\n\n" in shared and tok.count(shared) >= 47  # the system prompt (48 tokens) and separator
    assert all(r.prompt_len == tok.count(r.prompt) for r in rows)
    assert [heads[0]] * 4 != heads[:4]  # shuffled: a group's prompts do not arrive together
    assert sample_generated_shared_prefix(tok, rng(), spec) == rows


def test_image_resolutions_and_llama4_vision_tokens() -> None:
    assert parse_resolution("720p") == (1280, 720) and parse_resolution("4k") == (3840, 2160)
    assert parse_resolution("1080x1920") == (1920, 1080)  # SGLang's custom form is HEIGHTxWIDTH
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        parse_resolution("big")
    # One tile: <|image_start|> <|image|> 144 patches <|image_end|>.
    assert llama4_image_tokens(336, 336) == 147 and llama4_image_tokens(100, 60) == 147
    # 1080p fits a 3 x 5 grid (transformers' get_best_fit agrees): 15 tiles of 144 + 15 separators + 147.
    assert llama4_tile_grid(1920, 1080) == (3, 5)
    assert llama4_image_tokens(1920, 1080) == 15 * 145 + 147
    assert llama4_tile_grid(672, 336) == (1, 2)
    # A 5000 x 10 strip: 15 tiles across (5040 px) is the least upscaling that holds its width.
    assert llama4_tile_grid(5000, 10) == (1, 15)


def test_image_rows_carry_decodable_images(tok: BenchTokenizer) -> None:
    spec = ImageSpec(count=2, resolution="48x64", format="png", content="blank")
    rows = sample_image(tok, rng(), 3, input_len=16, output_len=4, range_ratio=1.0, spec=spec)
    assert len(rows) == 3
    for row in rows:
        assert len(row.image_data) == 2 and row.vision_prompt_len == 2 * 147
        assert row.text_prompt_len > 16  # the chat-formatted text, as a chat server counts it
        head, data = row.image_data[0].split(",", 1)
        assert head == "data:image/png;base64"
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        assert image.size == (64, 48) and image.getextrema() == ((255, 255),) * 3
    noisy = sample_image(tok, rng(), 1, 16, 4, 1.0, ImageSpec(1, "32x32", "jpeg", "random"))[0]
    assert noisy.image_data[0].startswith("data:image/jpeg;base64,")


def test_adapter_over_a_transformers_tokenizer() -> None:
    vocab = {"<s>": 0, "<ctl>": 1, "[unk]": 2, "hello": 3, "world": 4, "[": 5, "]": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[unk]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="[unk]")
    hf.add_special_tokens({"additional_special_tokens": ["<ctl>"]})
    hf.chat_template = "{{ bos_token }}{% for m in messages %}[ {{ m['content'] }} ]{% endfor %}"
    tok = BenchTokenizer(hf, "tiny")
    assert tok.encode("hello world") == [3, 4] and tok.count("") == 0
    assert tok.ordinary_ids == [3, 4, 5, 6]  # BOS, the control token and unk are never drawn
    assert tok.chat_prompt([{"role": "user", "content": "hello"}]) == "[ hello ]"  # BOS left to the server
    assert tok.chat_prompt_len([{"role": "user", "content": "hello"}]) == 4  # a chat server's count has BOS


def test_poisson_arrivals_are_seeded_and_inf_is_a_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(runner.asyncio, "sleep", fake_sleep)
    rows = [DatasetRow(str(i), 1, 1) for i in range(2000)]

    async def drain(rate: float, seed: int) -> list[str]:
        return [row.prompt async for row in runner.arrivals(rows, rate, rng(seed))]

    assert asyncio.run(drain(float("inf"), 0)) == [r.prompt for r in rows] and waits == []
    asyncio.run(drain(20.0, 0))
    first, waits[:] = list(waits), []
    assert len(first) == 2000 and np.mean(first) == pytest.approx(1 / 20, rel=0.1)
    assert np.std(first) == pytest.approx(1 / 20, rel=0.15)  # exponential gaps: std == mean
    asyncio.run(drain(20.0, 0))
    assert waits == first


# -- a stub OpenAI-compatible server -------------------------------------------------------------------


@dataclass
class StubBehaviour:
    token_delay_s: float = 0.002
    accept_length: float | None = None
    fail_http_every: int = 0  # every Nth request (counting from 1) answers HTTP 500
    fail_stream_every: int = 0  # every Nth request sends a malformed event mid-stream
    bodies: list[dict[str, Any]] = field(default_factory=list)
    client_ports: list[int] = field(default_factory=list)  # one per request: which connection carried it
    in_flight: int = 0
    max_in_flight: int = 0


def stub_app(behaviour: StubBehaviour) -> FastAPI:
    app = FastAPI()
    counter = itertools.count(1)

    async def tokens(n: int) -> AsyncIterator[str]:
        for i in range(n):
            await asyncio.sleep(behaviour.token_delay_s)
            yield f" t{i}"

    def failure(n: int) -> JSONResponse | None:
        if behaviour.fail_http_every and n % behaviour.fail_http_every == 0:
            return JSONResponse({"error": {"message": "stub failure", "code": 500}}, status_code=500)
        return None

    def sse(events: AsyncIterator[dict[str, Any]], malformed: bool) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            behaviour.in_flight += 1
            behaviour.max_in_flight = max(behaviour.max_in_flight, behaviour.in_flight)
            try:
                async for i, event in _enumerate(events):
                    if malformed and i == 2:
                        yield "data: {not json\n\n"
                    yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                behaviour.in_flight -= 1

        return StreamingResponse(body(), media_type="text/event-stream")

    async def record(request: Request) -> dict[str, Any]:
        body = await request.json()
        behaviour.bodies.append(body)
        assert request.client is not None
        behaviour.client_ports.append(request.client.port)
        return body

    def usage(n: int) -> dict[str, int]:
        return {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}

    async def openai_route(request: Request, chat: bool) -> Any:
        body = await record(request)
        n = next(counter)
        if (error := failure(n)) is not None:
            return error
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        if chat:
            _check_images(body["messages"])

        def choice(text: str) -> dict[str, Any]:
            return {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}

        if not body.get("stream"):
            text = "".join([t async for t in tokens(max_tokens)])
            reply = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else choice(text)
            return {"choices": [reply], "usage": usage(max_tokens)}

        async def events() -> AsyncIterator[dict[str, Any]]:
            if chat:
                yield {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
            async for t in tokens(max_tokens):
                yield {"choices": [choice(t)]}
            if (body.get("stream_options") or {}).get("include_usage"):
                yield {"choices": [], "usage": usage(max_tokens)}

        fail_stream = behaviour.fail_stream_every and n % behaviour.fail_stream_every == 0
        return sse(events(), malformed=bool(fail_stream))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": STUB_MODEL, "object": "model", "owned_by": "stub"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await openai_route(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await openai_route(request, chat=True)

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        body = await record(request)
        n_tokens = body["sampling_params"]["max_new_tokens"]

        async def events() -> AsyncIterator[dict[str, Any]]:
            text, count = "", 0
            async for t in tokens(n_tokens):
                text, count = text + t, count + 1
                if count % 2 == 0 or count == n_tokens:  # two tokens per event, as with chunked streaming
                    yield {"text": text, "meta_info": {"completion_tokens": count}}

        return sse(events(), malformed=False)

    @app.get("/get_server_info")
    async def server_info() -> Any:
        if behaviour.accept_length is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return {"internal_states": [{"avg_spec_accept_length": behaviour.accept_length}]}

    return app


async def _enumerate(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    i = 0
    async for event in events:
        yield i, event
        i += 1


def _check_images(messages: list[dict[str, Any]]) -> None:
    content = messages[0]["content"]
    if isinstance(content, list):
        for part in content:
            if part["type"] == "image_url":
                data = part["image_url"]["url"].split(",", 1)[1]
                Image.open(io.BytesIO(base64.b64decode(data))).verify()


@contextmanager
def serve(behaviour: StubBehaviour) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(stub_app(behaviour), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "stub server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def run_cli(base_url: str, out_file: Path, flags: str) -> int:
    """The CLI with 20 prompts at concurrency 4 against base_url, plus `flags` (a shell-style string)."""
    argv = ["--base-url", base_url, "--tokenizer", LLAMA4_TOKENIZER, "--output-file", str(out_file)]
    return main([*argv, "--disable-tqdm", "--num-prompts", "20", "--max-concurrency", "4", *shlex.split(flags)])


METRIC_LABELS = [
    "Backend:",
    "Traffic request rate:",
    "Max request concurrency:",
    "Successful requests:",
    "Benchmark duration (s):",
    "Total input tokens:",
    "Total generated tokens:",
    "Total generated tokens (retokenized):",
    "Request throughput (req/s):",
    "Input token throughput (tok/s):",
    "Output token throughput (tok/s):",
    "Peak output token throughput (tok/s):",
    "Peak concurrent requests:",
    "Total token throughput (tok/s):",
    "Concurrency:",
    "Mean E2E Latency (ms):",
    "Median E2E Latency (ms):",
    "Mean TTFT (ms):",
    "Median TTFT (ms):",
    "P99 TTFT (ms):",
    "Mean TPOT (ms):",
    "Median TPOT (ms):",
    "P99 TPOT (ms):",
    "Mean ITL (ms):",
    "Median ITL (ms):",
    "P95 ITL (ms):",
    "P99 ITL (ms):",
    "Max ITL (ms):",
]


def block_values(stdout: str) -> dict[str, str]:
    block = stdout[stdout.index(" Serving Benchmark Result ") :]
    return {line[:40].strip(): line[41:].strip() for line in block.splitlines() if line[:40].strip().endswith(":")}


# -- end to end ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sglang-oai", "vllm-chat", "sglang"])
def test_random_dataset_run(backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    behaviour = StubBehaviour(accept_length=1.5)
    out_file = tmp_path / "run.jsonl"
    with serve(behaviour) as url:
        flags = "--dataset-name random --random-input-len 32 --random-output-len 8 --random-range-ratio 0.5"
        rc = run_cli(url, out_file, f"--backend {backend} {flags} --extra-request-body '{{\"top_k\": 1}}'")
    assert rc == 0
    values = block_values(capsys.readouterr().out)
    assert [label for label in METRIC_LABELS if label not in values] == []
    assert values["Backend:"] == backend and values["Successful requests:"] == "20"
    assert values["Max request concurrency:"] == "4" and values["Traffic request rate:"] == "inf"
    assert values["Accept length:"] == "1.50"
    # Requests in flight at one instant (not, as SGLang counts, every request touching the busiest second).
    assert 1 <= int(values["Peak concurrent requests:"]) <= 4
    assert "Total input vision tokens:" not in values

    record = json.loads(out_file.read_text().splitlines()[-1])
    assert record["completed"] == 20 and record["model"] == STUB_MODEL  # the model came from /v1/models
    assert record["total_output_tokens"] == sum(record["output_lens"]) == int(values["Total generated tokens:"])
    assert all(4 <= n <= 8 for n in record["output_lens"]) and record["errors"] == [""] * 20
    assert record["total_output_tokens_retokenized"] > 0 and record["accept_length"] == 1.5
    assert len(behaviour.bodies) == 21  # one warmup request, then the run
    assert behaviour.max_in_flight == 4  # --max-concurrency caps the requests in flight
    # A connection per request, as SGLang's client opens: a kept-alive one can be closed by a server (llama-server
    # does) just as the next request goes out on it, and that request is lost.
    assert len(set(behaviour.client_ports)) == len(behaviour.client_ports) == 21
    body = behaviour.bodies[-1]
    assert body["top_k"] == 1  # --extra-request-body is merged into each request
    if backend == "sglang":
        assert body["sampling_params"]["ignore_eos"] is True and body["stream"] is True
    else:
        assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True}
        assert body["model"] == STUB_MODEL


def test_image_dataset_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    behaviour = StubBehaviour()
    out_file = tmp_path / "image.jsonl"
    with serve(behaviour) as url:
        flags = "--dataset-name image --image-count 2 --image-resolution 32x48 --random-input-len 16"
        rc = run_cli(url, out_file, f"--backend openai-chat {flags} --random-output-len 6")
    assert rc == 0
    values = block_values(capsys.readouterr().out)
    assert [label for label in METRIC_LABELS if label not in values] == []
    assert values["Successful requests:"] == "20" and "Accept length:" not in values
    assert values["Total input vision tokens:"] == str(20 * 2 * 147)
    text, vision = int(values["Total input text tokens:"]), int(values["Total input vision tokens:"])
    assert int(values["Total input tokens:"]) == text + vision
    content = behaviour.bodies[-1]["messages"][0]["content"]
    assert [part["type"] for part in content] == ["image_url", "image_url", "text"]


def test_non_streaming_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serve(StubBehaviour()) as url:
        flags = "--dataset-name random-ids --random-input-len 8 --random-output-len 4 --disable-stream"
        rc = run_cli(url, tmp_path / "r.jsonl", f"--backend sglang-oai-chat {flags}")
    assert rc == 0
    values = block_values(capsys.readouterr().out)
    assert values["Successful requests:"] == "20" and values["Mean ITL (ms):"] == "0.00"
    assert values["Mean TTFT (ms):"] == values["Mean E2E Latency (ms):"]  # no stream: TTFT is the latency


def test_sharegpt_and_shared_prefix_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    behaviour = StubBehaviour()
    sharegpt = _write_sharegpt(tmp_path / "sharegpt.json")
    with serve(behaviour) as url:
        flags = f"--dataset-name sharegpt --dataset-path {sharegpt} --sharegpt-output-len 4 --apply-chat-template"
        assert run_cli(url, tmp_path / "s.jsonl", f"--backend sglang-oai {flags}") == 0
        assert block_values(capsys.readouterr().out)["Successful requests:"] == "3"  # the file's usable pairs
        assert behaviour.bodies[-1]["prompt"].startswith("<|header_start|>user<|header_end|>")
        gsp = "--gsp-num-groups 2 --gsp-prompts-per-group 3 --gsp-system-prompt-len 24 --gsp-question-len 4"
        flags = f"--dataset-name generated-shared-prefix {gsp} --gsp-output-len 3"
        assert run_cli(url, tmp_path / "g.jsonl", f"--backend sglang-oai-chat {flags}") == 0
    assert block_values(capsys.readouterr().out)["Successful requests:"] == "6"  # groups x prompts per group
    assert len({b["messages"][0]["content"][:12] for b in behaviour.bodies[-6:]}) == 2  # two shared prefixes


def test_failed_requests_are_counted_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    behaviour = StubBehaviour(fail_http_every=4, fail_stream_every=7)
    out_file = tmp_path / "fail.jsonl"
    with serve(behaviour) as url:
        rc = run_cli(url, out_file, "--backend vllm --dataset-name random --random-input-len 16 --random-output-len 6")
    assert rc == 0
    captured = capsys.readouterr()
    record = json.loads(out_file.read_text())
    # Requests 1..21 with the warmup first: 4, 8, 12, 16, 20 answer HTTP 500; 7, 14, 21 break their stream.
    http = [e for e in record["errors"] if e.startswith("HTTP 500")]
    broken = [e for e in record["errors"] if e.startswith("JSONDecodeError")]
    assert (len(http), len(broken), record["completed"]) == (5, 3, 12)
    assert "stub failure" in http[0]
    assert block_values(captured.out)["Successful requests:"] == "12"
    assert "8 of 20 requests failed" in caplog.text
    failed = [i for i, e in enumerate(record["errors"]) if e]
    assert all(record["output_lens"][i] == 0 for i in failed)


def test_unreachable_server_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    rc = main(["--port", str(port), "--dataset-name", "random", "--tokenizer", LLAMA4_TOKENIZER])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"cannot reach the server at http://127.0.0.1:{port}" in err and "--base-url" in err


def test_image_dataset_needs_a_chat_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serve(StubBehaviour()) as url:
        rc = run_cli(url, tmp_path / "x.jsonl", "--backend sglang-oai --dataset-name image")
    assert rc == 1
    assert "image dataset needs a chat backend" in capsys.readouterr().err


def test_module_help() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "herd.bench_serving", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--backend", "--random-range-ratio", "--gsp-num-groups", "--image-resolution", "--warmup-requests"):
        assert flag in proc.stdout
