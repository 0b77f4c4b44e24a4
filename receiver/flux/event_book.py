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


@dataclass(slots=True)
class _Series:
    name: str
    note: EventNote  # the latest
    first_seen: float
    last_seen: float
    count: int
    written_count: int = 0  # what the API server has (0: not created yet)
    written_at: float = float("-inf")


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class EventBook:
    """The pending Events of the whole process. `record` is O(1) and never does I/O; a writer
    asks `due(now)` for the writes to make."""

    def __init__(self, *, patch_interval: float = 30.0, series_window: float = 600.0,
                 burst: int = 10, refill_seconds: float = 60.0, max_series: int = 4096) -> None:
        self.patch_interval = patch_interval
        self.series_window = series_window
        self.burst = burst
        self.refill_seconds = refill_seconds
        self.max_series = max_series
        self._series: OrderedDict[tuple[ObjectKey, str, str], _Series] = OrderedDict()
        self._buckets: dict[ObjectKey, _Bucket] = {}
        self.dropped = 0  # series forgotten unwritten because `max_series` was reached

    def __len__(self) -> int:
        return len(self._series)

    def record(self, note: EventNote, now: float) -> None:
        if len(note.message) > MAX_NOTE:
            note = replace(note, message=note.message[:MAX_NOTE])
        key = note.series_key
        series = self._series.get(key)
        if series is not None and now - series.last_seen > self.series_window:
            series = None  # gone quiet long enough: a new Event
        if series is None:
            self._series[key] = _Series(_event_name(note, now), note, now, now, 1)
            self._series.move_to_end(key)
            while len(self._series) > self.max_series:
                _, old = self._series.popitem(last=False)
                if old.written_count < old.count:
                    self.dropped += 1
            return
        series.note, series.last_seen, series.count = note, now, series.count + 1
        self._series.move_to_end(key)

    def _spend(self, regarding: ObjectKey, now: float) -> bool:
        bucket = self._buckets.get(regarding)
        if bucket is None:
            bucket = self._buckets[regarding] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst),
                            bucket.tokens + (now - bucket.at) / self.refill_seconds)
        bucket.at = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def due(self, now: float) -> list[EventWrite]:
        """The writes to make now (each spends its object's budget); what is not due yet, or
        over budget, stays pending and is asked for again."""
        writes: list[EventWrite] = []
        for series in list(self._series.values()):
            if series.written_count >= series.count:
                continue
            create = series.written_count == 0
            if not create and now - series.written_at < self.patch_interval:
                continue
            if not self._spend(series.note.regarding, now):
                continue
            writes.append(EventWrite("create" if create else "patch", series.name, series.note,
                                     series.count, series.first_seen, series.last_seen))
            series.written_count, series.written_at = series.count, now
        self._forget_idle(now)
        return writes

    def next_due(self, now: float) -> float | None:
        """Seconds until a pending write may be due (None: nothing pending)."""
        waits = [0.0 if s.written_count == 0 else
                 max(0.0, s.written_at + self.patch_interval - now)
                 for s in self._series.values() if s.written_count < s.count]
        return min(waits) if waits else None

    def lost(self, write: EventWrite) -> None:
        """The API server no longer has the Event (a patch found it gone): the next
        occurrence starts a new series."""
        series = self._series.get(write.note.series_key)
        if series is not None and series.name == write.name:
            del self._series[write.note.series_key]

    def _forget_idle(self, now: float) -> None:
        idle = [k for k, s in self._series.items()
                if s.written_count >= s.count and now - s.last_seen > self.series_window]
        for key in idle:
            del self._series[key]
        live = {k[0] for k in self._series}
        for regarding in [r for r, b in self._buckets.items()
                          if r not in live and b.tokens + (now - b.at) / self.refill_seconds
                          >= self.burst]:
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
