"""`--api-key`: every request but `GET /health` and the chat page's files needs `Authorization: Bearer <key>`.

A plain ASGI middleware rather than a FastAPI dependency: it answers before the body is read, so an
unauthenticated request gets 401 even when its body is malformed, and it leaves streaming untouched.
"""

from __future__ import annotations

import json
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from herd.server.errors import error_body

OPEN_PATHS = frozenset({"/health", "/"})  # "/": the chat page, which asks for the key and sends it itself
OPEN_PREFIXES = ("/static/",)


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        if secrets.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        message = "missing API key" if not given else "invalid API key"
        message += ": send the header `Authorization: Bearer <key>`"
        body = json.dumps(error_body(401, message, None, "invalid_api_key"))
        headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})
