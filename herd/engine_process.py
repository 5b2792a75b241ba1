"""The engine in a process of its own, behind the same interface as `Engine`.

A server that steps the engine in a thread of its own process shares one GIL (and, on a small
CPU host, its cores) between the model and the HTTP side; each slows the other down. Here the
engine lives in a child process with its own interpreter and all of torch's threads, and
`EngineProcess` forwards `add_request`, `abort` and `step` to it over a pipe, so `AsyncEngine`
drives it exactly as it drives an in-process `Engine`. Every reply carries the engine's counters
(running, waiting, KV usage, prefix hits), so reading them costs no extra round trip.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from herd.config import ModelConfig
from herd.engine import Engine, RequestOutput
from herd.sampling import SamplingParams
from herd.server_args import ServerArgs
from herd.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _State:
    unfinished: bool = False
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_hit_rate: float = 0.0
    has_prefix_cache: bool = True


class _KVView:
    def __init__(self, owner: EngineProcess) -> None:
        self._owner = owner

    def usage(self) -> float:
        return self._owner._state.kv_usage


class _PrefixCacheView:
    def __init__(self, owner: EngineProcess) -> None:
        self._owner = owner

    @property
    def hit_rate(self) -> float:
        return self._owner._state.prefix_hit_rate

    def clear(self) -> None:
        self._owner._rpc("clear_prefix_cache")


class EngineProcess:
    """An `Engine` running in a child process; its methods are calls into it (from one thread only)."""

    def __init__(self, args: ServerArgs) -> None:
        ctx = mp.get_context("spawn")  # fork would copy torch's thread pools in a broken state
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(args, child), name="herd-engine", daemon=True)
        self._process.start()
        child.close()
        self._state = _State()
        status, payload = self._recv()
        if status == "error":
            self._process.join(timeout=10)
            raise payload
        self.context_length: int = payload
        self.config = ModelConfig.from_hf(args.model_path)
        self.tokenizer: Tokenizer | None = None
        if not args.skip_tokenizer_init:
            try:
                self.tokenizer = load_tokenizer(args.tokenizer_path or args.model_path, args.chat_template)
            except FileNotFoundError:
                self.tokenizer = None
        self.kv = _KVView(self)

    @property
    def prefix_cache(self) -> _PrefixCacheView | None:
        return _PrefixCacheView(self) if self._state.has_prefix_cache else None

    def add_request(
        self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | None = None
    ) -> None:
        self._rpc("add_request", request_id, prompt, params)

    def abort(self, request_id: str) -> None:
        self._rpc("abort", request_id)

    def step(self) -> list[RequestOutput]:
        return self._rpc("step")

    def has_unfinished_requests(self) -> bool:
        return self._state.unfinished

    def num_running(self) -> int:
        return self._state.running

    def num_waiting(self) -> int:
        return self._state.waiting

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(("stop",))
            self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()

    def _rpc(self, method: str, *args: Any) -> Any:
        self._conn.send((method, *args))
        status, payload = self._recv()
        if status == "error":
            raise payload
        return payload

    def _recv(self) -> tuple[str, Any]:
        try:
            status, payload, state = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited (code {self._process.exitcode})") from None
        if state is not None:
            self._state = state
        return status, payload


def _serve(args: ServerArgs, conn: Connection) -> None:
    """The child: build the engine, then answer calls until told to stop."""
    logging.basicConfig(
        level=(args.log_level or "info").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        engine = Engine(args)
    except Exception as e:  # a bad checkpoint: the parent reports it and exits
        conn.send(("error", e, None))
        return
    conn.send(("ok", engine.context_length, _state_of(engine)))
    while True:
        method, *call_args = conn.recv()
        if method == "stop":
            return
        try:
            if method == "clear_prefix_cache":
                result = engine.prefix_cache.clear() if engine.prefix_cache is not None else None
            else:
                result = getattr(engine, method)(*call_args)
        except Exception as e:  # a request the engine refuses: the caller gets the exception
            conn.send(("error", e, _state_of(engine)))
            continue
        conn.send(("ok", result, _state_of(engine)))


def _state_of(engine: Engine) -> _State:
    cache = engine.prefix_cache
    return _State(
        unfinished=engine.has_unfinished_requests(),
        running=engine.num_running(),
        waiting=engine.num_waiting(),
        kv_usage=engine.kv.usage(),
        prefix_hit_rate=cache.hit_rate if cache is not None else 0.0,
        has_prefix_cache=cache is not None,
    )
