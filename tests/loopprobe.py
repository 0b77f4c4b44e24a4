"""How long the bridge's event loop is blocked: a `/healthz` probe running beside the requests
under test. In process the app shares the test's loop, so a probe answered late means a handler
held the loop (a CPU-bound parse, a regular expression, a filter).

What is recorded is the time from one answered probe to the next: a request served in process
may never suspend, so a block shows between two probes rather than inside one. The requests
under test are sent one at a time with `await probe.next()` after each, so every gap holds at
most one of them, as it would on a server taking requests from many clients.

The gap is measured in CPU time of the loop's thread, not wall time: the blocks looked for are
CPU work on the loop (a parse, a regular expression, a filter), and on a busy machine wall time
also counts the time other processes held the cores, which no handler spent."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx


@dataclass
class Probe:
    latencies: list[float] = field(default_factory=list)
    answered: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def worst(self) -> float:
        return max(self.latencies, default=0.0)

    async def next(self) -> None:
        """Return once one more probe has been answered."""
        async with self.answered:
            seen = len(self.latencies)
            await self.answered.wait_for(lambda: len(self.latencies) > seen)


@contextlib.asynccontextmanager
async def probing(client: httpx.AsyncClient) -> AsyncIterator[Probe]:
    """Probe `/healthz` back to back until the block ends."""
    probe = Probe()
    stop = asyncio.Event()

    async def run() -> None:
        last = time.thread_time()
        while not stop.is_set():
            reply = await client.get("/healthz")
            assert reply.status_code == 200
            now = time.thread_time()
            async with probe.answered:
                probe.latencies.append(now - last)
                probe.answered.notify_all()
            last = now
            await asyncio.sleep(0)  # one turn of the loop for the requests under test

    task = asyncio.create_task(run())
    await probe.next()
    try:
        yield probe
    finally:
        stop.set()
        await task
