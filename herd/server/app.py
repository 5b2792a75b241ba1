"""The FastAPI app: OpenAI-compatible routes, SGLang's native ones, health and metrics.

`build_app(args, engine)` wires them to one `AsyncEngine`, whose thread the app's lifespan starts and
stops. Handlers only translate between HTTP and the engine; the endpoint modules hold the logic.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from herd.config.engine import ServerConfig
from herd.frontend.async_engine import AsyncEngine
from herd.server.auth import APIKeyMiddleware
from herd.server.chat import create_chat_completion
from herd.server.completions import create_completion
from herd.server.context import ServerContext
from herd.server.errors import ERROR_RESPONSES, APIError, error_response, install_error_handlers
from herd.server.limits import BodySizeLimitMiddleware
from herd.server.native import GenerateRequest, generate
from herd.server.protocol import ChatCompletionRequest, CompletionRequest
from herd.server.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    FlushCacheResponse,
    GenerateItem,
    ModelCard,
    ModelInfo,
    ModelList,
    json_and_events,
)
from herd.server.shutdown import DrainMiddleware, ShutdownState

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"  # the chat page: plain HTML, CSS and JavaScript, no build step


def build_app(config: ServerConfig, engine: AsyncEngine, url: str | None = None) -> FastAPI:
    """The app for `engine`; `url` is only for the startup log line."""
    ctx = ServerContext.build(config, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        logger.info("herd is serving %s at %s (OpenAI API under /v1)", ctx.model_name, url or "(in process)")
        yield
        await engine.shutdown()

    app = FastAPI(title="herd", lifespan=lifespan, responses=ERROR_RESPONSES)
    app.state.ctx = ctx
    install_error_handlers(app)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.max_request_body_bytes)
    app.state.shutdown = ShutdownState()
    app.add_middleware(DrainMiddleware, state=app.state.shutdown)  # added last: runs first
    _add_openai_routes(app, ctx)
    _add_native_routes(app, ctx)
    _add_chat_page(app)
    return app


def _add_chat_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _add_openai_routes(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/v1/chat/completions", responses=json_and_events(ChatCompletionResponse, "the completion"))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    @app.post("/v1/completions", responses=json_and_events(CompletionResponse, "the completion"))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(ctx)]}

    @app.get("/v1/models/{model:path}", response_model=ModelCard)
    async def model(model: str) -> dict[str, Any]:
        ctx.check_model(model)
        return _model_card(ctx)


def _add_native_routes(app: FastAPI, ctx: ServerContext) -> None:
    @app.get("/health", response_class=Response, responses={200: {"description": "serving (an empty body)"}})
    async def health() -> Response:
        # 200 only while the engine thread runs: a load balancer must stop sending work to a dead engine.
        if not ctx.engine.healthy:
            return error_response(503, f"the engine is not running: {ctx.engine.error}")
        return Response(status_code=200)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)

    # One object per prompt and sample; a list of them for a batch of prompts or n > 1 (SGLang's shape).
    @app.post("/generate", responses=json_and_events(GenerateItem | list[GenerateItem], "the output"))  # type: ignore[arg-type]
    async def native_generate(body: GenerateRequest, request: Request) -> Response:
        return await generate(ctx, body, request)

    @app.get("/get_model_info", response_model=ModelInfo)
    async def model_info() -> dict[str, Any]:
        config = ctx.config
        return {
            "model_path": config.model_path,
            "tokenizer_path": config.tokenizer_path,
            "is_generation": True,
            "has_image_understanding": config.enable_multimodal,  # SGLang's field; the chat page reads it
        }

    @app.get("/get_server_info")
    async def server_info() -> dict[str, Any]:
        """SGLang's route, with what its bench_serving reads: the speculative accept length, when on."""
        stats = ctx.engine.stats
        state: dict[str, Any] = {}
        if stats.spec_verify_ct:
            state = {"avg_spec_accept_length": stats.spec_accept_length, "spec_verify_ct": stats.spec_verify_ct}
        return {"model_path": ctx.config.model_path, "internal_states": [state]}

    @app.post("/flush_cache", responses={200: {"model": FlushCacheResponse, "description": "the cache is empty"}})
    async def flush_cache() -> Response:
        """Drop the prefix cache (SGLang's route); refused while requests run, as in SGLang."""
        if not await ctx.engine.reset_prefix_cache():
            raise APIError(400, "cache not flushed: requests are running")
        return JSONResponse({"message": "cache flushed"})


def _model_card(ctx: ServerContext) -> dict[str, Any]:
    return {
        "id": ctx.model_name,
        "object": "model",
        "created": ctx.created,
        "owned_by": "herd",
        "root": ctx.config.model_path,
        "max_model_len": ctx.context_length,
    }
