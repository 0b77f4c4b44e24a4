"""What the performance work changed, kept honest: a compact stored delivery, one task for the
evaluations a change causes, time-sliced. Behaviour only; timings are benchmarks' business."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import pytest

from receiver.delivery import reconcile
from receiver.delivery.store import Delivery
from receiver.flux.objects import ObjectKey
from receiver.flux.revisions import QUEUED, TIMED_OUT
from tests import gitea_payloads as gp
from tests.conftest import Bridge, BridgeFactory, make_settings, until
from tests.web.test_ingest import SOURCE, app_push, post_gitea

pytestmark = pytest.mark.anyio


async def test_a_stored_delivery_counts_unrelated_objects_without_listing_them(
        bridge: Bridge) -> None:
    r = await post_gitea(bridge, app_push("clusters/eu-west/apps/podinfo.yaml"))
    assert r.status_code == 202, r.text
    delivery = bridge.parts.deliveries.get(r.json()["delivery"])
    assert delivery.plan.unrelated == frozenset()
    assert delivery.plan.unrelated_count == r.json()["skipped_unrelated"]
    # The reply to a push that joins the delivery is the same as the first reply.
    again = await post_gitea(bridge, app_push("clusters/eu-west/apps/podinfo.yaml"))
    assert again.json()["skipped_unrelated"] == r.json()["skipped_unrelated"]
    assert again.json()["skipped"] == r.json()["skipped"]


def test_plan_compact_keeps_the_reply() -> None:
    from receiver.push.routing import Plan

    key = ObjectKey("GitRepository", "ns", "other")
    ours = ObjectKey("GitRepository", "ns", "ours")
    plan = Plan("ns/hook", (), (), (), listed=frozenset({key, ours}), related=frozenset({ours}))
    assert plan.unrelated == frozenset({key})
    assert plan.as_dict()["skipped_unrelated"] == 1
    compact = plan.compact()
    assert compact.as_dict() == plan.as_dict()
    assert compact.unrelated == frozenset()
    assert compact.compact().as_dict() == plan.as_dict()


def test_an_organisation_wide_receiver_costs_a_push_only_what_the_push_concerns() -> None:
    """A Receiver that lists every GitRepository and Kustomization by label: a push's plan
    shares the Receiver's resolved set and adds only the few objects of the pushed repository
    (it used to build the set of all the others, and list every object for input providers,
    on every push: 3 ms at 12,000 objects)."""
    from receiver.flux.memory import MemoryCluster
    from receiver.flux.store import ObjectStore
    from receiver.push.package_routing import plan_selection
    from receiver.push.resources import resolve_resources
    from receiver.push.selector import select_payload

    labels = {"team": "all"}
    docs: list[dict[str, Any]] = []
    for i in range(300):
        docs.append({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
                     "metadata": {"name": f"repo-{i}", "namespace": "flux-system",
                                  "labels": labels},
                     "spec": {"url": f"https://gitea.example.com/org/repo-{i}.git",
                              "ref": {"branch": "main"}}})
        docs.append({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                     "metadata": {"name": f"app-{i}", "namespace": "flux-system",
                                  "labels": labels},
                     "spec": {"path": "./apps", "sourceRef": {"kind": "GitRepository",
                                                              "name": f"repo-{i}"}}})
    docs.append({"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
                 "metadata": {"name": "org", "namespace": "flux-system"},
                 "spec": {"type": "generic", "secretRef": {"name": "org"}, "resources": [
                     {"kind": "GitRepository", "name": "*", "matchLabels": labels},
                     {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                      "name": "*", "matchLabels": labels}]}})
    store = ObjectStore(lambda url: url.removesuffix(".git"))
    MemoryCluster(store).load(docs)
    receiver = store.get(ObjectKey("Receiver", "flux-system", "org"))
    assert receiver is not None
    resolved = resolve_resources(receiver, store)
    assert len(resolved.keys) == 600 and resolved.providers == ()
    push = gp.gitea_bytes(gp.push("org/repo-7", "refs/heads/main", [gp.commit(
        "org/repo-7", "change", modified=["apps/deployment.yaml"],
        root="https://gitea.example.com/")], root="https://gitea.example.com/"))
    plan = plan_selection(receiver, select_payload("generic", push), store, resolved=resolved)
    assert [t.name for t in plan.targets] == ["repo-7", "app-7"]
    assert plan.listed is resolved.keys  # shared, not copied
    assert len(plan.related) == 2
    assert plan.as_dict()["skipped_unrelated"] == 598
    assert len(plan.unrelated) == 598  # still there for `plan`, built only when asked


async def test_a_delivery_takes_a_view_only_when_a_target_changed(bridge: Bridge) -> None:
    r = await post_gitea(bridge, app_push("clusters/eu-west/apps/podinfo.yaml"))
    delivery: Delivery = bridge.parts.deliveries.get(r.json()["delivery"])
    view = type(delivery.view)(tuple(
        type(t)(t.key, t.role, QUEUED if t.state != QUEUED else "annotated")
        for t in delivery.view.targets))
    assert delivery.update(view) == list(view.targets)
    assert delivery.view is view
    same = type(view)(tuple(view.targets))
    assert delivery.update(same) == [] and delivery.view is view


async def test_one_change_evaluates_every_follower_in_slices(bridge: Bridge, monkeypatch: Any) -> None:
    monkeypatch.setattr(reconcile, "EVALUATION_SLICE", 0.0)  # yield after every evaluation
    ids = []
    for n in range(40):
        doc = gp.push("platform/fleet", "refs/heads/main", [gp.commit(
            "platform/fleet", f"change {n}", modified=["clusters/eu-west/apps/podinfo.yaml"])])
        r = await post_gitea(bridge, doc)
        assert r.status_code == 202, r.text
        ids.append(r.json()["delivery"])
    deliveries = [bridge.parts.deliveries.get(i) for i in ids]
    tasks_before = len(bridge.parts.reconciler._tasks)
    # Flux fetches the last commit: one change of the source, every delivery re-evaluated.
    last = deliveries[-1].sha
    bridge.cluster.mark_source_fetched(SOURCE, f"main@sha1:{last}")
    assert len(bridge.parts.reconciler._tasks) <= tasks_before + 1
    await until(lambda: deliveries[-1].view.get(SOURCE).state == "ready", what="last ready")
    # Every other delivery saw the change too (its view was computed again after it).
    await until(lambda: all(d.view.get(SOURCE).state != QUEUED for d in deliveries),
                what="every follower evaluated")


async def test_the_time_outs_of_pushes_under_a_millisecond_apart_are_swept_together(
        bridge_factory: BridgeFactory, monkeypatch: Any) -> None:
    """Eighty pushes received about half a millisecond apart time out within 40 ms: the sweeper
    never sleeps less than `SWEEP_EVERY` and sweeps what fell due meanwhile. Sleeping until each
    deadline, it woke once per push, and again and again when uvloop fired a sub-millisecond
    timer early (each wake a timer and a turn of the loop)."""
    timeout = 0.3
    bridge = await bridge_factory(make_settings(reconcile={
        "source_timeout_seconds": timeout, "consumer_timeout_seconds": timeout}))
    real_sleep = asyncio.sleep
    naps: list[float] = []

    async def counted_sleep(delay: float, result: Any = None) -> Any:
        if sys._getframe(1).f_code is reconcile.Reconciler._sweep.__code__:
            naps.append(delay)
        return await real_sleep(delay, result)

    monkeypatch.setattr(reconcile.asyncio, "sleep", counted_sleep)
    start = time.time()
    readings = iter(start + n / 4000 for n in range(10_000))  # each reading 0.25 ms on
    bridge.parts.ingest.wall_clock = lambda: next(readings)
    deliveries = []
    for n in range(80):
        r = await post_gitea(bridge, app_push(f"clusters/eu-west/apps/sweep-{n}.yaml"))
        assert r.status_code == 202, r.text
        deliveries.append(bridge.parts.deliveries.get(r.json()["delivery"]))
    await until(lambda: all(d.view.get(SOURCE).state == TIMED_OUT for d in deliveries),
                timeout + 10.0, "every push timed out")
    # Unswept: a sleep until each next deadline, half a millisecond on (how many such sleeps
    # there are depends on how fast this machine posts, so only their length is held here).
    assert naps and min(naps) >= reconcile.SWEEP_EVERY, f"the sweeper slept {min(naps)} s"
