"""A delivery that waits for its canaries: pure rules, then over HTTP (`?canaries=true`)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.delivery.canary_wait import CANARY_ROLE, canary_target, with_canaries
from receiver.delivery.record import DeliveryRecord, RecordTarget
from receiver.delivery.view import DeliveryView, TargetView
from receiver.flux.canary import PHASES
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.flux.revisions import FAILED, QUEUED, READY, RECONCILING, SKIPPED, TIMED_OUT
from tests.conftest import HMAC_TOKEN, Bridge, BridgeFactory, make_settings, until
from tests.delivery.test_verdicts import _commit, _step_push

KS = ObjectKey("Kustomization", "apps", "web")
RECEIVED = 1_786_000_000.0
PICKUP = 60.0


def stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def canary(phase: str, at: float | None, name: str = "web",
           written: float | None = None) -> FluxObject:
    """A Canary whose phase changed at `at` (its Promoted condition, as Flagger writes it) and
    whose status was last written at `written` (Flagger rewrites that on every status write)."""
    status: dict[str, Any] = {"phase": phase}
    if at is not None:
        status["conditions"] = [{"type": "Promoted", "reason": phase, "status": "Unknown",
                                 "lastUpdateTime": stamp(at), "lastTransitionTime": stamp(at)}]
    if written is not None or at is not None:
        status["lastTransitionTime"] = stamp(written if written is not None else at or 0)
    return FluxObject({"kind": "Canary", "metadata": {"name": name, "namespace": "apps"},
                       "spec": {"targetRef": {"kind": "Deployment", "name": name}},
                       "status": status})


def consumer(state: str) -> TargetView:
    return TargetView(KS, "consumer", state)


def ks_ready_at(at: float) -> FluxObject:
    return FluxObject({"kind": "Kustomization", "metadata": {"name": "web", "namespace": "apps"},
                       "status": {"conditions": [{"type": "Ready", "status": "True",
                                                  "lastTransitionTime": stamp(at)}]}})


def workload(changed: float | None, name: str = "web") -> FluxObject:
    """The canary's Deployment, last changed by kustomize-controller at `changed` (its
    managedFields entry; Flagger's and status writes are other entries)."""
    fields: list[dict[str, Any]] = [
        {"manager": "flagger", "operation": "Update", "time": stamp(RECEIVED + 900)},
        {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status",
         "time": stamp(RECEIVED + 900)}]
    if changed is not None:
        fields.append({"manager": "kustomize-controller", "operation": "Apply",
                       "time": stamp(changed)})
    return FluxObject({"apiVersion": "apps/v1", "kind": "Deployment",
                       "metadata": {"name": name, "namespace": "apps", "managedFields": fields}})


def judge(phase: str, at: float | None, state: str = READY, now: float = RECEIVED + 30,
          ready_at: float = RECEIVED + 10, changed: float | None = RECEIVED - 3600
          ) -> TargetView:
    return canary_target(canary(phase, at), consumer(state), ks_ready_at(ready_at), RECEIVED,
                         now, PICKUP, workload(changed))


def test_the_canary_waits_for_its_deploy() -> None:
    assert judge("Succeeded", RECEIVED + 20, state=RECONCILING).state == QUEUED
    assert judge("Succeeded", RECEIVED + 20, state=TIMED_OUT).state == SKIPPED
    assert judge("Succeeded", RECEIVED + 20, state=FAILED).state == SKIPPED


def test_promoted_or_rolled_back_after_the_deploy_ends_it() -> None:
    promoted = judge("Succeeded", RECEIVED + 20)
    assert (promoted.state, promoted.reason) == (READY, "Promoted")
    rolled_back = judge("Failed", RECEIVED + 20)
    assert (rolled_back.state, rolled_back.reason) == (FAILED, "RolledBack")


@pytest.mark.parametrize("phase", ["Progressing", "WaitingPromotion", "Promoting", "Finalising",
                                   "Initializing", "Waiting"])
def test_while_flagger_works_it_goes_on(phase: str) -> None:
    assert judge(phase, RECEIVED + 20).state == RECONCILING


@pytest.mark.parametrize("phase", ["Initialized", "Succeeded"])
def test_a_phase_stamped_in_the_second_of_the_push_is_not_flaggers_answer(phase: str) -> None:
    """Found by the whole-loop test: Flagger's first rollout was stamped in the very second the
    CI job pushed the next release (the push at .725, the phase at .000 of that second), and
    the wait ended "promoted" before Flagger had looked at the release."""
    received = RECEIVED + 0.725
    for ready_at in (RECEIVED - 3600, RECEIVED + 1):  # Ready kept from before, or new
        same_second = canary_target(canary(phase, RECEIVED), consumer(READY),
                                    ks_ready_at(ready_at), received, received + 1, PICKUP,
                                    workload(RECEIVED + 1))
        assert (same_second.state, same_second.reason) == (RECONCILING, "WaitingForFlagger")
    # Stamped in the second the consumer became Ready: not surely after it either.
    with_ready = canary_target(canary(phase, RECEIVED + 1), consumer(READY),
                               ks_ready_at(RECEIVED + 1), received, received + 2, PICKUP,
                               workload(RECEIVED + 1))
    assert with_ready.state == RECONCILING


def test_initialized_answers_only_the_deploy_that_created_the_canary() -> None:
    def initialized(created: float) -> FluxObject:
        old = canary("Initialized", RECEIVED + 20)
        return FluxObject({**old.raw, "metadata": {**old.raw["metadata"],
                                                   "creationTimestamp": stamp(created)}})

    new = canary_target(initialized(RECEIVED + 2), consumer(READY), ks_ready_at(RECEIVED + 10),
                        RECEIVED, RECEIVED + 30, PICKUP, workload(RECEIVED + 2))
    assert (new.state, new.reason) == (READY, "Promoted")
    # A Canary from an earlier release, its phase written again after this deploy.
    older = canary_target(initialized(RECEIVED - 600), consumer(READY), ks_ready_at(RECEIVED + 10),
                          RECEIVED, RECEIVED + 30, PICKUP, workload(RECEIVED + 2))
    assert (older.state, older.reason) == (RECONCILING, "WaitingForFlagger")


def test_a_status_rewrite_after_the_deploy_is_not_a_new_phase() -> None:
    # Found by the whole-loop test: Flagger rewrote the status of a canary Succeeded at the
    # last release after the next deploy, before it noticed the new revision. Only the phase's
    # own change (the Promoted condition) says the canary decided on this deploy.
    rewritten = canary_target(canary("Succeeded", RECEIVED - 120, written=RECEIVED + 20),
                              consumer(READY), ks_ready_at(RECEIVED + 10), RECEIVED,
                              RECEIVED + 30, PICKUP, workload(RECEIVED - 3600))
    assert (rewritten.state, rewritten.reason) == (RECONCILING, "WaitingForFlagger")


def test_a_phase_from_before_the_deploy_waits_for_flagger_then_stands() -> None:
    # Succeeded before the deploy (Kustomization Ready at +10): Flagger has not looked yet.
    early = judge("Succeeded", RECEIVED + 5, now=RECEIVED + 30)
    assert (early.state, early.reason) == (RECONCILING, "WaitingForFlagger")
    # No analysis ever started (the workload did not change): its standing phase decides.
    late = judge("Succeeded", RECEIVED + 5, now=RECEIVED + 10 + PICKUP)
    assert (late.state, late.reason) == (READY, "NoAnalysis")
    still_failed = judge("Failed", RECEIVED - 600, now=RECEIVED + 10 + PICKUP)
    assert still_failed.state == FAILED


@pytest.mark.parametrize("phase", ["Succeeded", "Initialized", "Failed"])
def test_a_deploy_that_changed_the_workload_waits_for_flagger_however_long(phase: str) -> None:
    # The CI gate once said "deployed" when Flagger was slow to start: a time-out is no
    # verdict. The deploy changed the workload (kustomize-controller's field time is after the
    # phase): only Flagger's own decision ends the wait.
    for now in (RECEIVED + 10 + PICKUP, RECEIVED + 10 + 100 * PICKUP):
        view = judge(phase, RECEIVED - 600, now=now, changed=RECEIVED + 8)
        assert (view.state, view.reason) == (RECONCILING, "WaitingForFlagger"), now
    # A workload the cache does not hold, or one without a Flux field manager: cannot tell.
    for unknown in (canary_target(canary(phase, RECEIVED - 600), consumer(READY),
                                  ks_ready_at(RECEIVED + 10), RECEIVED, RECEIVED + 10_000,
                                  PICKUP, None),
                    judge(phase, RECEIVED - 600, now=RECEIVED + 10_000, changed=None)):
        assert (unknown.state, unknown.reason) == (RECONCILING, "WaitingForFlagger")


@given(phase=st.sampled_from([*PHASES, "", "Other"]),
       changed=st.one_of(st.none(), st.floats(RECEIVED - 1000, RECEIVED + 1000)),
       ready_after=st.floats(0, 500), now_after=st.floats(0, 2000),
       state=st.sampled_from([READY, RECONCILING, QUEUED, FAILED, TIMED_OUT, SKIPPED]),
       applied=st.one_of(st.none(), st.floats(RECEIVED - 1000, RECEIVED + 500)))
def test_never_ready_on_a_phase_older_than_the_deploy_within_the_pickup(
        phase: str, changed: float | None, ready_after: float, now_after: float,
        state: str, applied: float | None) -> None:
    now = RECEIVED + now_after
    view = canary_target(canary(phase, changed), consumer(state),
                         ks_ready_at(RECEIVED + ready_after), RECEIVED, now, PICKUP,
                         workload(applied))
    since = RECEIVED + ready_after
    if view.state == READY:
        assert state == READY and phase in ("Succeeded", "Initialized")
        # Surely after the push and the Ready transition, by the whole seconds Kubernetes
        # stamps (the test's canaries are older than the push: Initialized never counts).
        stamped = int(changed) if changed is not None else None
        fresh = (stamped is not None and stamped >= RECEIVED and stamped > int(since)
                 and phase != "Initialized")
        # Not decided after the deploy: only a phase newer than the workload's last change
        # by Flux stands, and only after the pickup.
        seen = changed is not None and applied is not None and int(changed) > int(applied)
        assert fresh or (seen and now >= since + PICKUP)
    if state != READY:
        assert view.state in (QUEUED, SKIPPED)
    if phase == "Failed" and state == READY:
        assert view.state in (FAILED, RECONCILING)


def test_only_the_consumers_canaries_are_added() -> None:
    record = DeliveryRecord("flux-system/hmac", "a" * 40, "refs/heads/main", RECEIVED, "m",
                            (RecordTarget(KS, "consumer"),))
    labels = {"kustomize.toolkit.fluxcd.io/name": "web",
              "kustomize.toolkit.fluxcd.io/namespace": "apps"}
    objects = {o.key: o for o in [
        ks_ready_at(RECEIVED + 1),
        FluxObject({"kind": "Deployment", "metadata": {"name": "web", "namespace": "apps",
                                                       "labels": labels}}),
        FluxObject({"kind": "Deployment", "metadata": {"name": "other", "namespace": "apps",
                                                       "labels": {"app": "other"}}})]}
    view = DeliveryView((consumer(READY),))
    ours, theirs = canary("Progressing", RECEIVED + 2), canary("Failed", RECEIVED + 2, "other")
    out = with_canaries(view, record, [ours, theirs], objects.get, RECEIVED + 3, PICKUP)
    assert [(t.key.name, t.role, t.state) for t in out.targets] == [
        ("web", "consumer", READY), ("web", CANARY_ROLE, RECONCILING)]
    assert out.outcome() == "in_progress"
    assert with_canaries(view, record, [theirs], objects.get, RECEIVED + 3, PICKUP) == view


# -- over HTTP -----------------------------------------------------------------------------------

async def _canary_bridge(bridge_factory: BridgeFactory) -> Bridge:
    settings = make_settings(statuses={"canaries": {"enabled": True}},
                             deliveries={"canary_pickup_seconds": 600})
    result: Bridge = await bridge_factory(settings)
    return result


def _lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.anyio
@pytest.mark.parametrize(("phase", "outcome"), [("Succeeded", "ready"), ("Failed", "failed")])
async def test_the_wait_ends_when_the_canary_is_promoted_or_rolled_back(
        bridge_factory: BridgeFactory, phase: str, outcome: str) -> None:
    bridge = await _canary_bridge(bridge_factory)
    sha = _commit(0xC4)
    first = await _step_push(bridge, sha)
    delivery = first["delivery"]
    auth = {"Authorization": f"Bearer {HMAC_TOKEN}"}
    doc = (await bridge.client.get(f"/deliveries/{delivery}", headers=auth)).json()
    consumers = [ObjectKey(t["kind"], t["namespace"], t["name"]) for t in doc["targets"]
                 if t["kind"] in ("Kustomization", "HelmRelease")]
    assert consumers, doc
    owner = next(k for k in consumers if k.kind == "Kustomization")
    # The workload the owner applied, and the Canary on it, as Flux and Flagger leave them.
    bridge.cluster.apply({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": "web", "namespace": "apps", "labels": {
            "kustomize.toolkit.fluxcd.io/name": owner.name,
            "kustomize.toolkit.fluxcd.io/namespace": owner.namespace}}})
    bridge.cluster.apply({"apiVersion": "flagger.app/v1beta1", "kind": "Canary", "metadata": {
        "name": "web", "namespace": "apps"}, "spec": {"targetRef": {
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}}})
    key = ObjectKey("Canary", "apps", "web")
    bridge.cluster.mark_canary(key, "Succeeded", at=time.time() - 3600)  # the last release
    source = ObjectKey("GitRepository", "flux-system", "flux-system")
    bridge.cluster.mark_source_fetched(source, f"main@sha1:{sha}")
    for target in consumers:
        bridge.cluster.mark_applied(
            target, f"6.5.0+{sha[:12]}" if target.kind == "HelmRelease" else f"main@sha1:{sha}")
    # Without canaries the delivery is ready now; with them it is not, until Flagger decides.
    plain = (await bridge.client.get(f"/deliveries/{delivery}?wait=5", headers=auth)).text
    assert _lines(plain)[-1]["outcome"] == "ready"
    waiting = (await bridge.client.get(f"/deliveries/{delivery}?canaries=true",
                                       headers=auth)).json()
    canary_rows = [t for t in waiting["targets"] if t["role"] == "canary"]
    assert waiting["outcome"] == "in_progress"
    assert [(t["name"], t["state"], t["detail"]["reason"]) for t in canary_rows] == [
        ("web", "reconciling", "WaitingForFlagger")]
    assert canary_rows[0]["apiVersion"] == "flagger.app/v1beta1"
    # A CI job waits; Flagger starts the analysis, then decides, while it waits.
    url = f"/deliveries/{delivery}?wait=30&canaries=true"
    job = asyncio.create_task(bridge.client.get(url, headers=auth))
    await until(lambda: bridge.parts.follow.changes.waiting > 0, what="the job waiting")
    bridge.cluster.mark_canary(key, "Progressing", weight=20)
    # Flagger decides at its next interval: seconds after the deploy, never in its second.
    bridge.cluster.mark_canary(key, phase, at=time.time() + 2)
    lines = _lines((await job).text)
    assert lines[0]["outcome"] == "in_progress"
    last = lines[-1]
    assert last["outcome"] == outcome and not last.get("timeout"), last
    (row,) = [t for t in last["targets"] if t["role"] == "canary"]
    assert (row["state"], row["detail"]["reason"]) == (
        (READY, "Promoted") if phase == "Succeeded" else (FAILED, "RolledBack"))


@pytest.mark.anyio
async def test_canaries_must_be_enabled_and_spelled_true_or_false(bridge: Bridge) -> None:
    sha = _commit(0xC5)
    first = await _step_push(bridge, sha)
    auth = {"Authorization": f"Bearer {HMAC_TOKEN}"}
    off = await bridge.client.get(f"/deliveries/{first['delivery']}?canaries=true", headers=auth)
    assert off.status_code == 400 and "not enabled" in off.json()["error"]
    odd = await bridge.client.get(f"/deliveries/{first['delivery']}?canaries=yes", headers=auth)
    assert odd.status_code == 400
