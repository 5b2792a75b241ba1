"""Request functions per backend: OpenAI completions, OpenAI chat completions and SGLang's native /generate.

Backend names are SGLang's (`sglang` is the native /generate, `sglang-oai` / `vllm` the completions
route, `*-chat` the chat route) plus `openai` / `openai-chat` as vLLM's benchmark names them. A request
never raises: an HTTP error, a broken connection or a malformed stream is kept in RequestOutput.error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from herd.bench.request import (
    RequestInput,
    RequestOptions,
    RequestOutput,
    StreamClock,
    StreamError,
    completion_tokens,
    raise_if_error,
)

MAX_ERROR_BODY = 2000  # characters of an error response kept per request


@dataclass(frozen=True)
class Backend:
    name: str
    route: str  # path under the base URL
    kind: str  # "completions" | "chat" | "generate"
    default_port: int

    @property
    def is_chat(self) -> bool:
        return self.kind == "chat"


BACKENDS = {
    b.name: b
    for b in (
        Backend("sglang", "/generate", "generate", 30000),
        Backend("sglang-native", "/generate", "generate", 30000),
        Backend("sglang-oai", "/v1/completions", "completions", 30000),
        Backend("sglang-oai-chat", "/v1/chat/completions", "chat", 30000),
        Backend("vllm", "/v1/completions", "completions", 8000),
        Backend("vllm-chat", "/v1/chat/completions", "chat", 8000),
        Backend("openai", "/v1/completions", "completions", 8000),
        Backend("openai-chat", "/v1/chat/completions", "chat", 8000),
    )
}


# -- payloads ------------------------------------------------------------------------------------------


def _openai_common(inp: RequestInput, opts: RequestOptions) -> dict[str, Any]:
    body: dict[str, Any] = {"model": inp.model, "temperature": 0.0, "stream": opts.stream}
    if opts.stream:
        # Without it OpenAI-style servers send no usage in a stream, and output tokens must be retokenized.
        body["stream_options"] = {"include_usage": True}
    if opts.ignore_eos:
        body["ignore_eos"] = True  # SGLang / vLLM extension: generate exactly the requested tokens
    return body


def completions_payload(inp: RequestInput, opts: RequestOptions) -> dict[str, Any]:
    return {**_openai_common(inp, opts), "prompt": inp.prompt, "max_tokens": inp.output_len}


def chat_payload(inp: RequestInput, opts: RequestOptions) -> dict[str, Any]:
    content: str | list[dict[str, Any]] = inp.prompt
    if inp.image_data:
        content = [{"type": "image_url", "image_url": {"url": url}} for url in inp.image_data]
        content.append({"type": "text", "text": inp.prompt})
    messages = [{"role": "user", "content": content}]
    return {**_openai_common(inp, opts), "messages": messages, "max_completion_tokens": inp.output_len}


def generate_payload(inp: RequestInput, opts: RequestOptions) -> dict[str, Any]:
    sampling = {"temperature": 0.0, "max_new_tokens": inp.output_len, "ignore_eos": opts.ignore_eos}
    body: dict[str, Any] = {"text": inp.prompt, "sampling_params": sampling, "stream": opts.stream}
    if inp.image_data:
        body["image_data"] = list(inp.image_data)
    return body


# -- replies -------------------------------------------------------------------------------------------


class _OpenAIReader:
    """Text of OpenAI completions (choices[0].text) and chat (choices[0].delta.content) events."""

    def __init__(self, clock: StreamClock, chat: bool) -> None:
        self.clock, self.chat = clock, chat

    def event(self, data: Mapping[str, Any], now: float) -> None:
        choices = data.get("choices") or [{}]  # the usage-only last chunk has no choices
        choice = choices[0]
        text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
        self.clock.text(text or "", now)
        self._usage(data)

    def whole(self, data: Mapping[str, Any]) -> None:
        choice = (data.get("choices") or [{}])[0]
        text = (choice.get("message") or {}).get("content") if self.chat else choice.get("text")
        self.clock.out.generated_text = text or ""
        self._usage(data)

    def _usage(self, data: Mapping[str, Any]) -> None:
        tokens = completion_tokens(data)
        if tokens is not None:
            self.clock.out.output_len = tokens


class _GenerateReader:
    """SGLang's /generate: each event carries the whole text so far and meta_info.completion_tokens."""

    def __init__(self, clock: StreamClock) -> None:
        self.clock = clock
        self.tokens = 0

    def event(self, data: Mapping[str, Any], now: float) -> None:
        out = self.clock.out
        text = data.get("text") or ""
        if not text.startswith(out.generated_text):
            raise StreamError("/generate events must carry the cumulative text")
        new_text = text[len(out.generated_text) :]
        reported = (data.get("meta_info") or {}).get("completion_tokens")
        # Without a count, an event with new text stands for one token.
        tokens = int(reported) if reported is not None else self.tokens + (1 if new_text else 0)
        if tokens <= self.tokens:  # SGLang skips events that add no token
            return
        self.clock.text(new_text, now, new_tokens=tokens - self.tokens)
        self.tokens = tokens
        if reported is not None:
            out.output_len = tokens

    def whole(self, data: Mapping[str, Any]) -> None:
        self.clock.out.generated_text = data.get("text") or ""
        tokens = (data.get("meta_info") or {}).get("completion_tokens")
        self.clock.out.output_len = tokens if isinstance(tokens, int) else None


_PAYLOADS: dict[str, Callable[[RequestInput, RequestOptions], dict[str, Any]]] = {
    "completions": completions_payload,
    "chat": chat_payload,
    "generate": generate_payload,
}


def _reader(kind: str, clock: StreamClock) -> _OpenAIReader | _GenerateReader:
    return _GenerateReader(clock) if kind == "generate" else _OpenAIReader(clock, chat=kind == "chat")


async def send_request(
    client: httpx.AsyncClient, backend: Backend, inp: RequestInput, opts: RequestOptions
) -> RequestOutput:
    """Send one request and time its reply; never raises for a failed request."""
    payload = {**_PAYLOADS[backend.kind](inp, opts), **inp.extra_request_body}
    out = RequestOutput(prompt_len=inp.prompt_len)
    clock = StreamClock(out)
    reader = _reader(backend.kind, clock)
    try:
        async with client.stream("POST", inp.api_url, json=payload, headers=dict(opts.headers)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", errors="replace")
                out.error = f"HTTP {resp.status_code} {resp.reason_phrase}: {body[:MAX_ERROR_BODY]}"
                return out
            if payload.get("stream"):
                await _read_events(resp, reader)
            else:
                data = json.loads(await resp.aread())
                raise_if_error(data)
                reader.whole(data)
        clock.finish()
    except (httpx.HTTPError, StreamError, ValueError, KeyError, TypeError, AttributeError) as e:
        # ValueError covers malformed JSON; Key/Type/AttributeError an event of an unexpected shape.
        out.success = False
        out.error = f"{type(e).__name__}: {e}"
    return out


async def _read_events(resp: httpx.Response, reader: _OpenAIReader | _GenerateReader) -> None:
    async for line in resp.aiter_lines():
        now = time.perf_counter()
        line = line.strip()
        if not line.startswith("data:"):
            continue  # blank separators, SSE comments (keep-alives), event: / id: fields
        chunk = line[len("data:") :].strip()
        if chunk == "[DONE]":
            continue
        data = json.loads(chunk)
        if not isinstance(data, dict):
            raise StreamError(f"event is not a JSON object: {chunk[:200]}")
        raise_if_error(data)
        reader.event(data, now)
