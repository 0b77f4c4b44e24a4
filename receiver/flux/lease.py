"""The resync Lease: who may hold it, decided one way for both cluster backends. Pure.

A `coordination.k8s.io/v1` Lease spec: create it when there is none, renew it when it is ours,
take it over when its holder let it expire (or it names none), else leave it. The kube backend
writes the result conditionally on the resourceVersion it read, so of two replicas racing for an
expired Lease exactly one wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from receiver.times import parse_rfc3339


def format_micro(moment: datetime) -> str:
    """metav1.MicroTime's wire format: RFC 3339 with exactly six fractional digits."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def expired(spec: Mapping[str, Any], now: datetime) -> bool:
    renewed = parse_rfc3339(spec.get("renewTime")) or parse_rfc3339(spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds")
    if renewed is None or not isinstance(duration, int):
        return True
    return renewed + timedelta(seconds=duration) < now


def next_spec(spec: Mapping[str, Any] | None, holder: str, duration: int,
              now: datetime) -> dict[str, Any] | None:
    """The spec to write for `holder` to hold the Lease now, or None if another holds it."""
    if not spec:
        return _spec({}, holder, duration, now, transition=False)
    current = spec.get("holderIdentity")
    if current == holder:
        return _spec(spec, holder, duration, now, transition=False)
    if not current or expired(spec, now):
        return _spec(spec, holder, duration, now, transition=True)
    return None


def _spec(spec: Mapping[str, Any], holder: str, duration: int, now: datetime, *,
          transition: bool) -> dict[str, Any]:
    stamp = format_micro(now)
    transitions = spec.get("leaseTransitions")
    count = transitions if isinstance(transitions, int) else 0
    new = {**spec, "holderIdentity": holder, "leaseDurationSeconds": duration, "renewTime": stamp}
    if transition or not spec:
        new["acquireTime"] = stamp
        new["leaseTransitions"] = count + 1 if transition else count
    return new
