"""The fleet status in the service: two regions' bridges (two StatusService instances, two
cluster names) post to ONE fake Gitea, which is their shared record."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from receiver.config import ConfigError
from receiver.flux.memory import MemoryCluster
from receiver.flux.store import ObjectStore
from receiver.giturls import normalise_repo_url
from receiver.metrics import Metrics
from receiver.status.service import StatusService
from tests.fakegitea import FakeGitea, gitea_transport
from tests.status.test_status_service import (
    ALIASES,
    FAILED,
    GITEA_TOKEN,
    REPO,
    SUCCEEDED,
    WEBAPP,
    Clock,
    Rig,
    eventually,
    fast,
    http_client,
    make_settings,
    manifests,
)

REGIONS = ["eu-west", "us-east"]
FLEET = "flux/fleet"


def fleet_settings(cluster: str, **fleet: Any) -> Any:
    return make_settings(cluster_name=cluster, statuses={
        "resync_interval_seconds": 3600,
        "fleet": {"enabled": True, "clusters": REGIONS, **fleet}})


@asynccontextmanager
async def regions(wall: Clock | None = None, **fleet: Any) -> AsyncIterator[list[Rig]]:
    """One bridge per region, each its own cluster name, on ONE Gitea. Gitea stamps statuses
    with `wall`, the bridges compare with it."""
    wall = wall or Clock(1_786_000_000.0)
    gitea = FakeGitea(token=GITEA_TOKEN, clock=wall)
    fakes = {"gitea.example.com": gitea}
    transport, _ = gitea_transport(fakes)
    rigs = []
    for name in REGIONS:
        store = ObjectStore(lambda u: normalise_repo_url(u, ALIASES))
        cluster = MemoryCluster(store)
        cluster.load(manifests())
        await cluster.start()
        settings = fleet_settings(name, **fleet)
        metrics = Metrics()
        service = fast(StatusService(settings, cluster, metrics, transport=transport,
                                     wall_clock=wall))
        rigs.append(Rig(settings, cluster, fakes, transport, service, metrics,
                        http_client(service)))
        await service.start()
    try:
        yield rigs
    finally:
        for r in rigs:
            await r.service.stop(grace_seconds=0)
        assert gitea.problems == [], gitea.problems


def fleet_shows(gitea: FakeGitea) -> str | None:
    latest = gitea.latest(*REPO, FLEET)
    return None if latest is None else str(latest["status"])


def idle(rigs: list[Rig]) -> bool:
    return all(r.service.queue_depth == 0 and not r.service.fleet.checks for r in rigs)


def for_object(body: bytes, name: str) -> bytes:
    doc = json.loads(body)
    doc["involvedObject"]["name"] = name
    return json.dumps(doc).encode()


@pytest.mark.anyio
async def test_pending_after_the_first_region_success_after_the_second() -> None:
    async with regions() as (eu, us):
        gitea = eu.gitea
        assert (await eu.send(SUCCEEDED)).status_code == 202
        await eventually(lambda: fleet_shows(gitea) == "pending")
        latest = gitea.latest(*REPO, FLEET)
        assert latest is not None and "waiting for us-east" in latest["description"]
        assert (await us.send(SUCCEEDED)).status_code == 202
        await eventually(lambda: fleet_shows(gitea) == "success")
        await eventually(lambda: idle([eu, us]))
        assert gitea.contexts(*REPO) == {
            "flux/eu-west/kustomization/apps/webapp": "success", FLEET: "success",
            "flux/us-east/kustomization/apps/webapp": "success"}
        # Both may post it; the same value is not posted twice by one that reads it.
        fleet_posts = [body["state"] for *_, body in gitea.posts if body["context"] == FLEET]
        assert fleet_posts[0] == "pending" and fleet_posts[-1] == "success"
        assert fleet_posts.count("success") <= 2
        assert eu.metric("gfb_status_reads_total", purpose="fleet") >= 1


@pytest.mark.anyio
async def test_a_failing_second_region_makes_it_failure() -> None:
    async with regions() as (eu, us):
        gitea = eu.gitea
        await eu.send(SUCCEEDED)
        await eventually(lambda: fleet_shows(gitea) == "pending")
        await us.send(FAILED)
        await eventually(lambda: fleet_shows(gitea) == "failure")
        latest = gitea.latest(*REPO, FLEET)
        assert latest is not None and latest["description"] == "Failed in us-east"
        # A later success elsewhere does not hide it.
        await eu.send(for_object(SUCCEEDED, "api"))
        await eventually(lambda: idle([eu, us]))
        assert fleet_shows(gitea) == "failure"


@pytest.mark.anyio
async def test_a_region_that_never_reports_makes_it_error() -> None:
    wall = Clock(1_786_000_000.0)
    async with regions(wall, stale_after_seconds=600) as (eu, _):
        gitea = eu.gitea
        await eu.send(SUCCEEDED)
        await eventually(lambda: fleet_shows(gitea) == "pending")
        wall.advance(601)
        await eu.send(for_object(SUCCEEDED, "api"))
        await eventually(lambda: fleet_shows(gitea) == "error")
        latest = gitea.latest(*REPO, FLEET)
        assert latest is not None and latest["description"] == "No report for 600s from us-east"


@pytest.mark.anyio
async def test_only_the_chosen_repositories() -> None:
    async with regions(repositories=["team/other"]) as (eu, us):
        await eu.send(SUCCEEDED)
        await us.send(SUCCEEDED)
        await eventually(lambda: idle([eu, us]))
        assert fleet_shows(eu.gitea) is None
        assert eu.metric("gfb_status_reads_total", purpose="fleet") == 0


@pytest.mark.anyio
async def test_the_resync_repairs_the_fleet_status() -> None:
    async with regions() as (eu, us):
        gitea = eu.gitea
        # Both regions deployed; the fleet status lost the race and shows the older verdict.
        gitea.add(*REPO, "flux/eu-west/kustomization/apps/webapp", "success")
        gitea.add(*REPO, "flux/us-east/kustomization/apps/webapp", "success")
        gitea.add(*REPO, FLEET, "pending")
        for r in (eu, us):
            r.cluster.mark_applied(WEBAPP, f"main@sha1:{REPO[2]}")
        await eu.service.resync_once()
        await eventually(lambda: fleet_shows(gitea) == "success")
        assert eu.metric("gfb_status_reads_total", purpose="resync") >= 1


@pytest.mark.parametrize("statuses", [
    {"context_template": "flux/{kind}/{namespace}/{name}"},
    {"context_preset": "notification-controller", "provider_uid": "0c9c2e41-7f3a"},
])
def test_fleet_needs_cluster_in_the_context(statuses: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"fleet.*\{cluster\}"):
        make_settings(cluster_name="eu-west", statuses={
            **statuses, "fleet": {"enabled": True, "clusters": REGIONS}})


def test_fleet_needs_kind_in_the_context() -> None:
    # Without {kind}, a fetched source's `success` could not be told from a deploy's.
    with pytest.raises(ConfigError, match=r"fleet.*\{kind\}"):
        make_settings(cluster_name="eu-west", statuses={
            "context_template": "flux/{cluster}/{namespace}/{name}",
            "fleet": {"enabled": True, "clusters": REGIONS}})
