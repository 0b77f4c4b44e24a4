"""Small HTTP helpers shared by the routes: JSON errors and a capped body read."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from receiver.signatures import Signed

UNAUTHORIZED = {"error": "unauthorized"}
# Bodies from this size on are verified on a thread of their own (an HMAC of 3 MiB or a form's
# decoding takes 5-20 ms: a flood of them would hold the event loop for all of it). One thread:
# such a flood queues there, not on the loop nor in the default executor (which sends patches
# and reads Secrets).
OFF_LOOP_BYTES = 64 * 1024
VERIFIER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gfb-verify")
log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def header_map(scope: Scope) -> dict[str, str]:
    """A request's headers as a plain dict: names lower-case, the first of a repeated header
    (as Starlette's `Headers` answers). Built once, read a dozen times by a hook request;
    each lookup in `Headers` scans the whole list."""
    found: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1").lower()
        if key not in found:
            found[key] = value.decode("latin-1")
    return found


def declared_too_large(headers: Mapping[str, str], limit: int) -> bool:
    """The Content-Length check, done before a single body byte is read."""
    declared = headers.get("content-length")
    if declared is None:
        return False
    try:
        return int(declared) > limit
    except ValueError:
        return True


async def read_capped(request: Request, limit: int) -> bytes:
    """Read the body whole, stopping as soon as it passes `limit` (for a route that needs it
    whole before any signature: see `read_parts` for one that checks a signature first)."""
    return whole_body(await read_parts(request, limit))


async def read_parts(request: Request, limit: int) -> Signed:
    """Read the body, stopping as soon as it passes `limit` (chunked bodies have no length):
    the bytes of a small one; a large one (from OFF_LOOP_BYTES) as the chunks it came in. Its
    signature is checked chunk by chunk off the loop (`signatures.hmac_hex`), and it is joined
    only once that holds: a 3 MiB join is fresh pages and a copy (1-2 ms of the loop each), for
    a body that is nearly always a stranger's, refused next."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        if chunk:
            chunks.append(chunk)
    return b"".join(chunks) if size < OFF_LOOP_BYTES else tuple(chunks)


def whole_body(body: Signed) -> bytes:
    return body if isinstance(body, bytes) else b"".join(body)


def media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def client_disconnected(request: Request, exc: Exception) -> Response:
    """Exception handler for `ClientDisconnect`: the client left while its body was read.

    Not a server error: one info line, and nothing reaches the server's own error log (a
    handler for `Exception` would log it, and Starlette would then re-raise it to uvicorn).
    The answer goes nowhere; it only ends the request."""
    assert isinstance(exc, ClientDisconnect)
    log.info("client disconnected before its body was read",
             extra={"method": request.method, "route": request.url.path.split("/", 2)[1]})
    return error(400, "client disconnected")


# What a request's head may hold, checked before any route reads a header. Gitea sends about
# fifteen headers; a proxy adds a few. uvicorn's default parser (httptools) bounds neither.
MAX_HEADERS = 100
MAX_HEADER_BYTES = 64 * 1024
# The request target (path and query): a delivery id is at most 6,000 characters.
MAX_TARGET_BYTES = 16 * 1024


class HeadLimit:
    """ASGI middleware: a request with more than MAX_HEADERS headers or MAX_HEADER_BYTES of
    them is answered 431, one whose path and query pass MAX_TARGET_BYTES 414, before anything
    else looks at it (the head is already read: this bounds what the app does with it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            status = 0
            if len(headers) > MAX_HEADERS or sum(
                    len(k) + len(v) for k, v in headers) > MAX_HEADER_BYTES:
                status, message = 431, "request headers too large"
            elif len(scope.get("raw_path") or b"") + len(scope["query_string"]) > MAX_TARGET_BYTES:
                status, message = 414, "request target too long"
            if status:
                reply = JSONResponse({"error": message}, status_code=status,
                                     headers={"Connection": "close"})
                await reply(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Unhandled:
    """ASGI middleware: an exception no route handled is logged once, as its type and where it
    was raised (file, line and function of each frame), never its message or any value (both
    may hold what the request sent); the client gets 500 `{"error":"internal error"}` if no
    answer had begun. Not raised again: Starlette and uvicorn would each log it once more, with
    its message and traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:  # the one place every request error ends
            log.error("unhandled error", extra={"error": type(exc).__name__,
                                                "where": where_raised(exc)})
            if not started:
                await error(500, "internal error")(scope, receive, send)


def where_raised(exc: BaseException) -> str:
    """`file:line function` of each frame of the traceback, innermost last; no source, no
    values."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} {code.co_name}")
        tb = tb.tb_next
    return " < ".join(reversed(frames[-12:]))


class BodyTimeout(Exception):
    """The request body did not arrive within the deadline."""


class BodyDeadline:
    """ASGI middleware: the request body must arrive whole within `seconds` of the first read.

    uvicorn has no read timeout, so without this a client sending a byte every few seconds holds
    its connection (and a `limit_concurrency` slot) for as long as it likes. Once the body is
    complete, `receive` passes through untouched (a streamed reply waits on it for a disconnect,
    for as long as the wait lasts). The route sees `BodyTimeout`, answered 408 by `body_timeout`.
    """

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.seconds <= 0:
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        complete = False

        async def timed_receive() -> Message:
            nonlocal deadline, complete
            if complete:
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.seconds
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                complete = True
            return message

        await self.app(scope, timed_receive, send)


async def body_timeout(request: Request, exc: Exception) -> Response:
    """Exception handler for `BodyTimeout`: 408, and the connection is not kept."""
    log.info("request body too slow", extra={
        "method": request.method, "route": request.url.path.split("/", 2)[1]})
    return JSONResponse({"error": "request body not received in time"}, status_code=408,
                        headers={"Connection": "close"})
