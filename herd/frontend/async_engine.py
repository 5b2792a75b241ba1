"""`AsyncEngine`: the frontend of an asyncio server, over an engine core running in a process or thread.

Everything here runs on the event loop: checking and tokenizing requests (images off the loop), sending
them to the core, and turning the core's messages (new token ids per sequence) into one stream of deltas
per request, with text, stop strings and `n` handled by the `OutputProcessor`. The core's messages arrive on
the loop too: the process client reads its pipe there, the in-process core's thread hands them over.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from herd.config.engine import HerdConfig
from herd.engine import CoreMessage, EngineCore, EngineStats
from herd.engine.client import InprocCoreClient, ProcessCoreClient
from herd.frontend.output_processor import OutputProcessor
from herd.frontend.outputs import CompletionDelta, RequestDelta
from herd.frontend.processor import InputProcessor, ProcessedRequest, Prompt, RequestError, load_frontend_tokenizer
from herd.frontend.tokenizer import Tokenizer
from herd.sampling import SamplingParams

logger = logging.getLogger(__name__)

__all__ = [
    "AsyncEngine",
    "CompletionDelta",
    "EngineCrashedError",
    "EngineDeadError",
    "Prompt",
    "QueueFullError",
    "RequestDelta",
    "RequestStream",
    "RequestTimeoutError",
]

CoreClient = InprocCoreClient | ProcessCoreClient


class EngineDeadError(RuntimeError):
    """The engine stopped (a crash or shutdown): no request can be served."""


class EngineCrashedError(EngineDeadError):
    """The engine died while serving (its process killed, out of memory, a CUDA error): a server error."""


class QueueFullError(RuntimeError):
    """More sequences are waiting than `--max-queued-requests` allows: try again later."""


class RequestTimeoutError(RuntimeError):
    """A request ran past `--request-timeout`: it is aborted, its KV cache freed."""


class StreamObserver(Protocol):
    """Sees every delta of a stream on the event loop (metrics, request logs), then its end."""

    def on_delta(self, delta: RequestDelta) -> None: ...

    def on_close(self, finished: bool) -> None: ...


class RequestStream:
    """The deltas of one or more requests (a batch shares one queue), until all are finished.

    Iterate it, then `close()` it (always, e.g. in `finally`): closing aborts what is unfinished and
    frees its KV cache. Closing twice is harmless. With a `deadline` (the loop's clock), waiting for a
    delta past it raises `RequestTimeoutError`.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        request_ids: list[str],
        observer: StreamObserver | None,
        deadline: float | None = None,
    ) -> None:
        self.request_ids = request_ids
        self._deadline = deadline
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
        item = await self._next_item()
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            self._unfinished.discard(item.request_id)
        if self._observer is not None:
            self._observer.on_delta(item)
        return item

    async def _next_item(self) -> RequestDelta | BaseException:
        if self._deadline is None:
            return await self.queue.get()
        try:
            remaining = self._deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError
            return await asyncio.wait_for(self.queue.get(), remaining)
        except TimeoutError:
            limit = self._engine.request_timeout
            raise RequestTimeoutError(f"the request took longer than {limit:g} s (--request-timeout)") from None

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for request_id in self.request_ids:
            self._engine._streams.pop(request_id, None)
        self._engine._abort(list(self._unfinished))
        if self._observer is not None:
            self._observer.on_close(self.finished)


class AsyncEngine:
    """Serve requests over `client`; `start()` it from inside the event loop that will use it."""

    def __init__(
        self,
        client: CoreClient,
        processor: InputProcessor,
        tokenizer: Tokenizer | None,
        max_sequences: int | None = None,
        request_timeout: float | None = None,
    ) -> None:
        self.client, self.processor, self.tokenizer = client, processor, tokenizer
        self.max_sequences = max_sequences  # running + queued; None: no limit
        self.request_timeout = request_timeout  # seconds from submit to the last delta; None: no limit
        self.context_length = processor.context_length
        self.outputs = OutputProcessor(tokenizer)
        self.stats = EngineStats()  # the core's latest figures (replaced, never mutated)
        self.error: BaseException | None = None
        self._streams: dict[str, RequestStream] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called once on the event loop if the engine dies while serving (not at shutdown): the server stops.
        self.on_dead: Callable[[BaseException], None] | None = None

    @classmethod
    def create(cls, config: HerdConfig, in_process: bool = False) -> AsyncEngine:
        """Load the tokenizer and start the core: in a process of its own (the server), or in this one."""
        tokenizer = load_frontend_tokenizer(config.frontend)
        client: CoreClient
        if in_process:
            client = InprocCoreClient(EngineCore(config.engine))
        else:
            client = ProcessCoreClient(config.engine, log_level=config.server.log_level)
        context_length = config.engine.scheduler.context_length
        processor = InputProcessor(config.frontend, config.engine.model, tokenizer, context_length, client.info)
        queued = config.frontend.max_queued_requests
        max_sequences = None if queued is None else config.engine.scheduler.max_running_requests + queued
        return cls(client, processor, tokenizer, max_sequences, config.frontend.request_timeout)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.client.start(self._on_message, self._loop)

    async def shutdown(self) -> None:
        if self.error is None:
            self.error = EngineDeadError("the server is shutting down")
        await asyncio.to_thread(self.client.close)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._loop is not None and self.client.alive

    def _check_alive(self) -> None:
        if not self.healthy:
            raise EngineDeadError(f"the engine is not running: {self.error or 'not started'}")

    # -- requests --------------------------------------------------------------------------------------------

    async def submit(
        self, requests: Sequence[tuple[str, Prompt, SamplingParams]], observer: StreamObserver | None = None
    ) -> RequestStream:
        """Add requests (all or none: the first that fails raises, none of them runs)."""
        started = asyncio.get_running_loop().time()  # the timeout counts image and grammar preparation too
        self._check_alive()
        self._check_room(sum(r[2].n for r in requests))
        ids = [r[0] for r in requests]
        if len(set(ids)) != len(ids) or any(request_id in self._streams for request_id in ids):
            raise RequestError(f"request ids {ids} are not distinct or already in use")
        processed = [await self._process(*request) for request in requests]
        self._check_alive()  # it may have died while images were being prepared
        deadline = None if self.request_timeout is None else started + self.request_timeout
        stream = RequestStream(self, ids, observer, deadline)
        for request in processed:
            self._streams[request.request_id] = stream
            self.outputs.add(request)
        self.client.add_requests([core for request in processed for core in request.core_requests])
        return stream

    def _check_room(self, num_sequences: int) -> None:
        """Refuse what would make the queue longer than allowed: a client retries sooner than it waits."""
        limit = self.max_sequences
        if limit is not None and self.outputs.num_sequences + num_sequences > limit:
            raise QueueFullError(
                f"the server is overloaded: {self.outputs.num_sequences} sequences are running or queued, "
                f"the limit is {limit} (--max-running-requests + --max-queued-requests); retry later"
            )

    async def _process(self, request_id: str, prompt: Prompt, params: SamplingParams) -> ProcessedRequest:
        if (isinstance(prompt, dict) and prompt.get("multi_modal_data")) or self.processor.needs_compile(params):
            # Image preprocessing and grammar compiles take a while: other streams must flow meanwhile.
            return await asyncio.to_thread(self.processor.process, request_id, prompt, params)
        return self.processor.process(request_id, prompt, params)

    async def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache; False (and nothing dropped) while requests run."""
        return bool(await self._call("reset_prefix_cache"))

    async def _call(self, method: str) -> Any:
        self._check_alive()
        assert self._loop is not None
        call_id = next(self._call_ids)
        future = self._loop.create_future()
        self._calls[call_id] = future
        self.client.call(call_id, method)
        return await future

    def _abort(self, request_ids: list[str]) -> None:
        core_ids = [core_id for request_id in request_ids for core_id in self.outputs.abort(request_id)]
        if core_ids:
            self.client.abort_requests(core_ids)

    # -- messages from the core ------------------------------------------------------------------------------

    def _on_message(self, message: CoreMessage) -> None:
        self.stats = message.stats
        for call_id, result, error in message.replies:
            future = self._calls.pop(call_id, None)
            if future is None or future.done():
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)
        for core_ids, error in message.failed:
            for request_id in {core_id.rpartition("#")[0] for core_id in core_ids}:
                self._fail(request_id, error)
        deltas, stopped = self.outputs.process(message.outputs)
        if stopped:
            self.client.abort_requests(stopped)
        for delta in deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:
                stream.queue.put_nowait(delta)
        if message.dead is not None:
            self._die(message.dead)

    def _fail(self, request_id: str, error: BaseException) -> None:
        self._abort([request_id])
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.queue.put_nowait(error)

    def _die(self, cause: BaseException) -> None:
        if self.error is None:
            logger.error("the engine stopped; every request fails from now on: %s", cause)
            self.error = EngineCrashedError(str(cause))
            if self.on_dead is not None:
                self.on_dead(cause)
        for stream in set(self._streams.values()):
            stream.queue.put_nowait(self.error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(self.error)
        self._calls.clear()
