"""Times as Kubernetes, Flux and Gitea write them (RFC 3339), read one way. Pure."""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import takewhile


def parse_rfc3339(value: object) -> datetime | None:
    """An RFC 3339 time, or None if absent or unreadable.

    Any sub-second precision (Flux writes nanoseconds; Python reads at most microseconds, so
    the rest is cut), `Z` or an offset (none means UTC), and anything after a space ignored
    (`flux reconcile` may append text to `requestedAt`).
    """
    if not isinstance(value, str):
        return None
    text = value.strip().split(" ", 1)[0]
    if not text:
        return None
    if text[-1] in "Zz":
        text = text[:-1] + "+00:00"
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(takewhile(str.isdigit, rest))
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits):]}"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def epoch_seconds(value: object) -> float | None:
    """`parse_rfc3339` as Unix seconds."""
    moment = parse_rfc3339(value)
    return moment.timestamp() if moment is not None else None
