"""The readiness policy, as a pure function: the first reason in policy order wins."""

from __future__ import annotations

from dataclasses import replace

from receiver.web.readiness import Health, readiness

READY = Health(draining=False, synced=True, failing_watches={}, first_indexing=False,
               unreadable_secrets={}, objects=12, receivers=3)


def test_ready_says_what_it_serves_and_what_it_cannot() -> None:
    assert readiness(READY) == (200, {"status": "ready", "objects": 12, "receivers": 3})
    told = replace(READY, not_installed=["ImagePolicy"], not_permitted=["HelmChart"],
                   unusable_receivers={"apps/actions": "secret missing"},
                   notes={"simulation": "Flux is simulated"})
    status, body = readiness(told)
    assert status == 200
    assert body["kinds_not_installed"] == ["ImagePolicy"]
    assert body["kinds_not_permitted"] == ["HelmChart"]
    assert body["receivers_unusable"] == {"apps/actions": "secret missing"}
    assert body["simulation"] == "Flux is simulated"


def test_each_reason_keeps_traffic_away_in_policy_order() -> None:
    worst = replace(READY, draining=True, synced=False, failing_watches={"Kustomization": "x"},
                    first_indexing=True, unreadable_secrets={"badge_key": "empty"})
    expected = ["draining", "caches are not synced", "cannot reach Kubernetes for some kinds",
                "receivers are being indexed", "configured secrets cannot be read"]
    health = worst
    for field, fixed in (("draining", False), ("synced", True), ("failing_watches", {}),
                         ("first_indexing", False), ("unreadable_secrets", {})):
        status, body = readiness(health)
        assert (status, body["error"]) == (503, expected.pop(0))
        health = replace(health, **{field: fixed})
    assert readiness(health)[0] == 200
    assert readiness(replace(READY, failing_watches={"B": "1", "A": "2"}))[1]["failing"] == [
        "A", "B"]
