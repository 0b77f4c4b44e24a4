"""Deliveries this replica is following: the record, its latest view, and who waits on it.

The truth of a delivery is its record (carried in its id) and the live objects; this replica
keeps the deliveries it accepted only to act on them (annotate consumers once their source has
the commit, post statuses, observe lead time) and to wake local waiters quickly. Bounded by
count and age; losing one (a restart, an eviction) loses no answer, only local speed.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from receiver.bounded import BoundedMap
from receiver.delivery.record import ROLE_ANNOTATE, ROLE_TRACK, DeliveryRecord, RecordTarget
from receiver.delivery.view import SUPERSEDED_OUTCOME, DeliveryView, TargetView
from receiver.flux.objects import ObjectKey
from receiver.flux.revisions import QUEUED
from receiver.push.routing import Plan

_T = TypeVar("_T")

__all__ = ["ROLE_ANNOTATE", "ROLE_TRACK", "Delivery", "DeliveryStore", "describe", "record_targets"]


# Plans are remembered (`push.plan_cache`), so the pushes of one Receiver to one place share
# one plan: they share its record targets and their first view too (all immutable), instead of
# each delivery holding copies of its own (fewer objects for the collector to walk).
_SHARED: BoundedMap[int, tuple[object, object]] = BoundedMap(4096)


def _shared(source: object, make: Callable[[], _T]) -> _T:
    """`make()`, computed once per `source` object (by identity, kept alive with it)."""
    found = _SHARED.get(id(source))
    if found is not None and found[0] is source:
        return found[1]  # type: ignore[return-value]
    made = make()
    _SHARED[id(source)] = (source, made)
    return made


def record_targets(plan: Plan) -> tuple[RecordTarget, ...]:
    """The plan's targets in annotation order, then the tracked ones not annotated."""
    return _shared(plan, lambda: _record_targets(plan))


def _record_targets(plan: Plan) -> tuple[RecordTarget, ...]:
    out = [RecordTarget(t.key, ROLE_ANNOTATE) for t in plan.targets]
    annotated = {t.key for t in plan.targets}
    out.extend(RecordTarget(t.key, ROLE_TRACK) for t in plan.tracked if t.key not in annotated)
    return tuple(out)


def _queued(targets: tuple[RecordTarget, ...]) -> DeliveryView:
    return DeliveryView(tuple(TargetView(t.key, t.role, QUEUED) for t in targets))


def describe(delivery_id: str, record: DeliveryRecord, view: DeliveryView,
             api_versions: dict[str, str] | None = None) -> dict[str, Any]:
    """The JSON a client reads for a delivery (`GET /deliveries/{id}` and each stream line)."""
    versions = api_versions or {}
    out: dict[str, Any] = {
        "delivery": delivery_id,
        "receiver": record.receiver,
        "ref": record.ref,
        "commit": record.sha,
        "received": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.received)),
        "outcome": view.outcome(),
        "final": view.final,
        "targets": [t.as_dict(versions.get(t.key.kind, "")) for t in view.targets],
    }
    if out["outcome"] == SUPERSEDED_OUTCOME:
        out["supersededBy"] = view.superseded_by()
    if record.omitted:
        out["omitted_targets"] = record.omitted
    return out


@dataclass(slots=True)
class Delivery:
    id: str
    record: DeliveryRecord
    # The routing plan, for the 202 reply and a repeated push's (which joins only while in
    # flight): dropped once the delivery is finished, as nothing reads it after that.
    plan: Plan
    view: DeliveryView
    # Outcomes only this replica knows (a refused patch); see delivery_state.
    local: dict[ObjectKey, tuple[str, str, str]] = field(default_factory=dict)

    @classmethod
    def from_record(cls, id_: str, record: DeliveryRecord, plan: Plan) -> Delivery:
        targets = record.targets
        view = _shared(targets, lambda: _queued(targets))
        return cls(id=id_, record=record, plan=plan.compact(), view=view)

    @property
    def receiver(self) -> str:
        return self.record.receiver

    @property
    def sha(self) -> str:
        return self.record.sha

    @property
    def ref(self) -> str:
        return self.record.ref

    @property
    def final(self) -> bool:
        return self.view.final

    def update(self, view: DeliveryView) -> list[TargetView]:
        """Take a newly computed view; returns the targets whose state changed. (Waiters
        follow the objects, not this: `web.changes`.)"""
        old = {t.key: t for t in self.view.targets}
        changed = [t for t in view.targets if old.get(t.key) != t]
        if changed:
            self.view = view
        return changed


@functools.lru_cache(maxsize=1024)
def _no_plan(receiver: str) -> Plan:
    """What a finished delivery keeps of its plan: nothing but whose it was (one per Receiver)."""
    return Plan(receiver, (), ())


def _push_key(delivery: Delivery) -> tuple[str, str, str]:
    return delivery.receiver, delivery.sha, delivery.ref


class DeliveryStore:
    def __init__(self, max_count: int, max_age_seconds: float) -> None:
        self._items: OrderedDict[str, Delivery] = OrderedDict()
        self._active: set[str] = set()
        # (receiver, commit, ref) -> id of the delivery in flight for it: a repeat joins it.
        self._in_flight: dict[tuple[str, str, str], str] = {}
        self._max_count = max_count
        self._max_age = max_age_seconds

    def __len__(self) -> int:
        return len(self._items)

    def add(self, delivery: Delivery) -> list[Delivery]:
        """Keep a new delivery; returns the ones dropped to stay within the bounds."""
        self._items[delivery.id] = delivery
        self._items.move_to_end(delivery.id)
        if not delivery.final:
            self._active.add(delivery.id)
            if delivery.sha:
                self._in_flight[_push_key(delivery)] = delivery.id
        return self.expire(time.time())

    def finished(self, delivery: Delivery) -> None:
        self._active.discard(delivery.id)
        delivery.plan = _no_plan(delivery.plan.receiver)
        if self._in_flight.get(_push_key(delivery)) == delivery.id:
            del self._in_flight[_push_key(delivery)]

    def discard(self, delivery: Delivery) -> None:
        """Drop a delivery that should not have been kept (it was another replica's)."""
        self.finished(delivery)
        self._items.pop(delivery.id, None)

    def in_flight(self, receiver: str, sha: str, ref: str) -> Delivery | None:
        """The delivery still in progress for this push of this commit, if any."""
        id_ = self._in_flight.get((receiver, sha, ref)) if sha else None
        return self._items.get(id_) if id_ is not None else None

    @property
    def active_count(self) -> int:
        return len(self._active)

    def get(self, id_: str) -> Delivery | None:
        return self._items.get(id_)

    def expire(self, now: float) -> list[Delivery]:
        """Drop deliveries past the age or count bound; returns what was dropped."""
        dropped: list[Delivery] = []
        while self._items:
            oldest = next(iter(self._items.values()))
            if len(self._items) <= self._max_count and now - oldest.record.received < self._max_age:
                break
            old = self._items.popitem(last=False)[1]
            self.finished(old)
            dropped.append(old)
        return dropped
