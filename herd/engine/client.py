"""Running the engine core where it does not block the caller: in a thread, or in a process of its own.

Both clients run the same loop (`run_core_loop`): take the queued commands (waiting for one while there is
no work), run a step when there is work, send one `CoreMessage` back. The caller sends requests and aborts
without waiting, and gets every message through the callback it gave `start`: on the asyncio loop it names, or
else on the client's thread.

`ProcessCoreClient` is what the server uses: the core gets its own interpreter and all of torch's threads,
so the HTTP side never competes with it for the GIL. Messages cross the pipe pickled, and hold only the
step's new tokens: their size does not grow with how long the outputs are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import multiprocessing as mp
import multiprocessing.util
import pickle
import queue
import select
import signal
import threading
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from herd.config.engine import LOG_FORMAT, EngineConfig
from herd.engine.core import EngineCore
from herd.engine.protocol import CoreInfo, CoreMessage, EngineCoreRequest
from herd.kernels import cpu as cpu_kernels

logger = logging.getLogger(__name__)

# ("add", [EngineCoreRequest, ...]) | ("abort", [request id, ...]) | ("call", call id, method name) | ("stop",)
Command = tuple[Any, ...]
OnMessage = Callable[[CoreMessage], None]


def run_core_loop(core: EngineCore, next_commands: Callable[[bool], list[Command]], send: OnMessage) -> None:
    """Serve commands and step until told to stop; a crash is sent as a last message with `dead` set."""
    try:
        while True:
            message = CoreMessage()
            for command in next_commands(not core.has_unfinished_requests()):
                if command[0] == "stop":
                    return
                _handle(core, command, message)
            if core.has_unfinished_requests():
                message.outputs = core.step()
            message.stats = core.stats()
            send(message)
    except Exception as e:  # a bug in the engine: tell the frontend, so that it fails requests instead of hanging
        logger.exception("the engine loop crashed")
        send(CoreMessage(dead=RuntimeError(f"the engine crashed: {e!r}")))


def _handle(core: EngineCore, command: Command, message: CoreMessage) -> None:
    kind = command[0]
    if kind == "add":
        try:
            core.add_requests(command[1])
        except ValueError as e:
            message.failed.append(([r.request_id for r in command[1]], e))
    elif kind == "abort":
        core.abort_requests(command[1])
    elif kind == "call":
        call_id, method = command[1], command[2]
        try:
            message.replies.append((call_id, getattr(core, method)(), None))
        except Exception as e:
            message.replies.append((call_id, None, e))
    else:
        raise ValueError(f"unknown engine command {kind!r}")


class InprocCoreClient:
    """The core in a thread of this process (tests, and servers embedded in another program)."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.info: CoreInfo = core.info
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, on_message: OnMessage, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Run the core on a thread; `on_message` is called on `loop` if given, else on that thread."""
        deliver = on_message if loop is None else partial(_call_soon, loop, on_message)
        self._thread = threading.Thread(
            target=run_core_loop, args=(self.core, self._next_commands, deliver), name="herd-engine", daemon=True
        )
        self._thread.start()

    def _next_commands(self, block: bool) -> list[Command]:
        try:
            commands = [self._commands.get(block=block)]
        except queue.Empty:
            return []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        self._commands.put(("add", requests))

    def abort_requests(self, request_ids: list[str]) -> None:
        self._commands.put(("abort", request_ids))

    def call(self, call_id: int, method: str) -> None:
        self._commands.put(("call", call_id, method))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        self._commands.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout)


class ProcessCoreClient:
    """The core in a child process; the constructor returns once it is ready (or raises what stopped it)."""

    def __init__(self, config: EngineConfig, log_level: str = "info") -> None:
        ctx = mp.get_context("spawn")  # fork would copy torch's thread pools in a broken state
        commands_out, self._commands = ctx.Pipe(duplex=False)
        self._messages, messages_in = ctx.Pipe(duplex=False)
        # A daemonic process may not start processes: with tensor parallelism the core starts the other ranks,
        # so it is not one, and this process stops it at exit instead (before multiprocessing joins it).
        daemon = config.parallel.tp_size == 1
        self._process = ctx.Process(
            target=_child_main, args=(config, log_level, commands_out, messages_in), name="herd-engine", daemon=daemon
        )
        self._process.start()
        if not daemon:
            multiprocessing.util.Finalize(self, self.close, exitpriority=10)
        commands_out.close()
        messages_in.close()
        self._send_lock = threading.Lock()
        # Process objects are not thread-safe: when the reader and close() join at once, the waitpid that loses
        # the race gets ECHILD and the process counts as alive ever after.
        self._process_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._vocabularies_sent: set[str] = set()  # grammar vocabularies the engine process has (sent in order)
        try:
            status, payload = pickle.loads(self._messages.recv_bytes())
        except EOFError:
            raise RuntimeError(f"the engine process exited at start (code {self._process.exitcode})") from None
        if status == "error":
            self._process.join(timeout=10)
            raise payload
        self.info: CoreInfo = payload
        logger.info("the engine core runs in process %d", self._process.pid)

    def start(self, on_message: OnMessage, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Read the core's messages: on `loop` whenever the pipe is readable (the server: no thread to hand each
        message over, whose wake-up and GIL hand-off cost every streamed token), or on a reader thread."""
        if loop is None:
            self._reader = threading.Thread(
                target=self._read, args=(on_message,), name="herd-engine-reader", daemon=True
            )
            self._reader.start()
        else:
            loop.add_reader(self._messages.fileno(), self._read_ready, loop, on_message)

    def _read_ready(self, loop: asyncio.AbstractEventLoop, on_message: OnMessage) -> None:
        """One message (the loop calls again while more are in the pipe: asking it costs more than another turn).
        The core writes a message whole, so a readable pipe never leaves the loop waiting long."""
        message = self._receive()
        if message is None:
            loop.remove_reader(self._messages.fileno())
            # Off the loop: the exit status can take a moment (joining the process) to be known.
            with contextlib.suppress(RuntimeError):  # the loop is shutting down: nobody is left to tell
                cause = loop.run_in_executor(None, self._exit_cause)
                cause.add_done_callback(lambda done: on_message(CoreMessage(dead=RuntimeError(done.result()))))
            return
        on_message(message)
        if message.dead is not None:
            loop.remove_reader(self._messages.fileno())

    def _read(self, on_message: OnMessage) -> None:
        while True:
            message = self._receive()
            if message is None:
                on_message(CoreMessage(dead=RuntimeError(self._exit_cause())))
                return
            on_message(message)
            if message.dead is not None:
                return

    def _receive(self) -> CoreMessage | None:
        """The next message from the pipe (waiting for it), None once the pipe is closed."""
        try:
            data = self._messages.recv_bytes()
        except (EOFError, OSError):
            return None
        message: CoreMessage = pickle.loads(data)
        message.nbytes = len(data)
        return message

    def _exit_cause(self) -> str:
        with self._process_lock:
            self._process.join(timeout=5)  # the pipe closes a moment before the exit status is known
            code = self._process.exitcode
        if code is not None and code < 0:
            # SIGKILL is also what the kernel's out-of-memory killer sends.
            return f"the engine process was killed by {signal.Signals(-code).name} (out of memory, or killed)"
        return f"the engine process exited (code {code})"

    def _send(self, command: Command) -> None:
        with self._send_lock, contextlib.suppress(OSError):  # a dead process: the reader reports it
            self._commands.send(command)

    def add_requests(self, requests: list[EngineCoreRequest]) -> None:
        # Under the lock: the request that carries a vocabulary must go down the pipe before those that don't.
        with self._send_lock, contextlib.suppress(OSError):
            self._commands.send(("add", [self._without_sent_vocabulary(r) for r in requests]))

    def _without_sent_vocabulary(self, request: EngineCoreRequest) -> EngineCoreRequest:
        """The request without its grammar vocabulary when an earlier request carried it across already."""
        vocabulary = request.grammar_vocabulary
        if vocabulary is None:
            return request
        if vocabulary.key in self._vocabularies_sent:
            return dataclasses.replace(request, grammar_vocabulary=None)
        self._vocabularies_sent.add(vocabulary.key)
        return request

    def abort_requests(self, request_ids: list[str]) -> None:
        self._send(("abort", request_ids))

    def call(self, call_id: int, method: str) -> None:
        self._send(("call", call_id, method))

    @property
    def alive(self) -> bool:
        with self._process_lock:
            return self._process.is_alive()

    @property
    def exitcode(self) -> int | None:
        """The engine process's exit status once it has exited (negative: killed by that signal)."""
        with self._process_lock:
            return self._process.exitcode

    def close(self, timeout: float = 10.0) -> None:
        with self._process_lock:
            if self._process.is_alive():
                self._send(("stop",))
                self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout)


def _call_soon(loop: asyncio.AbstractEventLoop, on_message: OnMessage, message: CoreMessage) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
        loop.call_soon_threadsafe(on_message, message)


def _child_main(config: EngineConfig, log_level: str, commands: Connection, messages: Connection) -> None:
    """The engine process: build the core, say it is ready, then serve until told to stop (or orphaned)."""
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    # Ctrl-C reaches the whole process group: the server drains and then stops this process itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        core = EngineCore(config)
    except Exception as e:  # a bad checkpoint or flag: the parent reports it and exits
        messages.send_bytes(pickle.dumps(("error", e)))
        return
    messages.send_bytes(pickle.dumps(("ready", core.info)))
    # What loading made (modules, imported libraries: ~270k objects on tiny) lives as long as this process. Left in
    # the collector's generations, each full collection walks it all (~140 ms, in whichever step allocated the
    # object that set it off, every few hundred steps at 64 sequences); frozen, the collections skip it.
    gc.collect()
    gc.freeze()
    # The HTTP process shares the cores and wakes for every message: a kernel pool worker that polls for the next
    # step's first call (for up to 2 ms) would keep its core looking busy, and the HTTP process would queue behind
    # the engine's own thread. Sent a message, the workers sleep instead; the next step wakes them (tiny at one
    # stream over HTTP: benchmarks/RESULTS.md). Offline, without an HTTP process, they keep polling.
    rest = config.device.torch_device.type == "cpu"

    # One poll object for the process: Connection.poll() builds a selector each call, tens of microseconds of a
    # decode step that asks before every step whether a command came.
    readable = select.poll()
    readable.register(commands.fileno(), select.POLLIN)

    def next_commands(block: bool) -> list[Command]:
        if not block and not readable.poll(0):
            return []
        try:
            received = [commands.recv()]
            while readable.poll(0):
                received.append(commands.recv())
        except EOFError:  # the parent is gone
            return [("stop",)]
        return received

    def send(message: CoreMessage) -> None:
        if rest:
            cpu_kernels.rest_pool()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the parent is gone: stop at next read
            messages.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))

    run_core_loop(core, next_commands, send)
