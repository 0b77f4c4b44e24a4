"""Structured JSON logs. Every line carries the delivery id of the request it belongs to.

Nothing here redacts: callers never pass tokens, secrets or signatures to a logger, and a test
reads every captured line to prove it. Every text field is cut to `MAX_FIELD_CHARS`, so a
request's ref, path or message cannot turn one line into megabytes.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from contextvars import ContextVar
from typing import Any

delivery_id: ContextVar[str] = ContextVar("delivery_id", default="")

# uvicorn adds an ANSI-coloured copy of each message: noise in JSON.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"color_message"}
MAX_FIELD_CHARS = 512
MAX_TRACEBACK_CHARS = 8192


def clip(value: Any, limit: int = MAX_FIELD_CHARS) -> Any:
    """A log field of bounded size: a string longer than `limit` is cut to it, saying how much
    was left out; a list or mapping whose JSON is longer becomes that JSON, cut."""
    if isinstance(value, bool | int | float | None):
        return value
    if not isinstance(value, str):
        text = json.dumps(value, default=str)
        if len(text) <= limit:
            return value
        value = text
    if len(value) > limit:
        return f"{value[:limit]}...(+{len(value) - limit} chars)"
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": clip(record.getMessage(), 4 * MAX_FIELD_CHARS),
        }
        current = getattr(record, "delivery", None) or delivery_id.get()
        if current:
            line["delivery"] = clip(current)
        for key, value in vars(record).items():
            if key not in _RESERVED and key not in line and key != "delivery":
                line[key] = clip(value)
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = clip(f"{record.exc_info[0].__name__}: {record.exc_info[1]}")
            # An unexpected error (log.exception): where it happened, to fix it. The stack only:
            # the exception's text is `error`, already cut.
            stack = "".join(traceback.format_tb(record.exc_info[2]))
            if stack:
                line["traceback"] = clip(stack, MAX_TRACEBACK_CHARS)
        return json.dumps(line, default=str)


class UvicornLifecycle(logging.Filter):
    """uvicorn logs its lifecycle ("Started server process", "Shutting down") on the logger
    `uvicorn.error`; below ERROR those lines say `uvicorn`, so that nothing routine reads as an
    error to someone grepping the logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error" and record.levelno < logging.ERROR:
            record.name = "uvicorn"
        return True


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(UvicornLifecycle())
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
    # httpx logs every Gitea request at info: the latency metric and our own lines say enough.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
