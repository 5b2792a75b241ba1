"""`python -m herd.launch_server ...` (alias `herd serve ...`): SGLang's command line, herd's server.

Start-up order: check every flag (a bad one fails naming it), bind the port (a busy one fails before
minutes of weight loading), load the model, then serve with uvicorn until SIGINT / SIGTERM (a graceful
drain, exit 0) or until the engine dies (a tensor-parallel rank lost too: exit 1); see herd.server.shutdown.
A node other than node 0 (`--node-rank` above 0) serves nothing: it runs its tensor-parallel ranks until
node 0 stops.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import socket
import sys

import uvicorn

from herd.config.engine import LOG_FORMAT, ServerConfig
from herd.config.server_args import ArgumentError, ServerArgs, add_server_args, server_args_from
from herd.frontend.async_engine import AsyncEngine
from herd.server import build_app
from herd.server.shutdown import CLOSE_TIMEOUT_S, GracefulServer
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
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the listening socket says
    # it is TCP. Without it a kept-alive client (the openai SDK) waits ~40 ms for a delayed ACK per request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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


def make_server(
    config: ServerConfig, engine: AsyncEngine, sock: socket.socket, exit_on_engine_death: bool = False
) -> GracefulServer:
    """A uvicorn server for `engine`; run it with `server.run(sockets=[sock])`. The app's lifespan starts
    the engine and shuts it down; `server.state.exit_code` is the status to exit with."""
    app = build_app(config, engine, url=url_of(sock))
    level = config.log_level.lower()
    # log_config=None: uvicorn's loggers go through the root handler, in herd's format. The drain
    # (GracefulServer) waits for requests in flight; uvicorn's own wait then only flushes the last bytes.
    uv = uvicorn.Config(app, log_config=None, log_level=level, timeout_graceful_shutdown=CLOSE_TIMEOUT_S)
    timeout = config.graceful_shutdown_timeout
    return GracefulServer(uv, engine, app.state.shutdown, timeout, exit_on_engine_death=exit_on_engine_death)


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
    server = make_server(config.server, engine, sock, exit_on_engine_death=True)
    # The app, its libraries and the tokenizer live as long as the process: out of the collector's generations, a
    # full collection does not walk them while tokens stream (as in the engine process, herd.engine.client).
    gc.collect()
    gc.freeze()
    # uvicorn re-raises a Ctrl-C that forced the stop once it has shut down: that is a normal exit.
    try:
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[sock])
    finally:
        engine.client.close()
    return server.state.exit_code


if __name__ == "__main__":
    sys.exit(main(prog="python -m herd.launch_server"))
