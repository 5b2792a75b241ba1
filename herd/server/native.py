"""SGLang's native `POST /generate`: `text` or `input_ids`, `sampling_params`, `stream`.

The response follows SGLang: `{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
"completion_tokens", "cached_tokens", "e2e_latency"}}`, a list of them for a batch or n > 1; streamed
events carry the text and ids so far (cumulative, as SGLang sends them).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from PIL.Image import Image
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from herd.frontend.async_engine import CompletionDelta, RequestDelta, RequestStream
from herd.sampling import SamplingParams
from herd.server.context import ServerContext
from herd.server.errors import bad_request
from herd.server.images import load_images, native_image_refs, with_images
from herd.server.params import build_sampling_params
from herd.server.serving import error_event, submit
from herd.server.streaming import SSE_DONE, EngineEventStream, cancel_on_disconnect, sse
from herd.server.structured import constrained, from_native

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's


class NativeSamplingParams(BaseModel):
    """SGLang's sampling_params. Unknown keys are refused: a typo must not silently change nothing."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    seed: int | None = None
    sampling_seed: int | None = None
    logit_bias: dict[str, float] | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None


class GenerateRequest(BaseModel):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: NativeSamplingParams | None = None
    stream: bool = False
    rid: str | list[str] | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    image_data: Any = None  # a URL or base64 string, or a list of them (per prompt, for a batch)


async def generate(ctx: ServerContext, req: GenerateRequest, request: Request) -> Response:
    prompts, batched = await asyncio.to_thread(_prompts, ctx, req)  # tokenizing off the event loop
    params = _sampling_params(ctx, req)
    _check_logprob_start_len(req, prompts)
    rids = _request_ids(req.rid, len(prompts))
    images = await _images(ctx, req, len(prompts), batched)
    reply = _NativeReply(req, rids, params.n, prompts)
    stream = await submit(
        ctx, [(rid, with_images(ids, imgs), params) for rid, ids, imgs in zip(rids, prompts, images, strict=True)]
    )
    if req.stream:
        return EngineEventStream(reply.events(stream), stream)
    single = not batched and params.n == 1
    return await cancel_on_disconnect(request, reply.collect(stream, single), stream)


async def _images(ctx: ServerContext, req: GenerateRequest, num_prompts: int, batched: bool) -> list[list[Image]]:
    """Each prompt's images. As in SGLang, the prompt has one <|image|> where each of its images goes."""
    refs = native_image_refs(req.image_data, num_prompts, batched)
    loaded = await asyncio.gather(*(load_images(ctx, r) for r in refs), return_exceptions=True)
    for result in loaded:  # the first failure in prompt order
        if isinstance(result, BaseException):
            raise result
    return loaded  # type: ignore[return-value]


def _prompts(ctx: ServerContext, req: GenerateRequest) -> tuple[list[list[int]], bool]:
    if (req.text is None) == (req.input_ids is None):
        raise bad_request("give exactly one of text and input_ids", "text")
    if req.text is not None:
        texts = [req.text] if isinstance(req.text, str) else req.text
        tokenizer = ctx.require_tokenizer("text input")
        return [tokenizer.encode(t, add_special_tokens=True) for t in texts], not isinstance(req.text, str)
    assert req.input_ids is not None
    if req.input_ids and isinstance(req.input_ids[0], list):
        return [list(ids) for ids in req.input_ids], True  # type: ignore[arg-type]
    return [list(req.input_ids)], False  # type: ignore[arg-type]


def _sampling_params(ctx: ServerContext, req: GenerateRequest) -> SamplingParams:
    sp = req.sampling_params or NativeSamplingParams()
    if sp.structural_tag is not None:
        raise bad_request("structural_tag is not supported yet", "sampling_params.structural_tag")
    structured = from_native(sp.json_schema, sp.regex, sp.ebnf)
    if not sp.spaces_between_special_tokens:
        raise bad_request("spaces_between_special_tokens=false is not supported yet", "sampling_params")
    values = {
        "max_tokens": sp.max_new_tokens,
        "min_tokens": sp.min_new_tokens,
        "n": sp.n,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "top_k": sp.top_k,
        "min_p": sp.min_p,
        "frequency_penalty": sp.frequency_penalty,
        "presence_penalty": sp.presence_penalty,
        "repetition_penalty": sp.repetition_penalty,
        "stop": sp.stop,
        "stop_token_ids": sp.stop_token_ids,
        "ignore_eos": sp.ignore_eos,
        "skip_special_tokens": sp.skip_special_tokens,
        "include_stop_str_in_output": sp.no_stop_trim or None,
        "seed": sp.seed if sp.seed is not None else sp.sampling_seed,
        "logit_bias": sp.logit_bias,
        "logprobs": req.top_logprobs_num if req.return_logprob else None,
        "prompt_logprobs": req.top_logprobs_num if _wants_input_logprobs(req) else None,
    }
    # max_new_tokens: null means "up to the context length"; an absent one is SGLang's 128 (the field default).
    return constrained(build_sampling_params(values, ctx.generation_defaults, default_max_tokens=None), structured)


def _wants_input_logprobs(req: GenerateRequest) -> bool:
    """SGLang's logprob_start_len: -1 (the default) = output tokens only, k >= 0 = prompt tokens from k on."""
    return req.return_logprob and req.logprob_start_len != -1


def _check_logprob_start_len(req: GenerateRequest, prompts: list[list[int]]) -> None:
    if not _wants_input_logprobs(req):
        return
    start, shortest = req.logprob_start_len, min(len(p) for p in prompts)
    if not 0 <= start < shortest:
        raise bad_request(
            f"logprob_start_len must be -1 (output tokens only) or in [0, {shortest - 1}] (a prompt position), "
            f"got {start}",
            "logprob_start_len",
        )


def _request_ids(rid: str | list[str] | None, count: int) -> list[str]:
    if rid is None:
        return [uuid.uuid4().hex for _ in range(count)]
    rids = [rid] if isinstance(rid, str) else rid
    if len(rids) != count or len(set(rids)) != count:
        raise bad_request(f"rid must give {count} distinct id(s), one per prompt", "rid")
    return rids


class _NativeReply:
    def __init__(self, req: GenerateRequest, rids: list[str], n: int, prompts: list[list[int]]) -> None:
        self.req, self.rids, self.n, self.prompts = req, rids, n, prompts
        self.prompt_logprobs: list[list[dict[int, float] | None] | None] = [None] * len(rids)
        self.position = {rid: i for i, rid in enumerate(rids)}
        count = len(rids) * n
        self.texts: list[list[str]] = [[] for _ in range(count)]  # parts: += would copy the text per token
        self.ids: list[list[int]] = [[] for _ in range(count)]
        self.logprobs: list[list[dict[int, float]]] = [[] for _ in range(count)]
        self.finish: list[dict[str, Any] | None] = [None] * count
        self.prompt_tokens, self.cached_tokens = [0] * len(rids), [0] * len(rids)
        self.start = time.monotonic()

    def _add(self, delta: RequestDelta, o: CompletionDelta) -> int:
        p = self.position[delta.request_id]
        i = p * self.n + o.index
        self.prompt_tokens[p], self.cached_tokens[p] = delta.num_prompt_tokens, delta.num_cached_tokens
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs[p] = delta.prompt_logprobs
        self.texts[i].append(o.text)
        self.ids[i] += o.token_ids
        self.logprobs[i] += o.logprobs or []
        if o.finish_reason is not None:
            self.finish[i] = _finish_reason(o, len(self.ids[i]))
        return i

    def _item(self, i: int) -> dict[str, Any]:
        p = i // self.n
        meta: dict[str, Any] = {
            "id": self.rids[p],
            "finish_reason": self.finish[i],
            "prompt_tokens": self.prompt_tokens[p],
            "completion_tokens": len(self.ids[i]),
            "cached_tokens": self.cached_tokens[p],
            "e2e_latency": time.monotonic() - self.start,
        }
        if self.req.return_logprob:
            meta["output_token_logprobs"] = [
                [e[t], t, None] for t, e in zip(self.ids[i], self.logprobs[i], strict=True)
            ]
            top = self.req.top_logprobs_num
            meta["output_top_logprobs"] = [
                [[lp, t, None] for t, lp in sorted(e.items(), key=lambda kv: -kv[1])[:top]] for e in self.logprobs[i]
            ]
            scored = self.prompt_logprobs[p]
            if _wants_input_logprobs(self.req) and scored is not None:
                start = self.req.logprob_start_len
                pairs = list(zip(self.prompts[p][start:], scored[start:], strict=True))
                # As SGLang: [logprob, token id, text]; the first prompt token has no logprob (null).
                meta["input_token_logprobs"] = [[None if e is None else e[t], t, None] for t, e in pairs]
                meta["input_top_logprobs"] = [
                    None if e is None else [[lp, t, None] for t, lp in sorted(e.items(), key=lambda kv: -kv[1])[:top]]
                    for _, e in pairs
                ]
        item = {"text": "".join(self.texts[i]), "output_ids": list(self.ids[i]), "meta_info": meta}
        if len(self.texts) > 1:
            item["index"] = i
        return item

    async def collect(self, stream: RequestStream, single: bool) -> Response:
        async for delta in stream:
            for o in delta.outputs:
                self._add(delta, o)
        items = [self._item(i) for i in range(len(self.texts))]
        return JSONResponse(items[0] if single else items)

    async def events(self, stream: RequestStream) -> AsyncIterator[str]:
        try:
            async for delta in stream:
                for o in delta.outputs:
                    yield sse(self._item(self._add(delta, o)))
        except Exception as e:
            logger.warning("generate request failed while streaming: %s", e)
            yield error_event(e)
        yield SSE_DONE


def _finish_reason(o: CompletionDelta, length: int) -> dict[str, Any]:
    if o.finish_reason == "stop":
        return {"type": "stop", "matched": o.stop_reason}
    if o.finish_reason == "length":
        return {"type": "length", "length": length}
    return {"type": o.finish_reason}
