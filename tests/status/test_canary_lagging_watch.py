"""A commit's canary status never rests on a workload the cache holds but the cluster has moved
on from: "the apply left the workload as it was" is read again from the API server first."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.status.canaries import WAITING_FOR_FLAGGER
from tests.fakegitea import FakeGitea
from tests.status.test_canary_service import (
    CANARY,
    CANARY_CONTEXT,
    canary_posts,
    canary_rig,
    canary_settings,
    flagger_objects,
    shows,
)
from tests.status.test_status_service import GITEA_TOKEN, REPO, SHA, WEBAPP, eventually, rig

DEPLOYMENT = ObjectKey("Deployment", "apps", "webapp")


def stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def changed_by_flux(at: float) -> dict[str, Any]:
    """The canary's Deployment, last changed by kustomize-controller at `at`."""
    deployment = flagger_objects()[1]
    return {**deployment, "metadata": {**deployment["metadata"], "managedFields": [
        {"manager": "kustomize-controller", "operation": "Apply", "time": stamp(at)}]}}


@pytest.mark.anyio
async def test_a_lagging_workload_watch_never_gives_the_last_release_to_the_new_commit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with canary_rig() as r:
        now = time.time()
        # The commit (SHA) was applied just now. The cache still holds the Deployment as the
        # release two hours ago left it, which Flagger promoted an hour ago.
        r.cluster.apply(changed_by_flux(now - 7200))
        cached = r.cluster.store.get(DEPLOYMENT)
        assert cached is not None
        # The API server has the Deployment as this commit's apply changed it: its watch
        # event is late.
        behind = {**changed_by_flux(now), "kind": "Deployment"}
        behind["metadata"] = {**behind["metadata"], "resourceVersion": "9999"}
        asked: list[ObjectKey] = []
        served: dict[ObjectKey, FluxObject] = {DEPLOYMENT: FluxObject(behind)}

        async def read_object(key: ObjectKey) -> FluxObject | None:
            asked.append(key)
            return served.get(key) or r.cluster.store.get(key)

        monkeypatch.setattr(r.cluster, "read_object", read_object)
        r.cluster.mark_canary(CANARY, "Succeeded", at=now - 3600)
        await eventually(lambda: DEPLOYMENT in asked or "success" in canary_posts(r.gitea))
        await eventually(lambda: r.service.queue_depth == 0)
        assert "success" not in canary_posts(r.gitea), r.gitea.posts
        assert shows(r.gitea) == (WAITING_FOR_FLAGGER.state, WAITING_FOR_FLAGGER.description)
        # Once the API server shows the Deployment the cache holds (the commit did not change
        # it), the standing promotion is the commit's.
        served.clear()
        assert await r.service.resync_once() >= 0
        await eventually(lambda: shows(r.gitea) == ("success", "Canary promoted"))
        assert r.gitea.latest(*REPO, CANARY_CONTEXT) is not None


@pytest.mark.anyio
async def test_a_restart_leaves_a_settled_canary_status_alone_until_the_read_answers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """After a restart nothing is queued yet, and the workload's read is slow: the resync must
    not post `pending` over the promotion Gitea shows for the commit (and `success` after)."""
    now = time.time()
    gitea = FakeGitea(token=GITEA_TOKEN, clock=time.time)
    gitea.add(*REPO, CANARY_CONTEXT, "success", "Canary promoted")
    answer = asyncio.Event()
    asked: list[ObjectKey] = []

    def setup(cluster: MemoryCluster) -> None:
        cluster.load(flagger_objects())
        cluster.apply(changed_by_flux(now - 7200))
        cluster.mark_canary(CANARY, "Succeeded", at=now - 300)
        cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}", at=now - 100)  # a re-reconcile

        async def slow_read(key: ObjectKey) -> FluxObject | None:
            asked.append(key)
            await answer.wait()
            return cluster.store.get(key)

        monkeypatch.setattr(cluster, "read_object", slow_read)

    async with rig(canary_settings(), setup=setup, fakes={"gitea.example.com": gitea}) as r:
        assert await r.service.resync_once() >= 0
        await eventually(lambda: DEPLOYMENT in asked)
        await eventually(lambda: r.service.queue_depth == 0)
        assert canary_posts(gitea) == [], gitea.posts
        answer.set()
        await eventually(lambda: r.service.queue_depth == 0 and not r.service.canaries._confirming)
        assert "pending" not in canary_posts(gitea), gitea.posts
        assert shows(gitea) == ("success", "Canary promoted")
