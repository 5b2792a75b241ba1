"""The shapes of successful responses, for the OpenAPI schema only (`/openapi.json`).

Handlers build their JSON by hand (it is faster than validating a model per response); these models say
what that JSON holds, so that clients and the schemathesis fuzz test can check every field. Fields that a
response may leave out have defaults; streamed routes also document `text/event-stream`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatLogprobs(BaseModel):
    content: list[dict[str, Any]]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    """`/v1/chat/completions` unless streamed (then `chat.completion.chunk` events, OpenAI's shape)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    """`/v1/completions` unless streamed (then `text_completion` events, OpenAI's shape)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class GenerateMetaInfo(BaseModel):
    id: str
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    e2e_latency: float
    # With return_logprob (SGLang's [logprob, token id, text] triples).
    output_token_logprobs: list[list[Any]] | None = None
    output_top_logprobs: list[list[list[Any]]] | None = None
    input_token_logprobs: list[list[Any]] | None = None
    input_top_logprobs: list[list[list[Any]] | None] | None = None


class GenerateItem(BaseModel):
    text: str
    output_ids: list[int]
    meta_info: GenerateMetaInfo
    index: int | None = None  # when the request asked for more than one output


class ModelInfo(BaseModel):
    model_path: str
    tokenizer_path: str
    is_generation: bool
    has_image_understanding: bool


class FlushCacheResponse(BaseModel):
    message: str


def json_and_events(model: type[BaseModel], description: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route that answers JSON, or server-sent events when `stream` is true."""
    events = {"schema": {"type": "string", "description": "server-sent events, `data: {json}` then `data: [DONE]`"}}
    return {200: {"model": model, "description": description, "content": {"text/event-stream": events}}}
