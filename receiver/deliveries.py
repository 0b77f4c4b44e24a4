"""Deliveries: what one accepted push asked for, and where each of its targets stands.

Bounded in memory by count and age. Waiters (`GET /deliveries/{id}?wait=`) are woken on every
change through a per-delivery version counter and an asyncio.Condition.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from receiver.flux.objects import ObjectKey
from receiver.flux.revisions import FINAL_STATES, QUEUED
from receiver.routing import Plan, Target

ROLE_ANNOTATE = "annotate"
ROLE_TRACK = "track"


@dataclass
class TargetState:
    target: Target
    role: str
    state: str = QUEUED
    reason: str = ""
    message: str = ""
    updated: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.target.as_dict(), "role": self.role, "state": self.state}
        if self.message or self.reason:
            out["detail"] = {"reason": self.reason, "message": self.message}
        return out


@dataclass
class Delivery:
    id: str
    receiver: str
    ref: str
    sha: str
    plan: Plan
    received_wall: float = field(default_factory=time.time)
    received: float = field(default_factory=time.monotonic)
    targets: dict[ObjectKey, TargetState] = field(default_factory=dict)
    version: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @classmethod
    def create(cls, id_: str, receiver: str, ref: str, sha: str, plan: Plan) -> Delivery:
        delivery = cls(id=id_, receiver=receiver, ref=ref, sha=sha, plan=plan)
        for target in plan.targets:
            delivery.targets[target.key] = TargetState(target, ROLE_ANNOTATE)
        for target in plan.tracked:
            delivery.targets.setdefault(target.key, TargetState(target, ROLE_TRACK))
        return delivery

    @property
    def final(self) -> bool:
        return all(t.state in FINAL_STATES for t in self.targets.values())

    def outcome(self) -> str:
        """failed as soon as any target failed (a CI job can stop there); else the final word."""
        states = {t.state for t in self.targets.values()}
        if "failed" in states:
            return "failed"
        if not self.final:
            return "in_progress"
        return "timed_out" if "timed_out" in states else "ready"

    @property
    def settled(self) -> bool:
        """Nothing more to wait for: every target is final, or one has failed."""
        return self.final or any(t.state == "failed" for t in self.targets.values())

    async def set_state(self, key: ObjectKey, state: str, reason: str = "", message: str = "") -> bool:
        """Record a target's new state; False if nothing changed or it was already final."""
        current = self.targets.get(key)
        if current is None or current.state in FINAL_STATES:
            return False
        if (current.state, current.reason, current.message) == (state, reason, message):
            return False
        current.state, current.reason, current.message = state, reason, message
        current.updated = time.time()
        async with self.changed:
            self.version += 1
            self.changed.notify_all()
        return True

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivery": self.id,
            "receiver": self.receiver,
            "ref": self.ref,
            "commit": self.sha,
            "received": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.received_wall)),
            "outcome": self.outcome(),
            "final": self.final,
            "targets": [t.as_dict() for t in self.targets.values()],
        }


class DeliveryStore:
    def __init__(self, max_count: int, max_age_seconds: float) -> None:
        self._items: OrderedDict[str, Delivery] = OrderedDict()
        self._active: set[str] = set()
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
        return self.expire(time.monotonic())

    def finished(self, delivery: Delivery) -> None:
        self._active.discard(delivery.id)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def get(self, id_: str) -> Delivery | None:
        return self._items.get(id_)

    def active(self) -> list[Delivery]:
        return [self._items[i] for i in self._active if i in self._items]

    def expire(self, now: float) -> list[Delivery]:
        """Drop deliveries past the age or count bound; returns what was dropped."""
        dropped: list[Delivery] = []
        while self._items:
            oldest = next(iter(self._items.values()))
            if len(self._items) <= self._max_count and now - oldest.received < self._max_age:
                break
            old = self._items.popitem(last=False)[1]
            self._active.discard(old.id)
            dropped.append(old)
        return dropped
