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
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache

from receiver.bounded import BoundedMap
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


# Every push asks for its Receiver's prefix; Receivers are few, so each is hashed once.
@lru_cache(maxsize=4096)
def owner_of(receiver: str) -> str:
    """The prefix every mark of one Receiver (`namespace/name`) starts with."""
    return hashlib.sha256(f"owner\0{receiver}".encode()).hexdigest()[:OWNER_DIGITS]


def marks_for(receiver: str, replay_key: str) -> tuple[str, str]:
    """The mark of a one-of-a-kind request, and the mark releases before owner prefixes wrote
    for it (still looked for while such marks may be on objects: one replay window after an
    upgrade). The mark is the same for every replay of the request, so a replay is known by
    the mark already on the objects: the Receiver's prefix, then 48 bits of the request's key
    (plenty among one Receiver's requests within the replay window)."""
    digest = hashlib.sha256(f"{receiver}\0{replay_key}".encode()).hexdigest()
    return owner_of(receiver) + digest[:16 - OWNER_DIGITS], digest[:16]


def mark_for(receiver: str, replay_key: str) -> str:
    return marks_for(receiver, replay_key)[0]


def legacy_mark_for(receiver: str, replay_key: str) -> str:
    return marks_for(receiver, replay_key)[1]


def fresh_mark(receiver: str) -> str:
    """The mark of a request that names nothing one-of-a-kind (no replay protection asked):
    48 random bits after the Receiver's prefix (`os.urandom`, the source `secrets` reads)."""
    return owner_of(receiver) + os.urandom(6).hex()


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
    marks, ats = _entries(value)
    return tuple(Mark(mark, at) for mark, at in zip(marks, ats, strict=True))


# A delivery's state is evaluated on every change of the objects it follows, each evaluation
# reads the marks of every target several times, and a value changes only when an object is
# annotated: parse each value once. Bounded (a busy object's value is tens of kilobytes
# parsed): a value is read in bursts, by every delivery that follows its object, right after
# the patch or watch event that brought it, so recent values are what is asked for. Two
# tuples, of the marks and of their times: a busy object's value holds hundreds of marks, and
# as objects of their own they were most of what a full garbage collection walked (tuples of
# strings and floats it stops tracking), and more memory.
@lru_cache(maxsize=256)
def _entries(value: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    marks: list[str] = []
    ats: list[float] = []
    for entry in value.split()[:MAX_ENTRIES + PER_OWNER]:
        mark, sep, at = entry.partition("@")
        if not sep or len(mark) != 16 or not set(mark) <= _MARK_CHARS:
            continue
        try:
            stamp = float(at)
        except ValueError:
            continue
        if stamp == stamp:  # not NaN
            marks.append(mark)
            ats.append(stamp)
    return tuple(marks), tuple(ats)


def _entries_of(annotations: Mapping[str, str]) -> Iterable[tuple[str, float]]:
    value = annotations.get(DELIVERIES_ANNOTATION)
    if not value:
        return ()
    marks, ats = _entries(value)
    return zip(marks, ats, strict=True)


def of(annotations: Mapping[str, str]) -> tuple[Mark, ...]:
    return parse(annotations.get(DELIVERIES_ANNOTATION))


def has(annotations: Mapping[str, str], mark: str) -> bool:
    value = annotations.get(DELIVERIES_ANNOTATION)
    if not value:
        return False
    if _written_here(value):
        return _find(value, mark) >= 0
    return mark in _marks(value)


def names(value: str | None) -> frozenset[str]:
    """The marks an annotation value holds."""
    return _marks(value) if value else frozenset()


@lru_cache(maxsize=256)
def _marks(value: str) -> frozenset[str]:
    return frozenset(_entries(value)[0])


def newer_than(annotations: Mapping[str, str], at: float, mine: str) -> bool:
    """Has another delivery annotated the object after `at`? (Ours is superseded.)"""
    value = annotations.get(DELIVERIES_ANNOTATION)
    if value and _written_here(value):
        for mark, stamp in _leading(value):  # newest first: stop at the first not newer
            if stamp <= at:
                return False
            if mark != mine:
                return True
        return False
    return any(stamp > at and mark != mine for mark, stamp in _entries_of(annotations))


def added(before: str | None, after: str | None) -> frozenset[str]:
    """The marks the value `after` holds and `before` did not (an object's value changed)."""
    if not after:
        return frozenset()
    if before and _written_here(before) and _written_here(after):
        # `merge` put the new marks in front of a prefix of `before`: only they are read.
        at = _find(after, before[:16])  # where the old value's newest entry is now
        if at >= 0 and before.startswith(after[at:]):
            # New marks are not in the prefix kept; only the entries that left can hold one.
            left = before[len(after) - at:]
            return frozenset(mark for mark, _ in _leading(after[:at].rstrip())
                             if _find(left.lstrip(), mark) < 0)
    return names(after) - names(before)


@dataclass(frozen=True, slots=True)
class Merge:
    value: str  # the annotation's next value
    written: tuple[Mark, ...]  # the new marks it adds
    refused: tuple[Mark, ...]  # new marks left out: their Receiver's share, or the object, is full


# Values `merge` wrote in this process: canonical (`<mark>@<time with three decimals>`, newest
# first, each mark once), so questions about one are answered by scanning its text, never
# parsing it (a busy object's value holds hundreds of marks, and every push asked several
# questions of it and merged it), and the next merge keeps a prefix of it as it is. Kept by
# the string's hash (process-random SipHash, cached on the string), not the value: the values
# of thousands of busy objects are megabytes. A hand-edited value passes for one of these only
# by a 64-bit collision its editor cannot aim at.
_WRITTEN: BoundedMap[tuple[int, int], None] = BoundedMap(16384)


def _remember(value: str) -> None:
    _WRITTEN[(hash(value), len(value))] = None


def _written_here(value: str) -> bool:
    return (hash(value), len(value)) in _WRITTEN


def _find(value: str, mark: str) -> int:
    """Where the entry of `mark` starts in a canonical value, or -1."""
    if len(mark) != 16 or not value:
        return -1
    if value.startswith(mark + "@"):
        return 0
    at = value.find(" " + mark + "@")
    return at + 1 if at >= 0 else -1


def _leading(value: str) -> Iterator[tuple[str, float]]:
    """The entries of a canonical value, read from the front only as far as asked."""
    start = 0
    while start < len(value):
        end = value.find(" ", start)
        end = len(value) if end < 0 else end
        yield value[start:start + 16], float(value[start + 17:end])
        start = end + 1


def _unexpired(value: str, now: float, keep_seconds: float) -> str:
    """A canonical value without its entries past `keep_seconds` (the oldest, at its end)."""
    end = len(value)
    while end > 0:
        start = value.rfind(" ", 0, end) + 1
        if now - float(value[start + 17:end]) <= keep_seconds:
            break
        end = max(start - 1, 0)
    return value[:end]


def merge(current: Mapping[str, str], new: Iterable[Mark], now: float,
          keep_seconds: float) -> Merge:
    """The annotation's next value: every current mark still within `keep_seconds` (never
    evicted), plus the new ones that fit (`PER_OWNER`, `MAX_ENTRIES`), newest first."""
    value = current.get(DELIVERIES_ANNOTATION) or ""
    ordered = sorted(new, key=lambda m: -m.at)
    if not value or _written_here(value):
        quick = _merge_written(value, ordered, now, keep_seconds)
        if quick is not None:
            return quick
    merged = _merge_any(current, ordered, now, keep_seconds)
    _remember(merged.value)
    return merged


def _merge_written(value: str, ordered: list[Mark], now: float,
                   keep_seconds: float) -> Merge | None:
    """`merge` of a value written here, newer marks only, without reading the marks the value
    holds again (a busy object's hundreds were, for every patch): the marks kept are a prefix
    of the value (newest first, so those past the window are at its end) and stay as they are
    written; the new ones go in front. None when a new mark is older than the newest kept (it
    belongs further in: `_merge_any`)."""
    kept_text = _unexpired(value, now, keep_seconds) if value else ""
    if kept_text and ordered and ordered[-1].at < next(_leading(kept_text))[1]:
        return None
    kept = kept_text.count(" ") + 1 if kept_text else 0
    seen: set[str] = set()
    shares: dict[str, int] = {}
    written: list[Mark] = []
    refused: list[Mark] = []
    for entry in ordered:
        if entry.mark in seen or _find(kept_text, entry.mark) >= 0:
            continue
        seen.add(entry.mark)
        who = owner(entry.mark)
        share = shares.get(who)
        if share is None:
            # Each entry starts its own word: a Receiver's share is its prefix's word starts.
            share = shares[who] = (kept_text.count(" " + who)
                                   + kept_text.startswith(who)) if kept_text else 0
        if share >= PER_OWNER or kept + len(written) >= MAX_ENTRIES:
            refused.append(entry)
            continue
        shares[who] = share + 1
        written.append(entry)
    texts = [f"{m.mark}@{m.at:.3f}" for m in written]
    out = " ".join([*texts, kept_text] if kept_text else texts)
    _remember(out)
    return Merge(out, tuple(written), tuple(refused))


def _merge_any(current: Mapping[str, str], ordered: list[Mark], now: float,
               keep_seconds: float) -> Merge:
    """`merge` of any value, hand-edited ones included: every entry read and written again."""
    kept: list[tuple[str, float]] = []
    seen: set[str] = set()
    for mark, at in _entries_of(current):
        if mark not in seen and now - at <= keep_seconds:
            seen.add(mark)
            kept.append((mark, at))
    shares = Counter(owner(mark) for mark, _ in kept)
    written: list[Mark] = []
    refused: list[Mark] = []
    for entry in ordered:
        if entry.mark in seen:
            continue
        seen.add(entry.mark)
        if shares[owner(entry.mark)] >= PER_OWNER or len(kept) + len(written) >= MAX_ENTRIES:
            refused.append(entry)
            continue
        shares[owner(entry.mark)] += 1
        written.append(entry)
    out = sorted([(m.mark, m.at) for m in written] + kept, key=lambda pair: -pair[1])
    return Merge(" ".join(f"{mark}@{at:.3f}" for mark, at in out), tuple(written),
                 tuple(refused))


def refusal(keep_seconds: float) -> str:
    """Why a mark was not written (the failed delivery's message)."""
    return (f"not annotated: this Receiver already holds {PER_OWNER} delivery marks on the "
            f"object (or the object {MAX_ENTRIES}) younger than {keep_seconds:g}s, and none is "
            "evicted early because each keeps a replay refused; retry later or lower "
            "delivery_dedupe_seconds")
