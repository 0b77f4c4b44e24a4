"""Who may hold the resync Lease: one decision for both cluster backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from receiver.flux import lease
from receiver.flux.memory import MemoryCluster
from receiver.flux.store import ObjectStore

NOW = datetime(2026, 12, 7, 8, 0, tzinfo=UTC)


def test_created_renewed_and_refused_while_another_holds_it() -> None:
    first = lease.next_spec(None, "a", 15, NOW)
    assert first is not None and first["holderIdentity"] == "a"
    assert first["leaseTransitions"] == 0 and first["acquireTime"] == first["renewTime"]
    renewed = lease.next_spec(first, "a", 15, NOW + timedelta(seconds=5))
    assert renewed is not None and renewed["acquireTime"] == first["acquireTime"]
    assert renewed["renewTime"] == lease.format_micro(NOW + timedelta(seconds=5))
    assert lease.next_spec(renewed, "b", 15, NOW + timedelta(seconds=19)) is None


def test_an_expired_or_unheld_lease_is_taken_over_and_counted() -> None:
    held = lease.next_spec(None, "a", 15, NOW)
    assert held is not None
    taken = lease.next_spec(held, "b", 15, NOW + timedelta(seconds=16))
    assert taken is not None and taken["holderIdentity"] == "b"
    assert taken["leaseTransitions"] == 1
    assert lease.next_spec({**held, "holderIdentity": ""}, "c", 15, NOW) is not None
    assert lease.expired({"holderIdentity": "a"}, NOW)  # no times: expired


@pytest.mark.anyio
async def test_the_memory_backend_decides_as_the_kube_backend_does() -> None:
    cluster = MemoryCluster(ObjectStore(lambda url: url))
    assert await cluster.try_acquire_lease("resync", "a", 60)
    assert await cluster.try_acquire_lease("resync", "a", 60)
    assert not await cluster.try_acquire_lease("resync", "b", 60)
