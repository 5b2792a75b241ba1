"""`POST /v1/chat/completions`: messages -> llama-4 prompt -> engine -> message (or chunks), tool calls read."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from herd.frontend.async_engine import CompletionDelta, RequestStream
from herd.frontend.tokenizer import Tokenizer
from herd.sampling.grammar import StructuredOutput
from herd.server.context import ServerContext, new_id
from herd.server.errors import bad_request
from herd.server.images import chat_image_refs, load_images, template_messages, with_images
from herd.server.logprobs import TokenText, chat_logprobs
from herd.server.params import build_sampling_params
from herd.server.protocol import ChatCompletionRequest
from herd.server.serving import UsageCounter, error_event, submit
from herd.server.streaming import SSE_DONE, EngineEventStream, cancel_on_disconnect, sse
from herd.server.structured import constrained, from_response_format
from herd.server.tools import ToolPlan, ToolReader, plan_tools

logger = logging.getLogger(__name__)


async def create_chat_completion(ctx: ServerContext, req: ChatCompletionRequest, request: Request) -> Response:
    ctx.check_model(req.model)
    tokenizer = ctx.require_tokenizer("chat completions")
    _check_supported(req)
    plan = plan_tools(req, ctx.tool_parser_name, tokenizer, ctx.constrain_auto_tool_calls)
    messages = [_message_dict(m) for m in req.messages]
    images = await load_images(ctx, chat_image_refs(messages))
    # Off the event loop: a long conversation takes a while to tokenize, and other streams must flow.
    ids = await asyncio.to_thread(_prompt_ids, tokenizer, template_messages(messages), plan)
    params = build_sampling_params(_sampling_values(req), ctx.generation_defaults, default_max_tokens=None)
    params = constrained(params, _structured(req, plan))
    request_id = new_id("chatcmpl")
    reply = _ChatReply(ctx, req, plan, request_id)
    stream = await submit(ctx, [(request_id, with_images(ids, images), params)])
    if req.stream:
        return EngineEventStream(reply.events(stream), stream)
    return await cancel_on_disconnect(request, reply.collect(stream), stream)


def _check_supported(req: ChatCompletionRequest) -> None:
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")


def _structured(req: ChatCompletionRequest, plan: ToolPlan) -> StructuredOutput | None:
    """The reply's grammar: response_format's, else the tool calls' (a call forced by tool_choice cannot
    also be a response_format document; in auto mode response_format wins)."""
    fmt = from_response_format(req.response_format)
    if fmt is not None and plan.forced:
        raise bad_request(
            "response_format cannot be combined with tool_choice required or a named function", "response_format"
        )
    return fmt or plan.structured


def _prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]], plan: ToolPlan) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(messages, tools=plan.tools, add_generation_prompt=True, tokenize=True)
    except (ValueError, KeyError, TypeError) as e:
        raise bad_request(f"cannot format the messages with the chat template: {e}", "messages") from e
    assert isinstance(ids, list)
    return ids + tokenizer.encode(plan.prefix, add_special_tokens=False) if plan.prefix else ids


def _message_dict(message: Any) -> dict[str, Any]:
    d = message.model_dump(exclude_none=True)
    if d["role"] == "developer":
        d["role"] = "system"
    return d


def _sampling_values(req: ChatCompletionRequest) -> dict[str, Any]:
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return {
        "n": req.n,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "repetition_penalty": req.repetition_penalty,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "max_tokens": max_tokens,
        "min_tokens": req.min_tokens,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "seed": req.seed,
        "logit_bias": req.logit_bias,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
    }


class _ChatReply:
    """Turns one request's deltas into the chat completion, whole or as chunks."""

    def __init__(self, ctx: ServerContext, req: ChatCompletionRequest, plan: ToolPlan, request_id: str) -> None:
        self.req, self.plan = req, plan
        self.token_text = TokenText(ctx.tokenizer)
        self.head = {"id": request_id, "created": int(time.time()), "model": ctx.model_name}

    async def collect(self, stream: RequestStream) -> Response:
        n = self.req.n
        texts: list[list[str]] = [[] for _ in range(n)]  # parts, joined once: += would copy a long text per token
        finish: list[str | None] = [None] * n
        logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        counter = UsageCounter()
        async for delta in stream:
            counter.add(delta)
            for o in delta.outputs:
                texts[o.index].append(o.text)
                finish[o.index] = o.finish_reason or finish[o.index]
                logprobs[o.index] += self._logprobs(o) or []
        choices = [self._choice(i, "".join(texts[i]), finish[i], logprobs[i]) for i in range(n)]
        body = {**self.head, "object": "chat.completion", "choices": choices, "usage": counter.as_dict()}
        return JSONResponse(body)

    def _choice(self, index: int, text: str, finish: str | None, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
        reader = self.plan.reader()
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reader is not None:
            parsed = reader.parse(text)
            message["content"] = parsed.content
            if parsed.tool_calls:
                message["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
                finish = "tool_calls"
        return {
            "index": index,
            "message": message,
            "logprobs": {"content": logprobs} if self.req.logprobs else None,
            "finish_reason": finish,
        }

    async def events(self, stream: RequestStream) -> AsyncIterator[str]:
        include_usage = self.req.stream_options is not None and self.req.stream_options.include_usage
        head = {**self.head, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}
        readers = [self.plan.reader() for _ in range(self.req.n)]
        called = [False] * self.req.n
        counter = UsageCounter()
        for i in range(self.req.n):
            first = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            yield sse({**head, "choices": [first], **extra})
        try:
            async for delta in stream:
                counter.add(delta)
                for o in delta.outputs:
                    choice = self._choice_delta(o, readers[o.index], called)
                    if choice is not None:
                        yield sse({**head, "choices": [choice], **extra})
        except Exception as e:
            logger.warning("%s failed while streaming: %s", self.head["id"], e)
            yield error_event(e)
            yield SSE_DONE
            return
        if include_usage:
            yield sse({**head, "choices": [], "usage": counter.as_dict()})
        yield SSE_DONE

    def _choice_delta(self, o: CompletionDelta, reader: ToolReader | None, called: list[bool]) -> dict[str, Any] | None:
        content, calls = o.text, []
        if reader is not None:
            parsed = reader.feed(o.text)
            if o.finish_reason is not None:
                rest = reader.finish()
                parsed.content += rest.content
                parsed.tool_calls += rest.tool_calls
            content, calls = parsed.content, parsed.tool_calls
        delta: dict[str, Any] = {}
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [call.to_openai() for call in calls]
            called[o.index] = True
        logprobs = self._logprobs(o)
        finish = "tool_calls" if o.finish_reason is not None and called[o.index] else o.finish_reason
        if not delta and not logprobs and finish is None:
            return None
        return {
            "index": o.index,
            "delta": delta,
            "logprobs": {"content": logprobs} if logprobs else None,
            "finish_reason": finish,
        }

    def _logprobs(self, o: CompletionDelta) -> list[dict[str, Any]] | None:
        if not self.req.logprobs or o.logprobs is None:
            return None
        return chat_logprobs(self.token_text, o.token_ids, o.logprobs, self.req.top_logprobs or 0)
