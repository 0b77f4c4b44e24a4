"""A delivery's state as data: each target's state and the delivery's verdict (what
`GET /deliveries/{id}` shows and a CI gate reads), and the inputs `state.evaluate` takes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from receiver.flux.objects import SOURCE_KINDS, FluxObject, ObjectKey
from receiver.flux.revisions import FAILED, FINAL_STATES, READY, SKIPPED, TIMED_OUT

Lookup = Callable[[ObjectKey], FluxObject | None]

# A delivery's verdicts. Only `ready` means "deployed"; `superseded` is final but is not
# success: Flux went to a later commit and never reported ours.
IN_PROGRESS = "in_progress"
SUPERSEDED_OUTCOME = "superseded"
OUTCOMES = (IN_PROGRESS, READY, FAILED, TIMED_OUT, SUPERSEDED_OUTCOME)
SUPERSEDED = "Superseded"  # the reason of a skipped target taken to a later commit
CONTAINED = "ContainsCommit"  # the reason of a target Ready at a later commit that holds ours
CHECKING = "CheckingHistory"  # while the shell asks Gitea whether a later commit holds ours

Contains = Callable[[FluxObject, str, str], "bool | None"]
"""`contains(source, ours, held)`: does commit `held` contain commit `ours` (ours is `held` or
one of its ancestors) in the repository `source` fetches? None while nobody knows yet: the shell
asks Gitea, caches the answer, and evaluates again (`receiver/delivery/ancestry.py`)."""


def never_known(source: FluxObject, ours: str, held: str) -> bool:
    """`Contains` without a Git host to ask: a later commit is never taken to contain ours."""
    return False


@dataclass(frozen=True, slots=True)
class Timeouts:
    source_seconds: float
    consumer_seconds: float


@dataclass(frozen=True, slots=True)
class TargetView:
    key: ObjectKey
    role: str
    state: str
    reason: str = ""
    message: str = ""
    commit: str = ""  # for a superseded target: the commit Flux took it to instead

    @property
    def is_source(self) -> bool:
        return self.key.kind in SOURCE_KINDS

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def as_dict(self, api_version: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.key.kind, "namespace": self.key.namespace,
                               "name": self.key.name, "role": self.role, "state": self.state}
        if api_version:
            out = {"apiVersion": api_version, **out}
        if self.reason or self.message:
            out["detail"] = {"reason": self.reason, "message": self.message}
        if self.commit:
            out["supersededBy"] = self.commit
        return out


@dataclass(frozen=True, slots=True)
class DeliveryView:
    targets: tuple[TargetView, ...]

    @property
    def final(self) -> bool:
        return all(t.final for t in self.targets)

    @property
    def settled(self) -> bool:
        """Nothing more to wait for: every target is final, or one has failed."""
        return self.final or any(t.state == FAILED for t in self.targets)

    def outcome(self) -> str:
        """The delivery's verdict, the one a CI gate reads (`OUTCOMES`).

        `failed` as soon as any target failed (a CI job can stop there); `in_progress` until
        every target is final; then `timed_out` if any timed out, `superseded` if any was
        taken to a later commit instead of ours, and `ready` only when every target it
        followed is Ready at the pushed commit. A skipped target is never counted as ready.
        """
        states = {t.state for t in self.targets}
        if FAILED in states:
            return FAILED
        if not self.final:
            return IN_PROGRESS
        if TIMED_OUT in states:
            return TIMED_OUT
        if any(t.state == SKIPPED and t.reason == SUPERSEDED for t in self.targets):
            return SUPERSEDED_OUTCOME
        return READY

    def superseded_by(self) -> str:
        """The commit Flux took a superseded target to instead of ours ("" if none was)."""
        for target in self.targets:
            if target.state == SKIPPED and target.reason == SUPERSEDED:
                return target.commit
        return ""

    def get(self, key: ObjectKey) -> TargetView | None:
        for target in self.targets:
            if target.key == key:
                return target
        return None


Local = Mapping[ObjectKey, tuple[str, str, str]]


