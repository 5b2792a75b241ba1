"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, for every failure.

FastAPI answers a body that fails validation with 422 and its own shape; OpenAI clients expect 400 and
this one, so the handlers here replace FastAPI's.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from herd.frontend.async_engine import EngineCrashedError, EngineDeadError, RequestTimeoutError

logger = logging.getLogger(__name__)

_TYPE_TAG = re.compile(r"str|int|float|bool|dict|list|\w+\[.*\]")
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}


class APIError(Exception):
    """A request that fails with `status`; `message` says why in words a client can act on."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.param = param
        self.code = code


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error (OpenAI's shape); in the OpenAPI schema for every route."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "the request is invalid; the message names the field and what is accepted"),
        (401, "missing or wrong API key (--api-key)"),
        (404, "no such model or route"),
        (413, "the body is larger than --max-request-body-bytes"),
        (500, "the engine failed while serving the request"),
        (503, "overloaded (--max-queued-requests, with Retry-After), shutting down, or the engine is not running"),
        (504, "the request took longer than --request-timeout; it was stopped and its KV cache freed"),
    )
}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def param_of(message: str, known: set[str]) -> str | None:
    """The parameter a ValueError from SamplingParams names: its message starts with the name."""
    word = message.split(" ", 1)[0].split("[", 1)[0]
    return word if word in known else None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc.errors())
        return error_response(400, message, param)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        # A crash under a running request is a server error; a stopped engine is only unavailable.
        return error_response(500 if isinstance(exc, EngineCrashedError) else 503, str(exc))

    @app.exception_handler(RequestTimeoutError)
    async def _timed_out(request: Request, exc: RequestTimeoutError) -> JSONResponse:
        return error_response(504, str(exc), code="request_timeout")

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {exc!r}")


def describe_validation_error(errors: Any) -> tuple[str, str | None]:
    """A message and parameter path for the first of pydantic's errors."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    # Unions add the member's type to the path (stop.str, stop.list[str]): not a field a client knows.
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _TYPE_TAG.fullmatch(str(part))]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
    if param is not None:
        message = f"{param}: {message}"
    if first.get("type") == "missing":
        message = f"missing required field: {param}"
    elif "input" in first and first.get("type") not in ("missing", "model_attributes_type"):
        message += f" (got {_short(first['input'])})"
    return message, param


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
