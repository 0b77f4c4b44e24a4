"""The replica's last seconds: drain first, then uvicorn's graceful shutdown.

At SIGTERM (or SIGINT) the replica starts draining: `/readyz` answers 503, every `?wait` stream
ends with a line that tells its client to ask again, and the listener keeps accepting and
serving for `shutdown.drain_seconds`, so that the endpoints controllers, kube-proxy and
ingress controllers stop sending traffic here before the port closes. Then uvicorn's own
graceful shutdown runs: stop accepting, let requests in progress finish
(`shutdown.in_flight_seconds`), run the lifespan shutdown (which flushes the status queue).

A second signal during the drain ends it at once; one more SIGINT after that forces the exit
(uvicorn's rule). A drained shutdown exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)


class Drain:
    """Whether this replica is draining, and a way to wait until it is."""

    def __init__(self) -> None:
        self._begun = asyncio.Event()
        self._cut_short = asyncio.Event()
        self.reason = ""

    @property
    def draining(self) -> bool:
        return self._begun.is_set()

    def begin(self, reason: str = "draining") -> bool:
        """Start draining; False if it had already started (the first reason stays)."""
        if self._begun.is_set():
            return False
        self.reason = reason
        self._begun.set()
        return True

    async def wait(self) -> None:
        """Return once draining has begun."""
        await self._begun.wait()

    def cut_short(self) -> None:
        self._cut_short.set()

    async def hold(self, seconds: float) -> None:
        """Sleep through the drain period, or until it is cut short."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._cut_short.wait(), timeout=seconds)


class CloseWhileDraining:
    """ASGI middleware: while draining, every response says `Connection: close`, so that
    keep-alive clients (ingress controllers, Gitea) open their next connection elsewhere
    instead of finding this one closed when the listener stops."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.drain.draining:
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain period between the signal and its graceful shutdown."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_seconds: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_seconds = drain_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drainer: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler on the loop's thread: only flags and call_soon_threadsafe.
        # Unlike uvicorn, the signal is not recorded to be raised again after the shutdown.
        loop = self._loop
        if self.should_exit:
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        if self._draining or loop is None or self.drain_seconds <= 0:
            # A second signal during the drain, or no drain at all: shut down now.
            self.should_exit = True
            if loop is not None:
                loop.call_soon_threadsafe(self._stop_draining)
            return
        self._draining = True
        loop.call_soon_threadsafe(self._start_draining, signal.Signals(sig).name)

    def _start_draining(self, name: str) -> None:
        self.drain.begin()
        log.info("draining: not ready, still serving", extra={
            "signal": name, "seconds": self.drain_seconds})
        self._drainer = asyncio.ensure_future(self._drain_then_stop())

    def _stop_draining(self) -> None:
        self.drain.begin()
        self.drain.cut_short()

    async def _drain_then_stop(self) -> None:
        await self.drain.hold(self.drain_seconds)
        log.info("drain over: shutting down")
        self.should_exit = True
