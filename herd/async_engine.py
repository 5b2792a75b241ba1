"""`AsyncEngine`: the single-threaded `Engine` driven from its own thread, for an asyncio server.

The engine thread owns the engine: every call into it (add, abort, step, inspection) happens there.
The event loop talks to it through a thread-safe command queue; the thread hands results back with
`loop.call_soon_threadsafe`, once per step for all requests, into one asyncio queue per stream. The
thread blocks on the command queue while no request is unfinished, so an idle server burns no CPU.

Outputs cross the thread boundary as deltas (new text, tokens and logprobs since the last step), not as
the engine's cumulative `RequestOutput` objects, which the engine keeps mutating while the loop reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from herd.engine import Engine, RequestError, RequestOutput
from herd.engine_process import EngineProcess
from herd.sampling import SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")
Prompt = str | list[int] | dict


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a crash or shutdown): no request can be served."""


@dataclass
class CompletionDelta:
    """What one of a request's n completions produced since the previous delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # per new token: {sampled id: logprob, alternatives...}
    finish_reason: str | None  # "stop", "length", "abort"; set on the completion's last delta
    stop_reason: int | str | None


@dataclass
class RequestDelta:
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    outputs: list[CompletionDelta]
    finished: bool  # every completion of the request is finished


@dataclass(frozen=True)
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_hit_rate: float = 0.0


class StreamObserver(Protocol):
    """Sees every delta of a stream on the event loop (metrics, request logs), then its end."""

    def on_delta(self, delta: RequestDelta) -> None: ...

    def on_close(self, finished: bool) -> None: ...


@dataclass
class _Sent:
    """How much of each completion of a request the loop has already been given."""

    tokens: list[int]
    chars: list[int]
    finished: list[bool]  # its last delta (with the finish reason) is sent: the engine still reports it


@dataclass
class _Add:
    requests: Sequence[tuple[str, Prompt, SamplingParams]]
    done: asyncio.Future[None]


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[Engine], Any]
    done: asyncio.Future[Any]


class _Stop:
    pass


_Command = _Add | _Abort | _Call | _Stop


class RequestStream:
    """The deltas of one or more requests (a batch shares one queue), until all are finished.

    Iterate it, then `close()` it (always, e.g. in `finally`): closing aborts what is unfinished and
    frees its KV cache. Closing twice is harmless.
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str], observer: StreamObserver | None) -> None:
        self.request_ids = request_ids
        self.queue: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        self._engine = engine
        self._unfinished = set(request_ids)
        self._observer = observer
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestDelta:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
        if self._observer is not None:
            self._observer.on_delta(item)
        return item

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for request_id in self.request_ids:
            self._engine._streams.pop(request_id, None)
        for request_id in self._unfinished:
            self._engine._send(_Abort(request_id))
        if self._observer is not None:
            self._observer.on_close(self.finished)


class AsyncEngine:
    """Runs `engine` in a thread; `start()` it from inside the event loop that will use it."""

    def __init__(self, engine: Engine | EngineProcess) -> None:
        self.engine = engine
        self.stats = EngineStats()  # replaced (never mutated) by the engine thread; read from anywhere
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # loop thread only
        self._sent: dict[str, _Sent] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- event loop side -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="herd-engine", daemon=True)
        self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        self._send(_Stop())
        await asyncio.to_thread(self._thread.join, timeout)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    async def submit(
        self, requests: Sequence[tuple[str, Prompt, SamplingParams]], observer: StreamObserver | None = None
    ) -> RequestStream:
        """Add requests (all or none: the first that fails raises, the others are not kept)."""
        self._check_alive()
        ids = [r[0] for r in requests]
        if len(set(ids)) != len(ids) or any(request_id in self._streams for request_id in ids):
            raise RequestError(f"request ids {ids} are not distinct or already in use")
        stream = RequestStream(self, ids, observer=None)
        for request_id in stream.request_ids:
            self._streams[request_id] = stream  # before the add: the first delta may come right after it
        done = asyncio.get_running_loop().create_future()
        self._send(_Add(list(requests), done))
        try:
            await done
        except BaseException:
            # Failed, or our caller was cancelled while the add was in flight: nothing may be left running.
            stream.close()
            raise
        stream._observer = observer
        return stream

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) on the engine thread, between steps, and return its result."""
        self._check_alive()
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._send(_Call(fn, done))
        return await done

    def _check_alive(self) -> None:
        if not self.healthy:
            raise EngineDeadError(f"the engine is not running: {self.error or 'not started'}")

    def _send(self, command: _Command) -> None:
        self._commands.put(command)
        if self.error is not None:  # the thread has stopped, or is stopping: it may never see this command
            self._drain()

    def _drain(self) -> None:
        """Fail the commands nobody will run (called after the thread stopped; safe from both threads)."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add | _Call):
                self._to_loop(_resolve, command.done, None, self.error)

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:  # else its client is gone and the abort is on its way
                stream.queue.put_nowait(delta)

    def _fail_all(self, error: BaseException) -> None:
        for stream in set(self._streams.values()):
            stream.queue.put_nowait(error)

    # -- engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._handle_commands(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._publish([self._delta(out) for out in outputs])
                self._publish_stats()
            self.error = EngineDeadError("the server is shutting down")
        except BaseException as e:  # a bug in the engine: fail every request instead of hanging them
            logger.exception("the engine loop crashed; every request fails from now on")
            self.error = EngineDeadError(f"the engine crashed: {e!r}")
        # Set the error before draining: a command queued after this drain is drained by its sender.
        self._drain()
        self._to_loop(self._fail_all, self.error)

    def _handle_commands(self, block: bool) -> bool:
        """Run the queued commands (waiting for one if block); False once asked to stop."""
        try:
            command = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Stop):
                return False
            self._handle(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _handle(self, command: _Command) -> None:
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            self._sent.pop(command.request_id, None)
        elif isinstance(command, _Add):
            self._to_loop(_resolve, command.done, *_attempt(lambda: self._add(command.requests)))
        elif isinstance(command, _Call):
            self._to_loop(_resolve, command.done, *_attempt(lambda: command.fn(self.engine)))

    def _add(self, requests: Sequence[tuple[str, Prompt, SamplingParams]]) -> None:
        added: list[str] = []
        try:
            for request_id, prompt, params in requests:
                self.engine.add_request(request_id, prompt, params)
                added.append(request_id)
                self._sent[request_id] = _Sent([0] * params.n, [0] * params.n, [False] * params.n)
        except BaseException:
            for request_id in added:
                self.engine.abort(request_id)
                self._sent.pop(request_id, None)
            raise

    def _delta(self, out: RequestOutput) -> RequestDelta:
        sent = self._sent[out.request_id]
        outputs = []
        for o in out.outputs:
            n_tok, n_chr = sent.tokens[o.index], sent.chars[o.index]
            if sent.finished[o.index] or (len(o.token_ids) == n_tok and not o.finished):
                continue
            logprobs = o.logprobs[n_tok:] if o.logprobs is not None else None
            outputs.append(
                CompletionDelta(o.index, o.text[n_chr:], o.token_ids[n_tok:], logprobs, o.finish_reason, o.stop_reason)
            )
            sent.tokens[o.index], sent.chars[o.index] = len(o.token_ids), len(o.text)
            sent.finished[o.index] = o.finished
        if out.finished:
            del self._sent[out.request_id]
        return RequestDelta(out.request_id, len(out.prompt_token_ids), out.num_cached_tokens, outputs, out.finished)

    def _publish(self, deltas: list[RequestDelta]) -> None:
        if deltas:
            self._to_loop(self._dispatch, deltas)

    def _publish_stats(self) -> None:
        engine = self.engine
        hit_rate = engine.prefix_cache.hit_rate if engine.prefix_cache is not None else 0.0
        self.stats = EngineStats(engine.num_running(), engine.num_waiting(), engine.kv.usage(), hit_rate)

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(fn, *args)


def _attempt(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    try:
        return fn(), None
    except Exception as e:
        return None, e


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # its awaiter was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
