"""Whether this replica takes traffic (`GET /readyz`), from what the shell gathered. Pure.

The order is the policy: a draining replica leaves the Service's endpoints first; a cache that is
not synced, or a watch that keeps failing (the cache goes stale), keeps traffic away; so does
the first indexing of the Receivers (the first Ready sends pushes here, and every cached
Receiver must resolve by then) and a configured secret that cannot be read (`/events` would
answer 401 and statuses would fail). What does not stop serving is said: optional kinds not
installed or not permitted (nothing routes to them), Receivers that cannot be used (named so
someone fixes them), and the operator's notes (e.g. that Flux is simulated).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Health:
    draining: bool
    synced: bool
    failing_watches: Mapping[str, str]
    first_indexing: bool  # the Receivers are being indexed and this replica was never ready
    unreadable_secrets: Mapping[str, str]
    objects: int
    receivers: int
    not_installed: Sequence[str] = ()
    not_permitted: Sequence[str] = ()
    unusable_receivers: Mapping[str, str] = field(default_factory=dict)
    notes: Mapping[str, str] = field(default_factory=dict)


def readiness(health: Health) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 200 `ready`, or 503 with the first reason in policy order."""
    if health.draining:
        return 503, {"error": "draining"}
    if not health.synced:
        return 503, {"error": "caches are not synced"}
    if health.failing_watches:
        return 503, {"error": "cannot reach Kubernetes for some kinds",
                     "failing": sorted(health.failing_watches)}
    if health.first_indexing:
        return 503, {"error": "receivers are being indexed"}
    detail: dict[str, Any] = {}
    if health.not_installed:
        detail["kinds_not_installed"] = list(health.not_installed)
    if health.not_permitted:
        detail["kinds_not_permitted"] = list(health.not_permitted)
    if health.unusable_receivers:
        detail["receivers_unusable"] = dict(health.unusable_receivers)
    if health.unreadable_secrets:
        return 503, {"error": "configured secrets cannot be read",
                     "secrets": dict(health.unreadable_secrets), **detail, **health.notes}
    return 200, {"status": "ready", "objects": health.objects, "receivers": health.receivers,
                 **detail, **health.notes}
