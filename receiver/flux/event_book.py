"""Which Kubernetes Events to write, and when: aggregation and a budget per object. Pure.

The bridge says on the objects themselves what it did and what it could not do (a push accepted
with its targets, a push that matched nothing, a token it cannot use), so `kubectl describe
receiver` and `kubectl get events` show it as they show Flux's own controllers' events: core v1
Events with a reason, type Normal or Warning, and a count.

A flood must not become a flood of API writes. Events that say the same thing (same object,
type and reason) are one series: the first is created at once, repeats only raise its count
and are written as one patch at most every `patch_interval` seconds. Each object also has a
token bucket (`burst`, one token back every `refill_seconds`) that every create and patch
spends: however many reasons and series a flood produces, an object costs the API server at
most `burst` writes and then one per `refill_seconds`. A series whose last write is older than
`series_window` starts over with a new Event (the API server forgets Events after an hour).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Literal

from receiver.flux.objects import ObjectKey

EventType = Literal["Normal", "Warning"]
MAX_NOTE = 1024  # the API server's limit on an Event's message is larger; a note stays short


@dataclass(frozen=True, slots=True)
class EventNote:
    """One thing to say about one object."""

    regarding: ObjectKey
    api_version: str
    type: EventType
    reason: str  # CamelCase, as Flux's controllers write them
    message: str
    uid: str = ""

    @property
    def series_key(self) -> tuple[ObjectKey, str, str]:
        return (self.regarding, self.type, self.reason)


@dataclass(frozen=True, slots=True)
class EventWrite:
    """A create (a new series) or a patch (its count, last time and latest message)."""

    op: Literal["create", "patch"]
    name: str  # the Event's metadata.name, in the regarding object's namespace
    note: EventNote
    count: int
    first_seen: float  # unix seconds
    last_seen: float


@dataclass(slots=True, eq=False)
class _Series:
    key: tuple[ObjectKey, str, str]
    name: str
    note: EventNote  # the latest
    first_seen: float
    last_seen: float
    count: int
    written_count: int = 0  # what the API server has (0: not created yet)
    written_at: float = float("-inf")
    due_at: float | None = None  # when its pending write is next tried (None: nothing pending)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class EventBook:
    """The pending Events of the whole process. `record` never does I/O; a writer asks
    `due(now)` for the writes to make.

    Every operation costs what it touches, not what the book holds: a busy fleet keeps thousands
    of series (one per source a push annotates), and the writer is woken by every push. Pending
    writes wait in a heap by the time they are due; series and buckets are kept oldest first,
    so forgetting the idle ones reads only those."""

    def __init__(self, *, patch_interval: float = 30.0, series_window: float = 600.0,
                 burst: int = 10, refill_seconds: float = 60.0, max_series: int = 4096) -> None:
        self.patch_interval = patch_interval
        self.series_window = series_window
        self.burst = burst
        self.refill_seconds = refill_seconds
        self.max_series = max_series
        self._series: OrderedDict[tuple[ObjectKey, str, str], _Series] = OrderedDict()
        self._buckets: OrderedDict[ObjectKey, _Bucket] = OrderedDict()  # by last spend
        # (due at, order of scheduling, series); an entry whose series has moved on is skipped.
        self._pending: list[tuple[float, int, _Series]] = []
        self._order = itertools.count()
        self.dropped = 0  # series forgotten unwritten because `max_series` was reached

    def __len__(self) -> int:
        return len(self._series)

    def record(self, note: EventNote, now: float) -> float | None:
        """Note one occurrence; returns when a write it scheduled is due (None: it scheduled
        none, as for a repeat of a series whose patch is already pending)."""
        if len(note.message) > MAX_NOTE:
            note = replace(note, message=note.message[:MAX_NOTE])
        key = note.series_key
        series = self._series.get(key)
        if series is not None and now - series.last_seen > self.series_window:
            series = None  # gone quiet long enough: a new Event
        if series is None:
            series = self._series[key] = _Series(key, _event_name(note, now), note, now, now, 1)
            self._series.move_to_end(key)
            self._schedule(series, now)  # a new series is created at once
            while len(self._series) > self.max_series:
                _, old = self._series.popitem(last=False)
                if old.written_count < old.count:
                    self.dropped += 1
            return now
        series.note, series.last_seen, series.count = note, now, series.count + 1
        self._series.move_to_end(key)
        if series.due_at is not None:
            return None
        # A repeat of what is written: patched an interval after.
        self._schedule(series, max(now, series.written_at + self.patch_interval))
        return series.due_at

    def _schedule(self, series: _Series, at: float) -> None:
        series.due_at = at
        heapq.heappush(self._pending, (at, next(self._order), series))

    def _current(self, at: float, series: _Series) -> bool:
        """Whether a heap entry still stands for its series' pending write."""
        return series.due_at == at and self._series.get(series.key) is series

    def _spend(self, regarding: ObjectKey, now: float) -> float:
        """Spend a token of the object's bucket: 0.0 if spent, else the seconds until one."""
        bucket = self._buckets.get(regarding)
        if bucket is None:
            bucket = self._buckets[regarding] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst),
                            bucket.tokens + (now - bucket.at) / self.refill_seconds)
        bucket.at = now
        self._buckets.move_to_end(regarding)
        if bucket.tokens < 1.0:
            return (1.0 - bucket.tokens) * self.refill_seconds
        bucket.tokens -= 1.0
        return 0.0

    def due(self, now: float) -> list[EventWrite]:
        """The writes to make now (each spends its object's budget); what is not due yet, or
        over budget, stays pending and is asked for again when it can be written."""
        writes: list[EventWrite] = []
        while self._pending and self._pending[0][0] <= now:
            at, _, series = heapq.heappop(self._pending)
            if not self._current(at, series):
                continue
            series.due_at = None
            wait = self._spend(series.note.regarding, now)
            if wait > 0.0:
                self._schedule(series, now + wait)
                continue
            create = series.written_count == 0
            writes.append(EventWrite("create" if create else "patch", series.name, series.note,
                                     series.count, series.first_seen, series.last_seen))
            series.written_count, series.written_at = series.count, now
        self._forget_idle(now)
        return writes

    def next_due(self, now: float) -> float | None:
        """Seconds until a pending write may be due (None: nothing pending)."""
        while self._pending and not self._current(self._pending[0][0], self._pending[0][2]):
            heapq.heappop(self._pending)
        return max(0.0, self._pending[0][0] - now) if self._pending else None

    def lost(self, write: EventWrite) -> None:
        """The API server no longer has the Event (a patch found it gone): the next
        occurrence starts a new series."""
        series = self._series.get(write.note.series_key)
        if series is not None and series.name == write.name:
            del self._series[write.note.series_key]

    def _forget_idle(self, now: float) -> None:
        # Oldest first: a series moves to the end when it recurs, so the idle ones lead.
        idle = []
        for key, series in self._series.items():
            if now - series.last_seen <= self.series_window:
                break
            if series.written_count >= series.count:
                idle.append(key)
        for key in idle:
            del self._series[key]
        # A bucket full again is as good as none (a new one starts full); the oldest spends
        # lead, and one untouched for `burst * refill_seconds` is surely full.
        full_after = self.burst * self.refill_seconds
        while self._buckets:
            regarding, bucket = next(iter(self._buckets.items()))
            if now - bucket.at < full_after:
                break
            del self._buckets[regarding]


def _event_name(note: EventNote, now: float) -> str:
    """`<object>.<16 hex>`, as client-go names Events: unique per series, stable across a
    retried create (which then answers 409, and is not written twice)."""
    digest = hashlib.sha256(repr((note.series_key, now)).encode()).hexdigest()[:16]
    return f"{note.regarding.name[:200]}.{digest}"


REPORTING_COMPONENT = "gitea-flux-bridge"


def pod_note(namespace: str, name: str, type_: EventType, reason: str,
             message: str) -> EventNote:
    """An Event on the bridge's own Pod: what concerns the bridge rather than a Flux object
    (a configured secret it cannot read)."""
    return EventNote(ObjectKey("Pod", namespace, name), "v1", type_, reason, message)


def _timestamp(seconds: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_body(write: EventWrite, instance: str) -> dict[str, object]:
    """The core v1 Event a create writes (Flux's controllers write core v1 Events too, which
    `kubectl describe` shows under the object), or the merge patch a repeat writes."""
    note = write.note
    if write.op == "patch":
        return {"count": write.count, "lastTimestamp": _timestamp(write.last_seen),
                "message": note.message}
    regarding: dict[str, str] = {"apiVersion": note.api_version, "kind": note.regarding.kind,
                                 "name": note.regarding.name,
                                 "namespace": note.regarding.namespace}
    if note.uid:
        regarding["uid"] = note.uid
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": write.name, "namespace": note.regarding.namespace},
        "involvedObject": regarding, "reason": note.reason, "message": note.message,
        "type": note.type, "count": write.count,
        "firstTimestamp": _timestamp(write.first_seen),
        "lastTimestamp": _timestamp(write.last_seen),
        "source": {"component": REPORTING_COMPONENT},
        "reportingComponent": REPORTING_COMPONENT, "reportingInstance": instance[:128],
    }
