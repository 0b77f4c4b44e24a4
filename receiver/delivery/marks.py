"""The bridge's own annotation: which deliveries annotated an object, and when. Pure.

Written in the same JSON merge patch as `reconcile.fluxcd.io/requestedAt`, so it costs no extra
API write. Every replica sees it through its watch cache, which makes the cluster the shared
record of what was annotated: a delivery's `annotated` state and the refusal of a replayed push
(whose mark is already there) need no replica's memory.

Value: space-separated `<mark>@<unix seconds>` entries, newest first.

Retention is what makes a refused replay stay refused: a mark younger than the replay window
(`keep_seconds`) is never evicted, however many other pushes arrive. The annotation is bounded
instead by refusing: each Receiver (the first four hex digits of its marks, `owner`) may hold
`PER_OWNER` marks younger than the window on one object, and the object `MAX_ENTRIES` in all;
a new mark past either bound is not written and its delivery fails with `refusal`'s message.
So one Receiver's flood fills only its own share, never evicts a victim's marks, and never
blocks another Receiver's pushes before the object's hard bound.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache

from receiver.flux.objects import BRIDGE_PREFIX
from receiver.signatures import TIMESTAMP_TOLERANCE_SECONDS

DELIVERIES_ANNOTATION = BRIDGE_PREFIX + "deliveries"
# ~33 bytes an entry: 512 marks of one Receiver are ~16 KiB, the whole value ~64 KiB at most,
# well under the API server's 256 KiB for all of an object's annotations.
PER_OWNER = 512
MAX_ENTRIES = 2048
OWNER_DIGITS = 4
_MARK_CHARS = frozenset("0123456789abcdef")


def replay_window(dedupe_seconds: float) -> float:
    """How long a mark must stay on an object: as long as any repeat we promise to refuse can
    arrive, a Gitea redelivery (`delivery_dedupe_seconds`) or a one-time signature (valid for
    its timestamp tolerance either way)."""
    return max(dedupe_seconds, TIMESTAMP_TOLERANCE_SECONDS * 2)


def owner_of(receiver: str) -> str:
    """The prefix every mark of one Receiver (`namespace/name`) starts with."""
    return hashlib.sha256(f"owner\0{receiver}".encode()).hexdigest()[:OWNER_DIGITS]


def mark_for(receiver: str, replay_key: str) -> str:
    """The mark of a one-of-a-kind request: the same for every replay of it, so a replay is known
    by the mark already on the objects. The Receiver's prefix, then 48 bits of the request's
    key (plenty among one Receiver's requests within the replay window)."""
    digest = hashlib.sha256(f"{receiver}\0{replay_key}".encode()).hexdigest()
    return owner_of(receiver) + digest[:16 - OWNER_DIGITS]


def legacy_mark_for(receiver: str, replay_key: str) -> str:
    """The mark releases before owner prefixes wrote for the same request: still looked for
    while such marks may be on objects (one replay window after an upgrade)."""
    return hashlib.sha256(f"{receiver}\0{replay_key}".encode()).hexdigest()[:16]


def fresh_mark(receiver: str) -> str:
    """The mark of a request that names nothing one-of-a-kind (no replay protection asked)."""
    return owner_of(receiver) + secrets.token_hex(8)[:16 - OWNER_DIGITS]


def owner(mark: str) -> str:
    return mark[:OWNER_DIGITS]


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
    for entry in value.split()[:MAX_ENTRIES + PER_OWNER]:
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


@dataclass(frozen=True, slots=True)
class Merge:
    value: str  # the annotation's next value
    written: tuple[Mark, ...]  # the new marks it adds
    refused: tuple[Mark, ...]  # new marks left out: their Receiver's share, or the object, is full


def merge(current: Mapping[str, str], new: Iterable[Mark], now: float,
          keep_seconds: float) -> Merge:
    """The annotation's next value: every current mark still within `keep_seconds` (never
    evicted), plus the new ones that fit (`PER_OWNER`, `MAX_ENTRIES`), newest first."""
    kept: list[Mark] = []
    seen: set[str] = set()
    for entry in of(current):
        if entry.mark not in seen and now - entry.at <= keep_seconds:
            seen.add(entry.mark)
            kept.append(entry)
    shares = Counter(owner(m.mark) for m in kept)
    written: list[Mark] = []
    refused: list[Mark] = []
    for entry in sorted(new, key=lambda m: -m.at):
        if entry.mark in seen:
            continue
        seen.add(entry.mark)
        if shares[owner(entry.mark)] >= PER_OWNER or len(kept) + len(written) >= MAX_ENTRIES:
            refused.append(entry)
            continue
        shares[owner(entry.mark)] += 1
        written.append(entry)
    out = sorted(written + kept, key=lambda m: -m.at)
    return Merge(" ".join(f"{m.mark}@{m.at:.3f}" for m in out), tuple(written), tuple(refused))


def refusal(keep_seconds: float) -> str:
    """Why a mark was not written (the failed delivery's message)."""
    return (f"not annotated: this Receiver already holds {PER_OWNER} delivery marks on the "
            f"object (or the object {MAX_ENTRIES}) younger than {keep_seconds:g}s, and none is "
            "evicted early because each keeps a replay refused; retry later or lower "
            "delivery_dedupe_seconds")
