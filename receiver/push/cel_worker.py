"""The process that evaluates `spec.resourceFilter`s: `python -m receiver.push.cel_worker <bytes>`.

A filter is a Receiver author's program run over a body the pusher chooses, and the CEL runtime
has no cost budget of its own (only an iteration budget for comprehensions): a chain of
`replace` builds 10^8 characters, and converting a 3 MiB body into CEL values takes 0.4 s.
So filters run here, in a process of their own, which `cel_sandbox` gives a time budget and this
process a memory budget (`RLIMIT_AS`, the argument, above what it uses once started): a filter
that runs away fails its own request, never the bridge's event loop or memory.

Frames on stdin/stdout are a 4-byte big-endian length and that many bytes. Once started it
writes `{"ready": true}`; then, for each request, it reads a JSON header (`expression`,
`content_type`, `resources`) and the raw body, and answers one JSON frame: `{"verdicts": [...]}`
(True, False or why the resource could not be evaluated), `{"bad_json": message}`,
`{"invalid": message}` or `{"memory": true}` (after which it exits). An answer with
`"exiting": true` is its last: the worker had grown past `_RESTART_ABOVE` (the allocator keeps
what a large body needed), so it ends and the next request starts a fresh one.
"""

from __future__ import annotations

import functools
import json
import resource
import struct
import sys
from typing import Any, BinaryIO

from receiver.push.cel_filter import CompiledFilter, RequestNotJSON, compile_filter, request_document

_LENGTH = struct.Struct(">I")
_RESTART_ABOVE = 96 * 1024  # KiB of peak resident memory


def _read(stream: BinaryIO) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (size,) = _LENGTH.unpack(head)
    data = stream.read(size)
    return data if len(data) == size else None


def _write(stream: BinaryIO, doc: dict[str, Any]) -> None:
    data = json.dumps(doc).encode()
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


@functools.lru_cache(maxsize=256)
def _compiled(expression: str) -> CompiledFilter:
    return compile_filter(expression)


def answer(header: dict[str, Any], body: bytes) -> dict[str, Any]:
    """One request's answer (pure but for the compile cache)."""
    try:
        compiled = _compiled(str(header["expression"]))
    except ValueError as exc:  # InvalidFilter: the caller compiled it already, so rare
        return {"invalid": str(exc)}
    try:
        req = request_document(str(header.get("content_type", "")), body)
    except RequestNotJSON as exc:
        return {"bad_json": str(exc)}
    return {"verdicts": compiled.evaluate(list(header["resources"]), req)}


def _limit_memory(extra: int) -> None:
    """Address space: what the process maps once started (interpreter, CEL runtime), plus
    `extra`. Linux only; elsewhere the time budget alone applies."""
    try:
        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return
    resource.setrlimit(resource.RLIMIT_AS, (size + extra, size + extra))


def main(argv: list[str]) -> int:
    _compiled("true").evaluate([{}], {})  # load the whole runtime before measuring the budget
    _limit_memory(int(argv[0]))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    _write(stdout, {"ready": True})
    while True:
        raw = _read(stdin)
        body = _read(stdin) if raw is not None else None
        if raw is None or body is None:
            return 0
        try:
            reply = answer(json.loads(raw), body)
        except MemoryError:
            reply = None
        if reply is None:
            _write(stdout, {"memory": True})
            return 1
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > _RESTART_ABOVE
        _write(stdout, {**reply, "exiting": True} if grown else reply)
        if grown:
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
