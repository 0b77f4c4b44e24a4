"""Small HTTP helpers shared by the routes: JSON errors and a capped body read."""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

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
