"""Stopping well: a graceful drain on SIGTERM / SIGINT, and a loud, quick exit when the engine dies.

On the first SIGTERM or SIGINT the server drains: every new request, `/health` included, gets a 503 (a
load balancer stops sending work), while the requests in flight run to their end, for at most
`--graceful-shutdown-timeout` seconds; then uvicorn stops and the process exits 0. A second signal stops
at once. If the engine dies (its process killed, out of memory, a CUDA error), the requests in flight
fail with a 500 naming the cause, and `herd serve` stops with exit status 1, so a supervisor restarts it
(a server embedded in a program, `exit_on_engine_death=False`, keeps answering 503 naming the cause).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from herd.frontend.async_engine import AsyncEngine
from herd.server.errors import error_response

logger = logging.getLogger(__name__)

# Once draining is over (or the engine died), how long uvicorn waits for the last responses to be written.
CLOSE_TIMEOUT_S = 3


@dataclass
class ShutdownState:
    draining: bool = False
    reason: str = "the server is shutting down"
    deadline: float = 0.0  # time.monotonic() by which the drain ends, finished or not
    exit_code: int = 0
    # HTTP requests whose response is not fully sent: a stream outlives its sequence in the engine by the
    # time its last events take to reach the client, and the drain must wait for that too.
    in_flight: int = 0


class DrainMiddleware:
    """503 for every request that arrives while the server drains or after the engine died; counts the
    requests in flight, so that the drain ends only once every response is sent."""

    def __init__(self, app: ASGIApp, state: ShutdownState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.state.draining:
            response = error_response(503, self.state.reason, code="shutting_down")
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


class GracefulServer(uvicorn.Server):
    """uvicorn's server, with the drain above in front of its own shutdown."""

    def __init__(
        self,
        config: uvicorn.Config,
        engine: AsyncEngine,
        state: ShutdownState,
        timeout_s: float,
        exit_on_engine_death: bool = False,
    ) -> None:
        super().__init__(config)
        self.engine = engine
        self.state = state
        self.timeout_s = timeout_s
        # The command line stops (a supervisor restarts it); a server embedded in a program keeps answering
        # 503 with the cause, and its owner decides.
        if exit_on_engine_death:
            engine.on_dead = self.engine_died

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining:  # a second signal: stop now (uvicorn's own handling)
            super().handle_exit(sig, frame)
            return
        # Not recorded as captured: uvicorn would raise it again after stopping, and SIGTERM would then
        # end the process with -15 instead of 0.
        logger.info(
            "%s: draining, new requests get 503; waiting up to %g s for %d running sequences",
            signal.Signals(sig).name,
            self.timeout_s,
            self.engine.outputs.num_sequences,
        )
        self.state.draining = True
        self.state.deadline = time.monotonic() + self.timeout_s

    def engine_died(self, cause: BaseException) -> None:
        logger.error("the engine died (%s): stopping the server with exit status 1", cause)
        self.state.exit_code = 1
        self.state.reason = f"the server is stopping: the engine died ({cause})"
        self.state.draining = True
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if not self.state.draining:
            return False
        if self.engine.outputs.num_sequences == 0 and self.state.in_flight == 0:
            logger.info("drained: every request in flight finished and its response was sent")
            return True
        if time.monotonic() >= self.state.deadline:
            logger.warning(
                "--graceful-shutdown-timeout reached with %d sequences unfinished, %d responses unsent: stopping",
                self.engine.outputs.num_sequences,
                self.state.in_flight,
            )
            return True
        return False
