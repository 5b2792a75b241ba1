"""Image bytes, data: URLs and a local HTTP server with a route table, for the tests that load images."""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import threading
from collections.abc import Callable, Iterator

from PIL import Image

# A route answers with (status, headers, body), Content-Length set from the body, or writes its own reply.
Route = tuple[int, dict[str, str], bytes] | Callable[[http.server.BaseHTTPRequestHandler], None]
NOT_FOUND: Route = (404, {}, b"not found")


def encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


@contextlib.contextmanager
def local_web(routes: dict[str, Route]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving `routes` (404 elsewhere); yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path, NOT_FOUND)
            if callable(route):
                route(self)
                return
            status, headers, body = route
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
