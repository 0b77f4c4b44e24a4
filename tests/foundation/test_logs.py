"""JSON log lines stay one bounded line whatever a request carried."""

from __future__ import annotations

import json
import logging
import sys

from receiver.logs import (
    MAX_FIELD_CHARS,
    MAX_TRACEBACK_CHARS,
    JsonFormatter,
    UvicornLifecycle,
    configure,
)


def format_record(msg: str, *args: object, exc: BaseException | None = None,
                  **extra: object) -> str:
    record = logging.makeLogRecord({"name": "t", "levelno": logging.INFO, "levelname": "INFO",
                                    "msg": msg, "args": args or None, **extra})
    if exc is not None:
        record.exc_info = (type(exc), exc, None)
    return JsonFormatter().format(record)


def test_long_fields_are_cut_and_say_how_much() -> None:
    ref = "refs/heads/" + "r" * 3_000_000
    line = format_record("push accepted", ref=ref, paths=["p" * 1000] * 3000, count=7,
                         ok=True, receiver="apps/actions")
    assert len(line) < 8 * MAX_FIELD_CHARS
    doc = json.loads(line)
    assert doc["ref"].startswith(ref[:MAX_FIELD_CHARS])
    assert doc["ref"].endswith(f"...(+{len(ref) - MAX_FIELD_CHARS} chars)")
    assert isinstance(doc["paths"], str) and "chars)" in doc["paths"]
    assert (doc["count"], doc["ok"], doc["receiver"]) == (7, True, "apps/actions")


def test_short_structured_fields_keep_their_shape() -> None:
    doc = json.loads(format_record("m", failing=["Kustomization", "GitRepository"]))
    assert doc["failing"] == ["Kustomization", "GitRepository"]


def test_a_long_message_and_exception_are_cut() -> None:
    line = format_record("bad ref %s", "x" * 1_000_000, exc=ValueError("y" * 1_000_000))
    assert len(line) < 8 * MAX_FIELD_CHARS
    doc = json.loads(line)
    assert doc["msg"].startswith("bad ref xxx") and doc["error"].startswith("ValueError: yyy")


def _raise_deep(depth: int) -> None:
    if depth == 0:
        raise RuntimeError("boom")
    _raise_deep(depth - 1)


def test_an_unexpected_error_logs_its_traceback() -> None:
    try:
        _raise_deep(3)
    except RuntimeError:
        record = logging.makeLogRecord({"name": "t", "levelno": logging.ERROR,
                                        "levelname": "ERROR", "msg": "crashed"})
        record.exc_info = sys.exc_info()
    doc = json.loads(JsonFormatter().format(record))
    assert doc["error"] == "RuntimeError: boom"
    assert "_raise_deep" in doc["traceback"] and "test_logs.py" in doc["traceback"]
    assert len(doc["traceback"]) <= MAX_TRACEBACK_CHARS + 40


def test_uvicorn_lifecycle_lines_are_not_error_lines() -> None:
    for level, name in ((logging.INFO, "uvicorn"), (logging.ERROR, "uvicorn.error")):
        record = logging.makeLogRecord({"name": "uvicorn.error", "levelno": level,
                                        "levelname": logging.getLevelName(level),
                                        "msg": "Shutting down"})
        assert UvicornLifecycle().filter(record)
        assert json.loads(JsonFormatter().format(record))["logger"] == name


def test_configure_quiets_httpx() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure("debug")
        assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
        assert any(isinstance(f, UvicornLifecycle) for h in root.handlers for f in h.filters)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
