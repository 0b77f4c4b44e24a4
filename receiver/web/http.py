"""Small HTTP helpers shared by the routes: JSON errors and a capped body read."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UNAUTHORIZED = {"error": "unauthorized"}
log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def declared_too_large(request: Request, limit: int) -> bool:
    """The Content-Length check, done before a single body byte is read."""
    declared = request.headers.get("content-length")
    if declared is None:
        return False
    try:
        return int(declared) > limit
    except ValueError:
        return True


async def read_capped(request: Request, limit: int) -> bytes:
    """Read the body, stopping as soon as it passes `limit` (chunked bodies have no length)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def client_disconnected(request: Request, exc: Exception) -> Response:
    """Exception handler for `ClientDisconnect`: the client left while its body was read.

    Not a server error: one info line, and nothing reaches the server's own error log (a
    handler for `Exception` would log it, and Starlette would then re-raise it to uvicorn).
    The answer goes nowhere; it only ends the request."""
    assert isinstance(exc, ClientDisconnect)
    log.info("client disconnected before its body was read",
             extra={"method": request.method, "route": request.url.path.split("/", 2)[1]})
    return error(400, "client disconnected")


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
