"""What the endpoints share: handing requests to the engine, and the usage record."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from herd.frontend.async_engine import (
    EngineCrashedError,
    EngineDeadError,
    Prompt,
    QueueFullError,
    RequestDelta,
    RequestStream,
    RequestTimeoutError,
)
from herd.frontend.structured import GrammarError
from herd.sampling import SamplingParams
from herd.server.context import ServerContext
from herd.server.errors import APIError, bad_request, error_body, param_of
from herd.server.streaming import sse

RETRY_AFTER_S = "1"  # seconds: short requests free their places within about that on a busy server
_PARAMS = {"max_tokens", "n", "stop_token_ids", "logit_bias", "prompt"}


async def submit(ctx: ServerContext, requests: Sequence[tuple[str, Prompt, SamplingParams]]) -> RequestStream:
    """Queue requests in the engine; a request it refuses (too long, bad token ids) is a 400."""
    tracker = ctx.metrics.tracker([r[0] for r in requests])
    try:
        return await ctx.engine.submit(requests, observer=tracker)
    except EngineDeadError as e:
        raise APIError(503, str(e)) from e
    except QueueFullError as e:
        ctx.metrics.rejected.inc()
        raise APIError(503, str(e), code="queue_full", headers={"Retry-After": RETRY_AFTER_S}) from e
    except GrammarError as e:
        raise bad_request(str(e), e.field) from e
    except ValueError as e:  # RequestError, or SamplingParams.check_vocab
        raise bad_request(str(e), param_of(str(e), _PARAMS)) from e


def error_event(error: BaseException) -> str:
    """The SSE event for a failure after the response has started (the status line is already sent)."""
    if isinstance(error, RequestTimeoutError):
        return sse(error_body(504, str(error), code="request_timeout"))
    status = 503 if isinstance(error, EngineDeadError) and not isinstance(error, EngineCrashedError) else 500
    return sse(error_body(status, str(error)))


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class UsageCounter:
    """Token counts of the requests of one stream, from their deltas."""

    def __init__(self) -> None:
        self.prompt: dict[str, int] = {}
        self.cached: dict[str, int] = {}
        self.completion = 0

    def add(self, delta: RequestDelta) -> None:
        self.prompt[delta.request_id] = delta.num_prompt_tokens
        self.cached[delta.request_id] = delta.num_cached_tokens
        self.completion += sum(len(o.token_ids) for o in delta.outputs)

    def as_dict(self) -> dict[str, Any]:
        return usage(sum(self.prompt.values()), self.completion, sum(self.cached.values()))
