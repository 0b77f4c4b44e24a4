"""A canary wait never ends on what only the cache believes: a canary whose workload is not
cached is still waited for, and a verdict is read again from the API server before it ends a
wait (`?canaries=true`)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from receiver.delivery.canary_wait import CANARY_ROLE, canaries_by_consumer, with_canaries
from receiver.delivery.record import DeliveryRecord, RecordTarget
from receiver.delivery.view import DeliveryView, TargetView
from receiver.flux.cluster import ClusterError
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.flux.revisions import READY, RECONCILING
from tests.conftest import HMAC_TOKEN, Bridge, BridgeFactory, make_settings
from tests.delivery.test_canary_wait import KS, PICKUP, RECEIVED, canary, ks_ready_at
from tests.delivery.test_verdicts import _commit, _step_push

FLUX_LABELS = {"kustomize.toolkit.fluxcd.io/name": KS.name,
               "kustomize.toolkit.fluxcd.io/namespace": KS.namespace}
AUTH = {"Authorization": f"Bearer {HMAC_TOKEN}"}


def labelled(obj: FluxObject, labels: dict[str, str]) -> FluxObject:
    raw = {**obj.raw, "metadata": {**obj.raw["metadata"], "labels": labels}}
    return FluxObject(raw)


def test_a_canary_whose_workload_is_not_cached_still_holds_the_wait() -> None:
    """The Canary was applied by the Kustomization, its Deployment is not (yet) in the cache:
    before, the canary dropped out of the wait and the delivery read 'every canary promoted'."""
    ours = labelled(canary("Succeeded", RECEIVED - 3600), FLUX_LABELS)
    stranger = canary("Succeeded", RECEIVED - 3600, "loose")
    objects = {KS: ks_ready_at(RECEIVED + 1)}
    assert canaries_by_consumer([ours, stranger], objects.get) == {KS: [ours]}
    record = DeliveryRecord("flux-system/hmac", "a" * 40, "refs/heads/main", RECEIVED, "m",
                            (RecordTarget(KS, "consumer"),))
    view = DeliveryView((TargetView(KS, "consumer", READY),))
    # Long after the pickup time: with no workload to compare, only Flagger deciding ends it.
    waiting = with_canaries(view, record, [ours], objects.get, RECEIVED + 10 * PICKUP, PICKUP)
    (row,) = [t for t in waiting.targets if t.role == CANARY_ROLE]
    assert (row.state, row.reason) == (RECONCILING, "WaitingForFlagger")
    assert "does not see the canary's workload" in row.message
    assert waiting.outcome() == "in_progress"
    decided = labelled(canary("Succeeded", RECEIVED + 5), FLUX_LABELS)
    done = with_canaries(view, record, [decided], objects.get, RECEIVED + 6, PICKUP)
    assert done.outcome() == "ready"


# -- over HTTP: the cache says "no analysis needed", the API server says the workload changed --


def _deployment(changed: float, owner: ObjectKey) -> dict[str, Any]:
    """The canary's Deployment as the API server serves it: kustomize-controller last changed
    it at `changed` (its managedFields entry)."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": "web", "namespace": "apps", "resourceVersion": str(int(changed)),
        "labels": {"kustomize.toolkit.fluxcd.io/name": owner.name,
                   "kustomize.toolkit.fluxcd.io/namespace": owner.namespace},
        "managedFields": [{"manager": "kustomize-controller", "operation": "Apply",
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(changed))}]}}


async def _deployed_with_a_standing_canary(bridge: Bridge) -> tuple[str, ObjectKey]:
    """A push Flux has applied; its Kustomization's Deployment is behind a Canary promoted an
    hour ago, and the cache holds the Deployment as last changed two hours ago."""
    sha = _commit(0xCF)
    delivery = (await _step_push(bridge, sha))["delivery"]
    doc = (await bridge.client.get(f"/deliveries/{delivery}", headers=AUTH)).json()
    consumers = [ObjectKey(t["kind"], t["namespace"], t["name"]) for t in doc["targets"]
                 if t["kind"] in ("Kustomization", "HelmRelease")]
    owner = next(k for k in consumers if k.kind == "Kustomization")
    bridge.cluster.apply(_deployment(time.time() - 7200, owner))
    bridge.cluster.apply({"apiVersion": "flagger.app/v1beta1", "kind": "Canary", "metadata": {
        "name": "web", "namespace": "apps"}, "spec": {"targetRef": {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}}})
    key = ObjectKey("Canary", "apps", "web")
    bridge.cluster.mark_canary(key, "Succeeded", at=time.time() - 3600)
    bridge.cluster.mark_source_fetched(ObjectKey("GitRepository", "flux-system", "flux-system"),
                                       f"main@sha1:{sha}")
    for target in consumers:
        bridge.cluster.mark_applied(
            target, f"6.5.0+{sha[:12]}" if target.kind == "HelmRelease" else f"main@sha1:{sha}")
    return delivery, owner


async def _standing_canary_bridge(bridge_factory: BridgeFactory
                                  ) -> tuple[Bridge, str, ObjectKey]:
    """A bridge following canaries, with no pickup wait, and `_deployed_with_a_standing_canary`."""
    bridge = await bridge_factory(make_settings(
        statuses={"canaries": {"enabled": True}}, deliveries={"canary_pickup_seconds": 0.001}))
    delivery, owner = await _deployed_with_a_standing_canary(bridge)
    return bridge, delivery, owner


def _serve(bridge: Bridge, monkeypatch: pytest.MonkeyPatch,
           read: Callable[[ObjectKey], Awaitable[FluxObject | None]]) -> list[ObjectKey]:
    """The API server's answers to the bridge's GETs; returns the keys it was asked for."""
    asked: list[ObjectKey] = []

    async def read_object(key: ObjectKey) -> FluxObject | None:
        asked.append(key)
        return await read(key)

    monkeypatch.setattr(bridge.cluster, "read_object", read_object)
    return asked


def _canary_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(t["state"], t["detail"]["reason"]) for t in doc["targets"] if t["role"] == "canary"]


@pytest.mark.anyio
async def test_a_verdict_the_api_server_contradicts_does_not_end_the_wait(
        bridge_factory: BridgeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    bridge, delivery, owner = await _standing_canary_bridge(bridge_factory)
    cached = bridge.cluster.store.get
    # The API server agrees with the cache: the commit left the workload as it was, so the
    # standing promotion is the canary's outcome, confirmed by a read of each.
    asked = _serve(bridge, monkeypatch, lambda key: _answer(cached(key)))
    url = f"/deliveries/{delivery}?canaries=true"
    agreed = (await bridge.client.get(url, headers=AUTH)).json()
    assert (agreed["outcome"], _canary_rows(agreed)) == ("ready", [(READY, "NoAnalysis")])
    assert asked == [ObjectKey("Canary", "apps", "web"), ObjectKey("Deployment", "apps", "web")]
    # The cache is behind: kustomize-controller changed the Deployment a moment ago (the watch
    # has not brought it yet). Flagger owes an analysis; the wait goes on, streamed or not.
    changed = FluxObject(_deployment(time.time(), owner))
    _serve(bridge, monkeypatch,
           lambda key: _answer(changed if key.kind == "Deployment" else cached(key)))
    behind = (await bridge.client.get(url, headers=AUTH)).json()
    assert (behind["outcome"], _canary_rows(behind)) == (
        "in_progress", [(RECONCILING, "WaitingForFlagger")])
    streamed = (await bridge.client.get(f"{url}&wait=0.3", headers=AUTH)).text
    assert '"outcome":"ready"' not in streamed.replace(" ", "") and '"timeout":true' in \
        streamed.replace(" ", ""), streamed


@pytest.mark.anyio
async def test_a_verdict_that_cannot_be_read_again_is_withheld(
        bridge_factory: BridgeFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    bridge, delivery, _ = await _standing_canary_bridge(bridge_factory)

    async def unreachable(key: ObjectKey) -> FluxObject | None:
        raise ClusterError(f"reading {key}: connection refused", retryable=True)

    _serve(bridge, monkeypatch, unreachable)
    doc = (await bridge.client.get(f"/deliveries/{delivery}?canaries=true", headers=AUTH)).json()
    assert (doc["outcome"], _canary_rows(doc)) == ("in_progress", [(RECONCILING, "Unconfirmed")])
    assert not doc["final"]


async def _answer(obj: FluxObject | None) -> FluxObject | None:
    return obj


@pytest.mark.anyio
async def test_canaries_the_bridge_may_not_see_are_refused_not_read_as_none(
        bridge_factory: BridgeFactory) -> None:
    """RBAC that leaves Canaries (or their workloads) out: the cache holds none, which a wait
    would read as "every canary promoted". The request is refused, saying why."""
    bridge = await bridge_factory(make_settings(statuses={"canaries": {"enabled": True}}))
    delivery = (await _step_push(bridge, _commit(0xD0)))["delivery"]
    bridge.cluster.not_permitted = ["Canary"]
    for url in (f"/deliveries/{delivery}?canaries=true",
                f"/deliveries/{delivery}?canaries=true&wait=5"):
        refused = await bridge.client.get(url, headers=AUTH)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == (
            "canaries cannot be followed: the bridge may not list and watch Canary (RBAC; "
            "see /readyz)")
    # Without canaries the delivery is followed as ever.
    plain = await bridge.client.get(f"/deliveries/{delivery}", headers=AUTH)
    assert plain.status_code == 200 and plain.json()["delivery"] == delivery
