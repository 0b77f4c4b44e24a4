"""The bridge's own annotation: which deliveries annotated an object, and when. Pure.

Written in the same JSON merge patch as `reconcile.fluxcd.io/requestedAt`, so it costs no extra
API write. Every replica sees it through its watch cache, which makes the cluster the shared
record of what was annotated: a delivery's `annotated` state and the refusal of a replayed push
(whose mark is already there) need no replica's memory.

Value: space-separated `<mark>@<unix seconds>` entries, newest first, bounded in count and age
so the annotation stays small on a busy object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from receiver.flux.objects import BRIDGE_PREFIX

DELIVERIES_ANNOTATION = BRIDGE_PREFIX + "deliveries"
MAX_ENTRIES = 32
_MARK_CHARS = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class Mark:
    mark: str
    at: float  # unix seconds


def parse(value: str | None) -> tuple[Mark, ...]:
    """Entries of the annotation; malformed ones (someone edited it by hand) are ignored."""
    if not value:
        return ()
    return _parse(value)


# A delivery's state is evaluated on every change of the objects it follows, each evaluation
# reads the marks of every target several times, and a value changes only when an object is
# annotated: parse each value once. Bounded: the objects deliveries in flight follow.
@lru_cache(maxsize=1024)
def _parse(value: str) -> tuple[Mark, ...]:
    found: list[Mark] = []
    for entry in value.split()[:MAX_ENTRIES * 2]:
        mark, sep, at = entry.partition("@")
        if not sep or len(mark) != 16 or not set(mark) <= _MARK_CHARS:
            continue
        try:
            stamp = float(at)
        except ValueError:
            continue
        if stamp == stamp:  # not NaN
            found.append(Mark(mark, stamp))
    return tuple(found)


def of(annotations: Mapping[str, str]) -> tuple[Mark, ...]:
    return parse(annotations.get(DELIVERIES_ANNOTATION))


def has(annotations: Mapping[str, str], mark: str) -> bool:
    value = annotations.get(DELIVERIES_ANNOTATION)
    return bool(value) and mark in _marks(value)


@lru_cache(maxsize=1024)
def _marks(value: str) -> frozenset[str]:
    return frozenset(m.mark for m in _parse(value))


def newer_than(annotations: Mapping[str, str], at: float, mine: str) -> bool:
    """Has another delivery annotated the object after `at`? (Ours is superseded.)"""
    return any(m.at > at and m.mark != mine for m in of(annotations))


def merged(current: Mapping[str, str], new: Iterable[Mark], now: float, keep_seconds: float) -> str:
    """The annotation's next value: the new marks first, then the current ones still within
    `keep_seconds`, without repeats, at most `MAX_ENTRIES`."""
    out: list[Mark] = []
    seen: set[str] = set()
    for entry in sorted(new, key=lambda m: -m.at):
        if entry.mark not in seen:
            seen.add(entry.mark)
            out.append(entry)
    for entry in of(current):
        if entry.mark not in seen and now - entry.at <= keep_seconds:
            seen.add(entry.mark)
            out.append(entry)
    return " ".join(f"{m.mark}@{m.at:.3f}" for m in out[:MAX_ENTRIES])
