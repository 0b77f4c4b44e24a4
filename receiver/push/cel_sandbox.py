"""Runs `spec.resourceFilter`s in their own process, within a time and a memory budget.

The evaluation itself is `cel_filter` (pure), run by `cel_worker` in a child process. This is
the shell around it: one worker, started when a filter is first evaluated, fed one request at a
time. What bounds a filter:

* its input: the request body as received (at most `body_limit_bytes`), parsed by the worker;
* its time: `timeout_seconds` from the moment the request is handed over; past it the worker is
  killed (and started again for the next request) and the request fails with 422;
* its memory: `memory_bytes` of address space above what the worker uses once started; an
  evaluation that needs more fails its request with 422, and the worker is started again;
* the queue: at most `max_waiting` requests wait for the worker; more get 503.

The event loop only writes the request and awaits the answer: a runaway filter never holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from receiver.push.cel_filter import RequestNotJSON

log = logging.getLogger(__name__)
_LENGTH = struct.Struct(">I")
TIMEOUT_SECONDS = 2.0
# The worker counts against the pod's memory limit too (the chart's is 256 Mi).
MEMORY_BYTES = 128 * 1024 * 1024
MAX_WAITING = 32
_START_SECONDS = 30.0  # importing the CEL runtime, on a busy node


class FilterBudgetExceeded(Exception):
    """The filter ran out of time or memory: its request fails (422), nothing is annotated."""


class FilterBusy(Exception):
    """Too many requests wait for the filter evaluator (503)."""


class FilterSandbox:
    def __init__(self, *, timeout_seconds: float = TIMEOUT_SECONDS,
                 memory_bytes: int = MEMORY_BYTES, max_waiting: int = MAX_WAITING) -> None:
        self.timeout = timeout_seconds
        self.memory = memory_bytes
        self.max_waiting = max_waiting
        self._process: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._waiting = 0
        self.restarts = 0  # workers killed or lost (for tests and logs)

    async def evaluate(self, expression: str, resources: Sequence[Mapping[str, Any]],
                       content_type: str, body: bytes) -> list[bool | str]:
        """Each resource's verdict, as `CompiledFilter.evaluate`. Raises RequestNotJSON,
        FilterBudgetExceeded or FilterBusy."""
        if self._waiting >= self.max_waiting:
            raise FilterBusy("too many resourceFilter evaluations waiting")
        self._waiting += 1
        try:
            async with self._lock:
                return await self._evaluate(expression, resources, content_type, body)
        finally:
            self._waiting -= 1

    async def _evaluate(self, expression: str, resources: Sequence[Mapping[str, Any]],
                        content_type: str, body: bytes) -> list[bool | str]:
        process = await self._started()
        assert process.stdin is not None and process.stdout is not None
        header = json.dumps({"expression": expression, "content_type": content_type,
                             "resources": list(resources)}).encode()
        try:
            async with asyncio.timeout(self.timeout):
                process.stdin.write(_LENGTH.pack(len(header)) + header)
                process.stdin.write(_LENGTH.pack(len(body)))
                process.stdin.write(body)
                await process.stdin.drain()
                reply = await _read(process.stdout)
        except TimeoutError:
            await self._discard("time")
            raise FilterBudgetExceeded(
                f"resourceFilter exceeded its time budget ({self.timeout:g} s)") from None
        except (ConnectionError, asyncio.IncompleteReadError):
            reply = None
        if reply is not None and reply.get("exiting"):
            self._process = None
            await process.wait()
        if reply is None or reply.get("memory"):
            await self._discard("memory")
            raise FilterBudgetExceeded(
                f"resourceFilter exceeded its memory budget ({self.memory // 2**20} MiB)")
        if "bad_json" in reply:
            raise RequestNotJSON(str(reply["bad_json"]))
        if "invalid" in reply:
            return [str(reply["invalid"])] * len(resources)
        verdicts = reply.get("verdicts")
        if not isinstance(verdicts, list) or len(verdicts) != len(resources):
            await self._discard("protocol")
            raise FilterBudgetExceeded("resourceFilter evaluator gave no answer")
        return [v if isinstance(v, bool) else str(v)[:200] for v in verdicts]

    async def _started(self) -> asyncio.subprocess.Process:
        process = self._process
        if process is not None and process.returncode is None:
            return process
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "receiver.push.cel_worker", str(self.memory),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        assert process.stdout is not None
        try:
            async with asyncio.timeout(_START_SECONDS):
                ready = await _read(process.stdout)
        except (TimeoutError, asyncio.IncompleteReadError):
            ready = None
        if not (ready or {}).get("ready"):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise FilterBudgetExceeded("resourceFilter evaluator did not start")
        self._process = process
        return process

    async def _discard(self, why: str) -> None:
        """Kill the worker (a runaway keeps running otherwise); the next request starts one."""
        process, self._process = self._process, None
        self.restarts += 1
        log.warning("resourceFilter evaluator stopped", extra={"reason": why})
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            if process.stdin is not None:
                process.stdin.close()
            try:
                async with asyncio.timeout(2.0):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def _read(stream: asyncio.StreamReader) -> dict[str, Any] | None:
    (size,) = _LENGTH.unpack(await stream.readexactly(_LENGTH.size))
    doc = json.loads(await stream.readexactly(size))
    return doc if isinstance(doc, dict) else None
