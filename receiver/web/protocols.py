"""uvicorn's HTTP protocols, with an idle connection closed from the start.

uvicorn arms its keep-alive timer only once a response is complete, so a client that connects
and sends nothing holds its connection (and a `limit_concurrency` slot) for as long as it likes.
These protocols arm the same timer when the connection is made: nothing within
`timeout_keep_alive` seconds, and it is closed. The first byte disarms it, as it does between
requests. (A client that sends its head a byte at a time still needs a proxy's header timeout.)
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class IdleClosingHttpTools(HttpToolsProtocol):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)


class IdleClosingH11(H11Protocol):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler)


PROTOCOLS: dict[str, type[asyncio.Protocol]] = {
    "httptools": IdleClosingHttpTools, "h11": IdleClosingH11}
