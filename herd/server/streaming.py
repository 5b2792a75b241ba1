"""Server-sent events tied to engine requests, and cancellation when a client goes away.

A client that disconnects must not leave its request running: the KV cache it holds belongs to others.
Both helpers here watch the connection while the engine works and, when the client is gone, stop the
work, which closes its `RequestStream` and so aborts the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from herd.frontend.async_engine import RequestStream

logger = logging.getLogger(__name__)

T = TypeVar("T")
SSE_DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EngineEventStream(StreamingResponse):
    """An SSE response over `events`, produced from `stream`.

    Unlike Starlette's, it always listens for the disconnect (also between tokens, and before the first),
    and it closes the engine stream however the response ends: the request is aborted unless finished.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], stream: RequestStream) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = asyncio.ensure_future(self.stream_response(send))
        listener = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, listener):
                task.cancel()
            results = await asyncio.gather(sender, listener, return_exceptions=True)
            self.stream.close()
            aclose: Callable[[], Awaitable[None]] | None = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()
        if isinstance(results[0], Exception) and not isinstance(results[0], OSError):
            logger.error("event stream failed", exc_info=results[0])


async def cancel_on_disconnect(request: Request, work: Awaitable[Response], stream: RequestStream) -> Response:
    """Await `work` (which reads `stream`) unless the client disconnects first; then cancel it. Either way
    `stream` is closed at the end, which aborts its requests if they are unfinished."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, listener, return_exceptions=True)
        stream.close()
    if task.cancelled():
        # Nobody reads this answer; 499 is nginx's "client closed request", for the access log.
        return Response(status_code=499)
    return task.result()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
