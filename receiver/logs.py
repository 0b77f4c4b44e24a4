"""Structured JSON logs. Every line carries the delivery id of the request it belongs to.

Nothing here redacts: callers never pass tokens, secrets or signatures to a logger, and a test
reads every captured line to prove it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

delivery_id: ContextVar[str] = ContextVar("delivery_id", default="")

# uvicorn adds an ANSI-coloured copy of each message: noise in JSON.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        current = getattr(record, "delivery", None) or delivery_id.get()
        if current:
            line["delivery"] = current
        for key, value in vars(record).items():
            if key not in _RESERVED and key not in line and key != "delivery":
                line[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(line, default=str)


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Access logs would repeat the hook digest (a token-derived path) on every request.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
