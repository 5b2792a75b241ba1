"""Questions asked of the server before a run: is it there, which model does it serve, from which path."""

from __future__ import annotations

import logging
from typing import Any

import httpx

from herd.bench.runner import CONNECT_TIMEOUT_S, BenchmarkError, auth_headers

logger = logging.getLogger(__name__)


def _get(base_url: str, path: str) -> httpx.Response:
    try:
        return httpx.get(base_url + path, headers=auth_headers(), timeout=CONNECT_TIMEOUT_S, trust_env=False)
    except httpx.HTTPError as e:
        raise BenchmarkError(
            f"cannot reach the server at {base_url} ({type(e).__name__}: {e}); is it running? "
            "Point the benchmark at it with --base-url, or --host and --port"
        ) from e


def served_models(base_url: str) -> list[str]:
    """Model ids from GET /v1/models; [] when the server has no such route. Raises BenchmarkError when
    nothing answers at base_url."""
    resp = _get(base_url, "/v1/models")
    if resp.status_code != 200:
        logger.warning("GET /v1/models answered %d", resp.status_code)
        return []
    try:
        data: Any = resp.json().get("data", [])
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
    except (ValueError, AttributeError, TypeError):
        logger.warning("GET /v1/models did not answer an OpenAI model list")
        return []


def served_model_path(base_url: str) -> str | None:
    """The server's tokenizer or model path from SGLang's GET /get_model_info, if it has that route."""
    try:
        resp = _get(base_url, "/get_model_info")
        info = resp.json() if resp.status_code == 200 else {}
    except (BenchmarkError, ValueError):
        return None
    path = info.get("tokenizer_path") or info.get("model_path") if isinstance(info, dict) else None
    return str(path) if path else None
