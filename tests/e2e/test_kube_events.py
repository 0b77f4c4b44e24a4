"""Kubernetes Events against a real kube-apiserver, written as the chart's ServiceAccount (its
RBAC: create and patch events): the Events a user reads with `kubectl describe`, and a flood
of 1,000 pushes costing the API server a bounded number of writes, counted in its audit log."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from kubernetes.dynamic import DynamicClient

from receiver.flux.event_book import EventBook
from receiver.web.ratelimit import RateLimiter
from tests import gitea_payloads as gp
from tests.conftest import until
from tests.e2e.realk8s import ControlPlane, ControlPlaneError, audit_policy, ensure_binaries
from tests.e2e.test_real_k8s import (
    RELEASE_NS,
    Admin,
    gitea_headers,
    gitea_push,
    install,
    make_fleet,
    run_bridge,
)

pytestmark = [pytest.mark.realk8s, pytest.mark.anyio]
NS = "events-a"
FLOOD = 1000
PATCH_INTERVAL = 2.0  # the product patches a repeat every 30 s; a test need not wait that long


@pytest.fixture(scope="module")
def audited() -> Iterator[ControlPlane]:
    """A control plane whose audit log records every create and patch of a core object."""
    try:
        plane = ControlPlane(ensure_binaries(),
                             audit_policy=audit_policy(groups=("",), verbs=("create", "patch")))
        plane.start()
    except ControlPlaneError as exc:
        pytest.fail(f"the control plane did not start: {exc}", pytrace=False)
    try:
        yield plane
    finally:
        plane.stop()


def event_list(admin: Admin, namespace: str) -> list[dict[str, Any]]:
    answer = admin.core.list_namespaced_event(namespace, _preload_content=False)
    items: list[dict[str, Any]] = json.loads(answer.data)["items"]
    return items


def find(admin: Admin, reason: str, kind: str, name: str) -> list[dict[str, Any]]:
    return [e for e in event_list(admin, NS) if e["reason"] == reason
            and e["involvedObject"]["kind"] == kind and e["involvedObject"]["name"] == name]


async def test_events_are_written_and_a_flood_costs_a_bounded_number_of_writes(
        audited: ControlPlane) -> None:
    api = audited.api_client()
    admin = Admin(audited, api, kubernetes.client.CoreV1Api(api),
                  kubernetes.client.CustomObjectsApi(api),
                  DynamicClient(api))  # type: ignore[no-untyped-call]
    installed = install(admin, "ev")
    user = f"system:serviceaccount:{RELEASE_NS}:{installed.service_account}"
    hook = make_fleet(admin, NS)
    async with run_bridge(audited, installed.token, lease_name="ev-gitea-flux-bridge-resync"
                          ) as bridge:
        await bridge.wait_ready()
        parts = bridge.app.state.parts
        parts.recorder.book = EventBook(patch_interval=PATCH_INTERVAL)
        parts.ingest.rate = RateLimiter(1e6, 10 * FLOOD)  # the flood is the point here

        body, sha = gitea_push("clusters/realk8s/apps/app.yaml", message="one")
        await bridge.push(hook, body)
        (accepted,) = await until(lambda: find(admin, "PushAccepted", "Receiver", "gitea"),
                                  60, "PushAccepted on the Receiver", in_thread=True)
        assert accepted["type"] == "Normal" and sha[:12] in accepted["message"]
        assert accepted["reportingComponent"] == "gitea-flux-bridge"
        (requested,) = await until(
            lambda: find(admin, "ReconcileRequested", "GitRepository", "fleet"), 60,
            "ReconcileRequested on the GitRepository", in_thread=True)
        assert f"Receiver {NS}/gitea" in requested["message"]

        writes_before = count_event_writes(audited, user)
        started = time.monotonic()
        for i in range(1, FLOOD + 1):  # pushes of a repository no source follows: 202, []
            doc = gp.push("someone/elsewhere", commits=[gp.commit("someone/elsewhere", f"{i}")])
            flood = gp.gitea_bytes(doc)
            reply = await bridge.client.post(hook, content=flood, headers=gitea_headers(flood))
            assert reply.status_code == 202 and reply.json()["targets"] == []
            if i % (FLOOD // 5) == 0:
                # A flood that lasts: the one Event keeps up, patched (not created again).
                (warning,) = await until(
                    lambda n=i: [e for e in find(admin, "PushMatchedNothing", "Receiver", "gitea")
                                 if e["count"] == n] or None, 120,
                    f"one Warning counting {i} pushes", in_thread=True)
        elapsed = time.monotonic() - started
        assert warning["type"] == "Warning"
    writes = count_event_writes(audited, user) - writes_before
    # One create, then a patch at most every PATCH_INTERVAL: five checkpoints, five writes.
    print(f"\n  {FLOOD} pushes in {elapsed:.1f}s: {writes} Event writes (audit log)")
    assert 5 <= writes <= 2 + elapsed / PATCH_INTERVAL
    assert writes <= 10 + elapsed / 60.0


def count_event_writes(plane: ControlPlane, user: str) -> int:
    return sum(1 for e in plane.audit_events()
               if e.get("verb") in ("create", "patch")
               and (e.get("user") or {}).get("username") == user
               and (e.get("objectRef") or {}).get("resource") == "events"
               and (e.get("objectRef") or {}).get("namespace") == NS)
