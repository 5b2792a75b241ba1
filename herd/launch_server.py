"""`python -m herd.launch_server ...` (alias `herd serve ...`): SGLang's command line, herd's server.

Start-up order: check every flag (a bad one fails naming it), bind the port (a busy one fails before
minutes of weight loading), load the model, then serve with uvicorn until SIGINT / SIGTERM, or until the
engine process dies (a tensor-parallel rank lost): then the server stops with status 1. A node other than
node 0 (`--node-rank` above 0) serves nothing: it runs its tensor-parallel ranks until node 0 stops.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
import threading
import time

import uvicorn

from herd.config.engine import LOG_FORMAT, ServerConfig
from herd.config.server_args import ArgumentError, ServerArgs, add_server_args, server_args_from
from herd.frontend.async_engine import AsyncEngine
from herd.server import build_app
from herd.worker.distributed import run_node

logger = logging.getLogger(__name__)


def build_parser(prog: str = "herd serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} [--model-path PATH] [flags] (all flags: {prog} --help)",
        description="Serve a Llama 4 checkpoint over an OpenAI-compatible HTTP API (SGLang's flags).",
    )
    add_server_args(parser)
    return parser


def parse_args(argv: list[str] | None, prog: str = "herd serve") -> ServerArgs:
    """ServerArgs from a command line; exits with status 2 and a message naming the flag if one is bad."""
    parser = build_parser(prog)
    namespace = parser.parse_args(argv)
    try:
        return server_args_from(namespace)
    except ArgumentError as e:
        parser.error(str(e))


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now so that a busy port fails at once (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(config: ServerConfig, engine: AsyncEngine, sock: socket.socket) -> uvicorn.Server:
    """A uvicorn server for `engine`; run it with `server.run(sockets=[sock])`. The app's lifespan starts
    the engine and shuts it down."""
    app = build_app(config, engine, url=url_of(sock))
    level = config.log_level.lower()
    # log_config=None: uvicorn's loggers go through the root handler, in herd's format.
    config = uvicorn.Config(app, log_config=None, log_level=level, timeout_graceful_shutdown=10)
    return uvicorn.Server(config)


def stop_when_engine_dies(server: uvicorn.Server, engine: AsyncEngine, failed: threading.Event) -> None:
    """Stop serving if the engine process exits with an error: no request could be served again."""

    def watch() -> None:
        while not server.should_exit:
            code = getattr(engine.client, "exitcode", None)
            if code not in (None, 0):
                logger.error("the engine process exited with status %s: stopping the server", code)
                failed.set()
                server.should_exit = True
                return
            time.sleep(0.5)

    threading.Thread(target=watch, name="herd-engine-watch", daemon=True).start()


def main(argv: list[str] | None = None, prog: str = "herd serve") -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=(args.log_level or "info").upper(), format=LOG_FORMAT)
    if args.node_rank > 0:
        try:
            config = args.to_config()
        except (ValueError, OSError) as e:
            logger.error("cannot load the model at --model-path %s: %s", args.model_path, e)
            return 1
        run_node(config.engine)
        return 0
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        logger.error("cannot listen on --host %s --port %d: %s", args.host, args.port, e)
        return 1
    try:
        config = args.to_config()
        # The engine core runs in a process of its own: the HTTP side then takes none of its GIL or cores.
        engine = AsyncEngine.create(config)
    except (ValueError, OSError) as e:  # a missing or unreadable checkpoint, a bad --chat-template, ...
        logger.error("cannot load the model at --model-path %s: %s", args.model_path, e)
        return 1
    # uvicorn re-raises the Ctrl-C it caught once it has shut down cleanly: that is a normal exit.
    server, failed = make_server(config.server, engine, sock), threading.Event()
    stop_when_engine_dies(server, engine, failed)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[sock])
    finally:
        engine.client.close()
    return 1 if failed.is_set() else 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m herd.launch_server"))
