"""`EventRecorder`: Kubernetes Events written off the request path.

`emit` only tells the pure `EventBook` (no I/O, no await), so a request never waits for the
API server and a failed write never changes an answer. One task writes what the book says is
due, when it is due; a write that fails is logged at debug level and counted, never retried
in a loop (the next occurrence is written in its turn). The task is woken only when an
occurrence makes a write due before its timer: most pushes repeat a series whose patch is
already pending, and cost no wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from receiver.flux.cluster import NotFound
from receiver.flux.event_book import EventBook, EventNote, EventWrite

log = logging.getLogger(__name__)
Writer = Callable[[EventWrite], Awaitable[None]]


class EventRecorder:
    def __init__(self, write: Writer, book: EventBook | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._write = write
        self.book = book if book is not None else EventBook()  # an empty book is falsy
        self._clock = clock
        self._wake = asyncio.Event()
        self._wake_at = float("-inf")  # when the sleeping writer's timer fires (clock time)
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.failed = 0

    def emit(self, note: EventNote) -> None:
        due = self.book.record(note, self._clock())
        if due is not None and due < self._wake_at:
            self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self, flush_seconds: float = 2.0) -> None:
        """Write what is due now (within `flush_seconds`), then stop."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._write_due(), flush_seconds)

    async def _write_due(self) -> None:
        for write in self.book.due(self._clock()):
            try:
                await self._write(write)
                self.written += 1
            except NotFound:
                self.book.lost(write)
                self.failed += 1
            except Exception as exc:  # an Event is a courtesy: never let it break anything
                self.failed += 1
                log.debug("event not written", extra={
                    "reason": write.note.reason, "object": str(write.note.regarding),
                    "error": str(exc)})

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            self._wake_at = float("-inf")  # what is recorded while writing is seen below
            await self._write_due()
            now = self._clock()
            wait = self.book.next_due(now)
            timer = None
            if wait is None:
                self._wake_at = float("inf")
            else:
                wait = max(wait, 0.05)
                self._wake_at = now + wait
                timer = loop.call_later(wait, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()
