"""`POST /v1/completions`: one or more raw prompts (text or token ids) -> text, whole or streamed.

Each prompt is its own engine request; all of them share one stream. Choice `i * n + j` is completion j
of prompt i, as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from herd.frontend.async_engine import CompletionDelta, RequestDelta, RequestStream
from herd.server.context import ServerContext, new_id
from herd.server.echo import Echo
from herd.server.errors import bad_request
from herd.server.logprobs import CompletionLogprobs, TokenText, merge_completion_logprobs
from herd.server.params import build_sampling_params
from herd.server.protocol import CompletionRequest
from herd.server.serving import UsageCounter, error_event, submit
from herd.server.streaming import SSE_DONE, EngineEventStream, cancel_on_disconnect, sse
from herd.server.structured import constrained, from_response_format

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


async def create_completion(ctx: ServerContext, req: CompletionRequest, request: Request) -> Response:
    ctx.check_model(req.model)
    _check_supported(req)
    prompts = await asyncio.to_thread(_prompt_ids, ctx, req.prompt)  # tokenizing off the event loop
    values = _sampling_values(req)
    if req.echo and req.max_tokens == 0:
        values["max_tokens"] = 1  # the engine always samples one token; the reply leaves it out
    if req.echo and req.logprobs is not None:
        values["prompt_logprobs"] = req.logprobs
    params = build_sampling_params(values, ctx.generation_defaults, DEFAULT_MAX_TOKENS)
    params = constrained(params, from_response_format(req.response_format))
    base_id = new_id("cmpl")
    request_ids = [f"{base_id}-{i}" for i in range(len(prompts))]
    reply = _CompletionReply(ctx, req, base_id, request_ids)
    if req.echo:
        reply.echo = Echo(reply.token_text, _prompt_texts(req.prompt, len(prompts)), prompts, req.logprobs or 0)
    stream = await submit(
        ctx, [(rid, {"prompt_token_ids": ids}, params) for rid, ids in zip(request_ids, prompts, strict=True)]
    )
    if req.stream:
        return EngineEventStream(reply.events(stream), stream)
    return await cancel_on_disconnect(request, reply.collect(stream), stream)


def _check_supported(req: CompletionRequest) -> None:
    if req.max_tokens == 0 and not req.echo:
        raise bad_request("max_tokens must be at least 1 (0 is only allowed with echo: true)", "max_tokens")
    if req.suffix:
        raise bad_request("suffix is not supported yet", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise bad_request("best_of other than n is not supported yet", "best_of")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")


def _prompt_ids(ctx: ServerContext, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(ctx.require_tokenizer("a text prompt").encode(p, add_special_tokens=True))
        elif not p:
            raise bad_request("prompt must not be empty", "prompt")
        else:
            out.append(list(p))
    return out


def _prompt_texts(prompt: str | list[str] | list[int] | list[list[int]], count: int) -> list[str | None]:
    """Each prompt's text as the request gave it; None for one given as token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [None]
    return [p if isinstance(p, str) else None for p in prompt][:count]


def _sampling_values(req: CompletionRequest) -> dict[str, Any]:
    names = (
        "n temperature top_p top_k min_p repetition_penalty presence_penalty frequency_penalty max_tokens min_tokens"
        " stop stop_token_ids ignore_eos seed logit_bias skip_special_tokens include_stop_str_in_output logprobs"
    )
    return {name: getattr(req, name) for name in names.split()}


class _CompletionReply:
    def __init__(self, ctx: ServerContext, req: CompletionRequest, base_id: str, request_ids: list[str]) -> None:
        self.req = req
        self.n = req.n
        self.position = {rid: i for i, rid in enumerate(request_ids)}
        self.num_choices = len(request_ids) * req.n
        self.token_text = TokenText(ctx.tokenizer)
        self.logprobs = [CompletionLogprobs(self.token_text, req.logprobs or 0) for _ in range(self.num_choices)]
        self.head = {"id": base_id, "object": "text_completion", "created": int(time.time()), "model": ctx.model_name}
        self.echo: Echo | None = None
        self.echoed = [False] * self.num_choices
        self.prompt_scores: dict[int, list[dict[int, float] | None]] = {}  # prompt index -> its prompt logprobs
        self.scoring_only = req.echo and req.max_tokens == 0  # the one sampled token is not part of the reply

    def _index(self, request_id: str, o: CompletionDelta) -> int:
        return self.position[request_id] * self.n + o.index

    def _logprobs(self, index: int, o: CompletionDelta) -> dict[str, Any] | None:
        if self.req.logprobs is None or o.logprobs is None or self.scoring_only:
            return None
        return self.logprobs[index].add(o.token_ids, o.logprobs)

    def _choice_part(self, delta: RequestDelta, o: CompletionDelta) -> tuple[int, str, list[dict[str, Any]]]:
        """Choice index, new text and logprobs parts of one delta; the echoed prompt goes before the first."""
        i = self._index(delta.request_id, o)
        text, parts = ("" if self.scoring_only else o.text), []
        p = self.position[delta.request_id]
        if delta.prompt_logprobs is not None:
            self.prompt_scores[p] = delta.prompt_logprobs  # comes with the first output of any of its n choices
        if self.echo is not None and not self.echoed[i]:
            self.echoed[i] = True
            text = self.echo.text(p) + text
            if self.req.logprobs is not None:
                if p not in self.prompt_scores:
                    raise RuntimeError("the engine returned no prompt logprobs for an echo request")
                prompt_part, self.logprobs[i].offset = self.echo.logprobs(p, self.prompt_scores[p])
                parts.append(prompt_part)
        part = self._logprobs(i, o)
        if part is not None:
            parts.append(part)
        return i, text, parts

    async def collect(self, stream: RequestStream) -> Response:
        texts: list[list[str]] = [[] for _ in range(self.num_choices)]  # parts, joined once at the end
        finish: list[str | None] = [None] * self.num_choices
        logprobs: list[list[dict[str, Any]]] = [[] for _ in range(self.num_choices)]
        counter = UsageCounter()
        async for delta in stream:
            counter.add(delta)
            for o in delta.outputs:
                i, text, parts = self._choice_part(delta, o)
                texts[i].append(text)
                finish[i] = o.finish_reason or finish[i]
                logprobs[i] += parts
        choices = [
            {
                "index": i,
                "text": "".join(texts[i]),
                "logprobs": merge_completion_logprobs(logprobs[i]) if self.req.logprobs is not None else None,
                "finish_reason": finish[i],
            }
            for i in range(self.num_choices)
        ]
        if self.scoring_only:
            counter.completion = 0
        return JSONResponse({**self.head, "choices": choices, "usage": counter.as_dict()})

    async def events(self, stream: RequestStream) -> AsyncIterator[str]:
        include_usage = self.req.stream_options is not None and self.req.stream_options.include_usage
        extra = {"usage": None} if include_usage else {}
        counter = UsageCounter()
        try:
            async for delta in stream:
                counter.add(delta)
                for o in delta.outputs:
                    i, text, parts = self._choice_part(delta, o)
                    logprobs = merge_completion_logprobs(parts) if parts else None
                    if not text and o.finish_reason is None and logprobs is None:
                        continue
                    choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": o.finish_reason}
                    yield sse({**self.head, "choices": [choice], **extra})
        except Exception as e:
            logger.warning("%s failed while streaming: %s", self.head["id"], e)
            yield error_event(e)
            yield SSE_DONE
            return
        if include_usage:
            if self.scoring_only:
                counter.completion = 0
            yield sse({**self.head, "choices": [], "usage": counter.as_dict()})
        yield SSE_DONE
