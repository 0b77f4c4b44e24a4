"""Flagger canaries through the status service: the memory cluster plays Flux and Flagger, the
fake Gitea shows what a reviewer would see, and Flagger's webhooks are asked over HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import ObjectKey
from receiver.status.service import StatusService
from receiver.web.app import flagger_routes, status_endpoints
from receiver.web.flagger import FlaggerEndpoint
from tests.fakegitea import FakeGitea
from tests.status.test_status_service import (
    GITEA_TOKEN,
    HMAC,
    REPO,
    SHA,
    SOURCE,
    WEBAPP,
    Rig,
    eventually,
    fixture,
    http_client,
    make_settings,
    rig,
)

CANARY = ObjectKey("Canary", "apps", "webapp")
CANARY_CONTEXT = "flagger/eu-west/apps/webapp"
FLEET = "flux/fleet"
TOKEN = "flagger-webhook-token"
GATE = ["flux/env/staging", "approve/production"]


def canary_settings(**fleet: Any) -> Any:
    statuses: dict[str, Any] = {
        "resync_interval_seconds": 3600,
        # Every gate question and repair reads Gitea afresh (statuses change behind our back).
        "repeat_window_seconds": 0,
        "canaries": {"enabled": True, "webhook_token": {"secret": "flagger/webhook"},
                     "gates": {"production": {"require": GATE}}}}
    if fleet:
        statuses["fleet"] = {"enabled": True, "clusters": ["eu-west"], **fleet}
    return make_settings(statuses=statuses)


def flagger_objects(labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    owner = {"kustomize.toolkit.fluxcd.io/name": "webapp",
             "kustomize.toolkit.fluxcd.io/namespace": "apps"}
    return [
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "webhook", "namespace": "flagger"},
         "stringData": {"token": TOKEN}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": "webapp", "namespace": "apps",
                      "labels": owner if labels is None else labels},
         "spec": {"template": {"spec": {"containers": [{"name": "web", "image": "x"}]}}}},
        {"apiVersion": "flagger.app/v1beta1", "kind": "Canary",
         "metadata": {"name": "webapp", "namespace": "apps"},
         "spec": {"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                "name": "webapp"},
                  "analysis": {"interval": "1m", "threshold": 2, "maxWeight": 50,
                               "stepWeight": 10}}},
    ]


@asynccontextmanager
async def canary_rig(labels: dict[str, str] | None = None, **fleet: Any) -> AsyncIterator[Rig]:
    def setup(cluster: MemoryCluster) -> None:
        cluster.load(flagger_objects(labels))
        # Applied a few seconds ago: Flagger's phases set now are surely after it (Kubernetes
        # stamps whole seconds; one in the apply's second may be from before it).
        cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}", at=time.time() - 5)

    # Gitea stamps statuses with the wall clock the fleet check compares them with.
    gitea = FakeGitea(token=GITEA_TOKEN, clock=time.time)
    async with rig(canary_settings(**fleet), setup=setup,
                   fakes={"gitea.example.com": gitea}) as r:
        yield r


def flagger_client(service: StatusService) -> httpx.AsyncClient:
    events, _ = status_endpoints(service)
    endpoint = FlaggerEndpoint(service.settings, service.canaries, service.secrets)
    app = Starlette(routes=[Route("/events", events.handle, methods=["POST"]),
                            *flagger_routes(endpoint)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bridge")


def webhook(token: str = TOKEN, **metadata: str) -> dict[str, Any]:
    return {"name": "webapp", "namespace": "apps", "phase": "Progressing",
            "checksum": "abc", "metadata": {"token": token, **metadata}}


def shows(gitea: FakeGitea, context: str = CANARY_CONTEXT) -> tuple[str, str] | None:
    latest = gitea.latest(*REPO, context)
    return None if latest is None else (latest["status"], latest["description"])


def canary_posts(gitea: FakeGitea) -> list[str]:
    return [body["state"] for *_, body in gitea.posts if body["context"] == CANARY_CONTEXT]


@pytest.mark.anyio
async def test_progress_promotion_and_success_show_on_the_commit() -> None:
    async with canary_rig() as r:
        r.cluster.mark_canary(CANARY, "Progressing", weight=30)
        await eventually(lambda: shows(r.gitea) == ("pending", "canary 30%, check 3/5"))
        r.cluster.mark_canary(CANARY, "WaitingPromotion", weight=50)
        await eventually(lambda: shows(r.gitea) == (
            "pending", "Canary analysis passed, waiting for promotion"))
        r.cluster.mark_canary(CANARY, "Succeeded")
        await eventually(lambda: shows(r.gitea) == ("success", "Canary promoted"))
        await eventually(lambda: r.service.queue_depth == 0)
        assert canary_posts(r.gitea) == ["pending", "pending", "success"]


@pytest.mark.anyio
async def test_a_rollback_names_the_failed_check_from_flaggers_event() -> None:
    async with canary_rig() as r:
        client = flagger_client(r.service)
        r.cluster.mark_canary(CANARY, "Progressing", weight=10, failed_checks=1)
        await eventually(lambda: shows(r.gitea) is not None)
        message = "Halt webapp.apps advancement external check load-test failed 500"
        reply = await client.post("/flagger/events", json=webhook(
            eventMessage=message, eventType="Warning"))
        assert reply.status_code == 202
        r.cluster.mark_canary(CANARY, "Failed")
        await eventually(lambda: shows(r.gitea) == ("failure", "Canary rolled back: load-test"))


def fleet_posts(gitea: FakeGitea, sha: str = SHA) -> list[str]:
    return [body["state"] for *_, at, body in gitea.posts
            if at == sha and body["context"] == FLEET]


def first_post(gitea: FakeGitea, context: str, state: str, sha: str = SHA) -> int | None:
    return next((i for i, (*_, at, body) in enumerate(gitea.posts) if at == sha
                 and body["context"] == context and body["state"] == state), None)


WAITING = ("pending", "Canary waiting for Flagger to start the analysis")


@pytest.mark.anyio
async def test_a_rollback_after_the_kustomization_success_fails_the_fleet() -> None:
    async with canary_rig(stale_after_seconds=3600) as r:
        client = flagger_client(r.service)
        sent = await client.post("/events", content=fixture("kustomization-succeeded.json"),
                                  headers=signed(fixture("kustomization-succeeded.json")))
        assert sent.status_code == 202
        # Applied, but Flagger has not looked yet: the canary, and so the fleet, wait.
        await eventually(lambda: r.gitea.contexts(*REPO).get(FLEET) == "pending")
        assert shows(r.gitea) == WAITING
        r.cluster.mark_canary(CANARY, "Progressing", weight=10)
        await eventually(lambda: shows(r.gitea) == ("pending", "canary 10%, check 1/5"))
        r.cluster.mark_canary(CANARY, "Failed")
        await eventually(lambda: r.gitea.contexts(*REPO).get(FLEET) == "failure")
        assert r.gitea.contexts(*REPO)["flux/eu-west/kustomization/apps/webapp"] == "success"
        assert r.gitea.contexts(*REPO)[CANARY_CONTEXT] == "failure"
        assert "success" not in fleet_posts(r.gitea)


@pytest.mark.anyio
async def test_the_fleet_waits_for_flagger_after_the_kustomization_succeeds() -> None:
    """The event of a Kustomization's success comes before the cache shows its apply and long
    before Flagger's next interval: Gitea must show `pending` on the fleet and the canary, never
    `success`, until Flagger promotes that commit."""
    older = "1" * 40
    async with canary_rig(stale_after_seconds=3600) as r:
        client = flagger_client(r.service)
        now = time.time()
        r.cluster.mark_applied(WEBAPP, f"main@sha1:{older}", at=now - 600)
        r.cluster.mark_canary(CANARY, "Succeeded", at=now - 300)  # the last release
        await eventually(lambda: (found := r.gitea.latest("team", "webapp", older, FLEET))
                         is not None and found["status"] == "success")
        body = fixture("kustomization-succeeded.json").replace(  # sent as it happens
            b"2026-08-07T13:04:05Z", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode())
        sent = await client.post("/events", content=body, headers=signed(body))
        assert sent.status_code == 202 and sent.json()["statuses"] == 2
        await eventually(lambda: r.gitea.contexts(*REPO).get(
            "flux/eu-west/kustomization/apps/webapp") == "success")
        await eventually(lambda: r.gitea.contexts(*REPO).get(FLEET) == "pending")
        assert shows(r.gitea) == WAITING
        # The watch catches up with the apply; Flagger still has not moved.
        r.cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}")
        r.cluster.mark_canary(CANARY, "Succeeded", at=now - 300)  # a rewrite, not a phase
        assert await r.service.resync_once() >= 0
        await eventually(lambda: r.service.queue_depth == 0 and not r.service.fleet.checks)
        assert (r.gitea.contexts(*REPO).get(FLEET), shows(r.gitea)) == ("pending", WAITING)
        # Flagger's next interval, seconds after the apply.
        r.cluster.mark_canary(CANARY, "Progressing", weight=20, at=now + 10)
        await eventually(lambda: shows(r.gitea) == ("pending", "canary 20%, check 2/5"))
        r.cluster.mark_canary(CANARY, "Succeeded", at=now + 20)
        await eventually(lambda: r.gitea.contexts(*REPO).get(FLEET) == "success")
        assert shows(r.gitea) == ("success", "Canary promoted")
        # Gitea never showed the fleet `success` before the canary's.
        promoted = first_post(r.gitea, CANARY_CONTEXT, "success")
        deployed = first_post(r.gitea, FLEET, "success")
        assert promoted is not None and deployed is not None and promoted < deployed
        assert fleet_posts(r.gitea) == ["pending", "success"]


@pytest.mark.anyio
async def test_a_late_event_of_an_earlier_apply_leaves_that_commits_canary_alone() -> None:
    older = "1" * 40
    async with canary_rig() as r:
        client = flagger_client(r.service)
        r.cluster.mark_canary(CANARY, "Succeeded")  # after the apply of SHA (now)
        await eventually(lambda: shows(r.gitea) == ("success", "Canary promoted"))
        # notification-controller delivers, late, the event of an earlier commit's apply
        # (its timestamp is months before the apply the cache shows).
        body = fixture("kustomization-succeeded.json").replace(SHA.encode(), older.encode())
        assert b"2026-08-07T13:04:05Z" in body
        sent = await client.post("/events", content=body, headers=signed(body))
        assert sent.status_code == 202 and sent.json()["statuses"] == 1
        await eventually(lambda: r.gitea.latest("team", "webapp", older,
                                                "flux/eu-west/kustomization/apps/webapp")
                         is not None)
        await eventually(lambda: r.service.queue_depth == 0)
        assert r.gitea.latest("team", "webapp", older, CANARY_CONTEXT) is None
        assert shows(r.gitea) == ("success", "Canary promoted")


@pytest.mark.anyio
async def test_a_re_reconcile_that_left_the_workload_keeps_the_progress() -> None:
    """Flux re-applies the commit under analysis (Ready changes, the workload does not): the
    progress stays on the commit without waiting for Flagger's next phase."""
    async with canary_rig() as r:
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 120))
        r.cluster.apply({**flagger_objects()[1], "metadata": {
            **flagger_objects()[1]["metadata"], "managedFields": [
                {"manager": "kustomize-controller", "operation": "Apply", "time": stamp},
                {"manager": "flagger", "operation": "Update", "time": "2099-01-01T00:00:00Z"},
                {"manager": "kube-controller-manager", "operation": "Update",
                 "subresource": "status", "time": "2099-01-01T00:00:00Z"}]}})
        r.cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}", at=now - 100)
        r.cluster.mark_canary(CANARY, "Progressing", weight=10, at=now - 60)
        await eventually(lambda: shows(r.gitea) == ("pending", "canary 10%, check 1/5"))
        r.cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}", at=now)  # re-reconciled
        r.cluster.mark_canary(CANARY, "Progressing", weight=20, at=now - 60)
        await eventually(lambda: shows(r.gitea) == ("pending", "canary 20%, check 2/5"))
        await eventually(lambda: r.service.queue_depth == 0)
        assert WAITING[1] not in [body["description"] for *_, body in r.gitea.posts]


@pytest.mark.anyio
async def test_environments_aggregate_their_clusters() -> None:
    envs = [{"name": "staging", "clusters": ["eu-west"]}]
    async with canary_rig(environments=envs) as r:
        r.cluster.mark_canary(CANARY, "Succeeded")
        await eventually(lambda: r.gitea.contexts(*REPO).get("flux/env/staging") == "success")
        assert r.gitea.contexts(*REPO)[FLEET] == "success"


def signed(body: bytes) -> dict[str, str]:
    from receiver.signatures import hmac_hex

    return {"Content-Type": "application/json",
            "X-Signature": "sha256=" + hmac_hex("sha256", HMAC, body)}


@pytest.mark.anyio
async def test_a_canary_whose_commit_cannot_be_told_says_so_and_posts_nothing() -> None:
    async with canary_rig(labels={"app": "webapp"}) as r:
        client = flagger_client(r.service)
        r.cluster.mark_canary(CANARY, "Succeeded")
        await eventually(lambda: CANARY in r.service.canaries.unknown)
        assert "no kustomize.toolkit.fluxcd.io" in r.service.canaries.unknown[CANARY]
        reply = await client.post("/flagger/gates/production", json=webhook())
        assert reply.status_code == 409
        assert "no kustomize.toolkit.fluxcd.io" in reply.json()["error"]
        await eventually(lambda: r.service.queue_depth == 0)
        assert canary_posts(r.gitea) == []


@pytest.mark.anyio
async def test_the_gate_opens_when_gitea_shows_every_required_status() -> None:
    async with canary_rig() as r:
        client = flagger_client(r.service)
        r.cluster.mark_canary(CANARY, "WaitingPromotion")
        reply = await client.post("/flagger/gates/production", json=webhook())
        assert reply.status_code == 403
        assert "no status flux/env/staging, approve/production" in reply.json()["error"]
        r.gitea.add(*REPO, "flux/env/staging", "success")
        r.gitea.add(*REPO, "approve/production", "pending")
        reply = await client.post("/flagger/gates/production", json=webhook())
        assert (reply.status_code, "approve/production is pending" in reply.json()["error"]) \
            == (403, True)
        no_rollback = await client.post("/flagger/gates/production/rollback", json=webhook())
        assert no_rollback.status_code == 403
        r.gitea.add(*REPO, "approve/production", "success")
        reply = await client.post("/flagger/gates/production", json=webhook())
        assert reply.status_code == 200 and reply.json()["answer"] is True
        r.gitea.add(*REPO, "approve/production", "failure")
        rollback = await client.post("/flagger/gates/production/rollback", json=webhook())
        assert rollback.status_code == 200


@pytest.mark.anyio
async def test_webhooks_are_refused_without_the_token_or_over_the_limit() -> None:
    async with canary_rig() as r:
        client = flagger_client(r.service)
        reads = r.gitea.gets
        for body in (webhook(token="wrong"), webhook(token=""),
                     {"name": "webapp", "namespace": "apps", "metadata": {}}):
            reply = await client.post("/flagger/gates/production", json=body)
            assert reply.status_code == 401
        big = json.dumps(webhook(pad="x" * 70_000)).encode()
        reply = await client.post("/flagger/gates/production", content=big,
                                  headers={"Content-Type": "application/json"})
        assert reply.status_code == 413
        unknown = await client.post("/flagger/gates/nope", json=webhook())
        assert unknown.status_code == 404
        assert r.gitea.gets == reads  # nothing refused ever reached Gitea
        event = await client.post("/flagger/events", json=webhook(
            token="wrong", eventMessage="Halt webapp.apps advancement external check x failed"))
        assert event.status_code == 401 and CANARY not in r.service.canaries.failed_checks


@pytest.mark.anyio
async def test_the_resync_repairs_a_canary_status_gitea_lost() -> None:
    async with canary_rig() as r:
        r.cluster.mark_canary(CANARY, "Succeeded")
        await eventually(lambda: shows(r.gitea) == ("success", "Canary promoted"))
        await eventually(lambda: r.service.queue_depth == 0)
        r.gitea.statuses.clear()  # lost behind the bridge's back
        assert await r.service.resync_once() >= 1
        await eventually(lambda: shows(r.gitea) == ("success", "Canary promoted"))


@pytest.mark.anyio
async def test_a_new_commit_does_not_inherit_the_last_canary_verdict() -> None:
    newer = "2" * 40
    async with canary_rig() as r:
        now = time.time()
        r.cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}", at=now - 300)
        r.cluster.mark_canary(CANARY, "Succeeded", at=now - 120)
        await eventually(lambda: shows(r.gitea) == ("success", "Canary promoted"))
        # Flux applies a newer commit; Flagger has not looked at it yet.
        r.cluster.mark_applied(WEBAPP, f"main@sha1:{newer}", at=now - 60)
        r.cluster.mark_canary(CANARY, "Succeeded", at=time.time() - 120)  # a status rewrite
        assert await r.service.resync_once() >= 0
        await eventually(lambda: r.service.queue_depth == 0)
        posted = [body["state"] for *_, sha, body in r.gitea.posts
                  if sha == newer and body["context"] == CANARY_CONTEXT]
        assert posted == ["pending"]  # waiting for Flagger, never the last release's success
        found = r.gitea.latest("team", "webapp", newer, CANARY_CONTEXT)
        assert found is not None and found["description"] == WAITING[1]
        # Flagger starts the analysis of the new revision: now it is this commit's.
        r.cluster.mark_canary(CANARY, "Progressing", weight=10)
        await eventually(lambda: (found := r.gitea.latest("team", "webapp", newer,
                                                          CANARY_CONTEXT)) is not None
                         and found["description"] == "canary 10%, check 1/5")


@pytest.mark.anyio
async def test_an_environment_badge_shows_the_environments_status_in_gitea() -> None:
    envs = [{"name": "staging", "clusters": ["eu-west"]}]
    async with canary_rig(environments=envs) as r:
        r.cluster.mark_source_fetched(SOURCE, f"main@sha1:{SHA}")
        client = http_client(r.service)
        url = "/badge/team/webapp.svg?environment=staging"
        r.service.environments.cache_seconds = 0  # every badge reads Gitea
        unknown = (await client.get(url)).text
        assert ">staging<" in unknown and ">unknown<" in unknown  # nothing in Gitea yet
        r.gitea.add(*REPO, "flux/env/staging", "failure")
        assert ">failed<" in (await client.get(url)).text
        r.gitea.add(*REPO, "flux/env/staging", "success")
        reads = r.gitea.gets
        assert ">deployed<" in (await client.get(url)).text
        assert r.gitea.gets == reads + 1
        # Within the cache window a badge is answered from memory: no read, the last state.
        r.service.environments.cache_seconds = 3600
        r.gitea.add(*REPO, "flux/env/staging", "failure")
        assert ">deployed<" in (await client.get(url)).text
        assert r.gitea.gets == reads + 1
        other = (await client.get("/badge/team/webapp.svg?environment=production")).text
        assert ">unknown<" in other and r.gitea.gets == reads + 1


@pytest.mark.anyio
async def test_flaggers_status_rewrites_cost_gitea_nothing() -> None:
    async with canary_rig() as r:
        r.cluster.mark_canary(CANARY, "Progressing", weight=30)
        await eventually(lambda: shows(r.gitea) == ("pending", "canary 30%, check 3/5"))
        await eventually(lambda: r.service.queue_depth == 0)
        reads, posts = r.gitea.gets, len(r.gitea.posts)
        for _ in range(5):  # Flagger writes the same status again at every interval
            r.cluster.mark_canary(CANARY, "Progressing", weight=30)
        await eventually(lambda: r.service.queue_depth == 0)
        assert (r.gitea.gets, len(r.gitea.posts)) == (reads, posts)
        r.cluster.mark_canary(CANARY, "Progressing", weight=40)  # news goes at once
        await eventually(lambda: shows(r.gitea) == ("pending", "canary 40%, check 4/5"))
