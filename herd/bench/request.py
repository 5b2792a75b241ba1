"""One timed request: what goes in, what comes out, and the clock that times a streamed reply.

Timing follows SGLang's bench_serving: TTFT runs from just before the request is sent to the arrival of
the first chunk that carries generated text; each later text chunk adds one inter-token latency (the gap
since the previous text chunk); latency (E2E) runs to the end of the stream.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RequestInput:
    prompt: str
    api_url: str
    prompt_len: int
    output_len: int
    model: str
    image_data: tuple[str, ...] = ()
    extra_request_body: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class RequestOutput:
    success: bool = False
    generated_text: str = ""
    latency: float = 0.0  # seconds from send to the end of the reply
    ttft: float = 0.0  # seconds from send to the first generated text
    itl: list[float] = field(default_factory=list)  # gaps between text chunks after the first
    text_chunks: list[str] = field(default_factory=list)  # the text of each gap in itl
    prompt_len: int = 0
    output_len: int | None = None  # completion tokens the server reported; None: retokenize the text
    error: str = ""
    start_time: float = 0.0  # time.perf_counter() at send


@dataclass(frozen=True)
class RequestOptions:
    """How every request of a run is sent (SGLang's --disable-stream / --disable-ignore-eos, auth)."""

    stream: bool = True
    ignore_eos: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)


class StreamError(RuntimeError):
    """The server reported an error inside the stream, or sent something that is not a valid event."""


class StreamClock:
    """Turns the arrival times of generated text into TTFT and ITLs on a RequestOutput."""

    def __init__(self, out: RequestOutput) -> None:
        self.out = out
        out.start_time = time.perf_counter()
        self._last: float | None = None

    def text(self, text: str, now: float, new_tokens: int = 0) -> None:
        """Record `text` arriving at `now`. new_tokens > 1 (servers that count tokens per chunk, like
        SGLang's /generate) spreads the gap evenly over those tokens, as SGLang does."""
        if not text:
            return
        out = self.out
        if self._last is None:
            out.ttft = now - out.start_time
        elif new_tokens > 1:
            out.itl.extend([(now - self._last) / new_tokens] * new_tokens)
            out.text_chunks.extend([text] + [""] * (new_tokens - 1))
        else:
            out.itl.append(now - self._last)
            out.text_chunks.append(text)
        self._last = now
        out.generated_text += text

    def finish(self) -> None:
        out = self.out
        out.latency = time.perf_counter() - out.start_time
        if self._last is None:  # nothing streamed (or a non-streamed reply): first text came with the end
            out.ttft = out.latency
        out.success = True


def completion_tokens(data: Mapping[str, Any]) -> int | None:
    """usage.completion_tokens of an OpenAI-style response or chunk, if it has one."""
    usage = data.get("usage")
    value = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
    return value if isinstance(value, int) else None


def raise_if_error(data: Mapping[str, Any]) -> None:
    """A server that fails after the stream started sends an error object as an event."""
    error = data.get("error")
    if error:
        message = error.get("message", error) if isinstance(error, Mapping) else error
        raise StreamError(f"error event: {message}")
