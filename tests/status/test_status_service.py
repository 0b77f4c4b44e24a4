"""The status service end to end: events in, statuses out in a fake Gitea, nothing lost.

Cluster state lives in a MemoryCluster that plays Flux; Gitea is `FakeGitea` behind respx, and
every request the client makes is checked against Gitea's swagger (`fake.problems`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Route

from receiver.config import ConfigError, Settings, StatusConfig
from receiver.config_load import load_settings
from receiver.delivery.record import DeliveryRecord
from receiver.delivery.store import Delivery, record_targets
from receiver.delivery.view import DeliveryView, TargetView
from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import ObjectKey
from receiver.flux.revisions import READY, RECONCILING, TIMED_OUT
from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import Push
from receiver.giturls import normalise_repo_url
from receiver.metrics import Metrics
from receiver.push.routing import Plan, Target
from receiver.signatures import hmac_hex, hook_digest
from receiver.status.badges import mint_badge_token
from receiver.status.descriptions import describe, gitea_state
from receiver.status.service import StatusService
from receiver.web.app import status_endpoints
from tests import gitea_payloads as gp
from tests.conftest import GITEA_TOKEN as RECEIVER_TOKEN
from tests.conftest import make_settings as app_settings
from tests.conftest import until
from tests.fakegitea import FakeGitea, gitea_transport

EVENTS = Path(__file__).parent.parent / "fixtures" / "events"
SHA = "5394cb7f48ab9fd33a7a95f6ee1f7b9c4b2b8a3e"
OLD = "1111111111111111111111111111111111111111"
HMAC = "events-hmac-token"
BEARER = "events-bearer-token"
GITEA_TOKEN = "gitea-api-token"
ALIASES = {"gitea-http.gitea.svc.cluster.local:3000": "gitea.example.com"}
WEBAPP = ObjectKey("Kustomization", "apps", "webapp")
API = ObjectKey("Kustomization", "apps", "api")
PODINFO = ObjectKey("HelmRelease", "apps", "podinfo")
SOURCE = ObjectKey("GitRepository", "flux-system", "webapp")
CONTEXT = "flux/eu-west/kustomization/apps/webapp"
REPO = ("team", "webapp", SHA)


def make_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "cluster_name": "eu-west",
        "host_aliases": ALIASES,
        "gitea": [{"name": "eu", "url": "https://gitea.example.com",
                   "token": {"secret": "gitea/api-token"}}],
        "events": {"hmac_token": {"secret": "flux-system/events"}},
        "statuses": {"resync_interval_seconds": 3600},
    }
    base.update(overrides)
    return load_settings(environ={}, overrides=base)


def manifests() -> list[dict[str, Any]]:
    source_ref = {"kind": "GitRepository", "name": "webapp", "namespace": "flux-system"}
    return [
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "api-token", "namespace": "gitea"},
         "stringData": {"token": GITEA_TOKEN}},
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "events", "namespace": "flux-system"},
         "stringData": {"token": HMAC}},
        {"kind": "GitRepository", "metadata": {"name": "webapp", "namespace": "flux-system"},
         "spec": {"url": "http://gitea-http.gitea.svc.cluster.local:3000/team/webapp.git",
                  "ref": {"branch": "main"}}},
        {"kind": "OCIRepository", "metadata": {"name": "oci", "namespace": "flux-system"},
         "spec": {"url": "oci://ghcr.io/team/webapp"}},
        {"kind": "Kustomization", "metadata": {"name": "webapp", "namespace": "apps"},
         "spec": {"sourceRef": source_ref, "path": "./apps/webapp"}},
        {"kind": "Kustomization", "metadata": {"name": "api", "namespace": "apps"},
         "spec": {"sourceRef": source_ref, "path": "./apps/api"}},
        {"kind": "Kustomization", "metadata": {"name": "from-oci", "namespace": "apps"},
         "spec": {"sourceRef": {"kind": "OCIRepository", "name": "oci",
                                "namespace": "flux-system"}, "path": "./"}},
        {"kind": "HelmRelease", "metadata": {"name": "podinfo", "namespace": "apps"},
         "spec": {"chart": {"spec": {"chart": "./charts/podinfo", "sourceRef": source_ref,
                                     "reconcileStrategy": "Revision"}}}},
        {"kind": "HelmRelease", "metadata": {"name": "redis", "namespace": "apps"},
         "spec": {"chart": {"spec": {"chart": "./charts/redis", "sourceRef": source_ref}}}},
    ]


@dataclass
class Rig:
    settings: Settings
    cluster: MemoryCluster
    fakes: dict[str, FakeGitea]
    transport: httpx.AsyncBaseTransport
    service: StatusService
    metrics: Metrics
    client: httpx.AsyncClient
    clock: Callable[[], float] = time.monotonic

    @property
    def gitea(self) -> FakeGitea:
        return next(iter(self.fakes.values()))

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples whose labels include `labels` (any Gitea instance)."""
        return sum(sample.value for family in self.metrics.registry.collect()
                   for sample in family.samples
                   if sample.name == name and labels.items() <= sample.labels.items())

    def posted(self) -> float:
        return self.metric("gfb_statuses_total", result="posted")

    async def send(self, body: bytes, *, sign: bool = True,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if sign:
            sent["X-Signature"] = "sha256=" + hmac_hex("sha256", HMAC, body)
        return await self.client.post("/events", content=body, headers=sent)

    def new_service(self) -> StatusService:
        """A fresh process: same cluster and Gitea, nothing remembered."""
        self.metrics = Metrics()
        self.service = fast(StatusService(self.settings, self.cluster, self.metrics,
                                          transport=self.transport, clock=self.clock))
        self.client = http_client(self.service)
        return self.service


def fast(service: StatusService) -> StatusService:
    service.retry_base_seconds = 0.01
    service.retry_cap_seconds = 0.05
    return service


def http_client(service: StatusService) -> httpx.AsyncClient:
    events, badge = status_endpoints(service)
    app = Starlette(routes=[
        Route("/events", events.handle, methods=["POST"]),
        Route("/badge/{path:path}", badge.handle, methods=["GET"]),
    ])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bridge")


class Clock:
    """A clock the test moves: the repeat window passes when the test says so, not by pausing."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


WINDOW = StatusConfig().repeat_window_seconds


@asynccontextmanager
async def rig(settings: Settings | None = None, *, start: bool = True,
              fakes: dict[str, FakeGitea] | None = None,
              setup: Callable[[MemoryCluster], None] | None = None,
              clock: Callable[[], float] = time.monotonic) -> AsyncIterator[Rig]:
    settings = settings or make_settings()
    store = ObjectStore(lambda u: normalise_repo_url(u, ALIASES))
    cluster = MemoryCluster(store)
    cluster.load(manifests())
    if setup is not None:
        setup(cluster)
    await cluster.start()
    fakes = fakes or {"gitea.example.com": FakeGitea(token=GITEA_TOKEN)}
    transport, _ = gitea_transport(fakes)
    metrics = Metrics()
    service = fast(StatusService(settings, cluster, metrics, transport=transport, clock=clock))
    r = Rig(settings, cluster, fakes, transport, service, metrics, http_client(service), clock)
    if start:
        await service.start()
    try:
        yield r
    finally:
        await r.service.stop(grace_seconds=0)
        for fake in fakes.values():
            assert fake.problems == [], fake.problems


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    await until(check, timeout)


async def settled(r: Rig) -> None:
    await eventually(lambda: r.service.queue_depth == 0)


def fixture(name: str) -> bytes:
    return (EVENTS / name).read_bytes()


def with_message(body: bytes, message: str) -> bytes:
    doc = json.loads(body)
    doc["message"] = message
    return json.dumps(doc, separators=(",", ":")).encode()


# -- POST /events ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_success_event_becomes_a_status() -> None:
    async with rig() as r:
        reply = await r.send(fixture("kustomization-succeeded.json"))
        assert reply.status_code == 202
        assert reply.json() == {"accepted": True, "statuses": 1}
        await eventually(lambda: r.gitea.latest(*REPO, CONTEXT) is not None)
        latest = r.gitea.latest(*REPO, CONTEXT)
        assert latest is not None
        assert (latest["status"], latest["description"], latest["target_url"]) == (
            "success", "Reconciliation succeeded", "")
        assert r.metric("gfb_events_total", outcome="accepted") == 1


@pytest.mark.anyio
@pytest.mark.parametrize("name, state", [
    ("kustomization-progressing.json", "pending"),
    ("kustomization-build-failed.json", "failure"),
    ("kustomization-health-check-failed.json", "failure"),
])
async def test_kustomization_events(name: str, state: str) -> None:
    async with rig() as r:
        assert (await r.send(fixture(name))).status_code == 202
        await eventually(lambda: r.gitea.contexts(*REPO).get(CONTEXT) == state)


@pytest.mark.anyio
async def test_gitrepository_and_helmrelease_events() -> None:
    def fetched(cluster: MemoryCluster) -> None:
        cluster.mark_source_fetched(SOURCE, f"main@sha1:{SHA}")

    async with rig(setup=fetched) as r:
        for name in ("gitrepository-new-artifact.json", "helmrelease-chart-revision.json"):
            assert (await r.send(fixture(name))).json() == {"accepted": True, "statuses": 1}
        reply = await r.send(fixture("helmrelease-without-commit.json"))
        assert reply.json() == {"accepted": True, "statuses": 0}
        await eventually(lambda: len(r.gitea.contexts(*REPO)) == 2)
        assert r.gitea.contexts(*REPO) == {
            "flux/eu-west/gitrepository/flux-system/webapp": "success",
            "flux/eu-west/helmrelease/apps/podinfo": "failure"}
        assert r.metric("gfb_events_total", outcome="no_commit") == 1


@pytest.mark.anyio
async def test_unmapped_events_are_accepted_with_no_status() -> None:
    async with rig() as r:
        body = fixture("kustomization-succeeded.json")
        unknown = body.replace(b'"name":"webapp"', b'"name":"ghost"')
        oci = body.replace(b'"name":"webapp"', b'"name":"from-oci"')
        for sent in (unknown, oci):
            reply = await r.send(sent)
            assert (reply.status_code, reply.json()) == (202, {"accepted": True, "statuses": 0})
        assert r.metric("gfb_events_total", outcome="unmapped") == 2
        await settled(r)
        assert r.gitea.posts == []


@pytest.mark.anyio
async def test_repo_without_a_gitea_instance() -> None:
    async with rig(make_settings(gitea=[{"name": "x", "url": "https://other.example.com",
                                         "token": {"secret": "gitea/api-token"}}])) as r:
        reply = await r.send(fixture("kustomization-succeeded.json"))
        assert reply.json() == {"accepted": True, "statuses": 0}
        assert r.metric("gfb_events_total", outcome="no_instance") == 1


@pytest.mark.anyio
async def test_authentication() -> None:
    body = fixture("kustomization-succeeded.json")
    bearer = {"events": {"hmac_token": {"secret": "flux-system/events"},
                         "bearer_token": {"secret": "flux-system/bearer"}}}

    def with_bearer(cluster: MemoryCluster) -> None:
        cluster.secrets[("flux-system", "bearer")] = {"token": BEARER.encode()}

    async with rig(make_settings(**bearer), setup=with_bearer) as r:
        refusals = [
            await r.send(body, sign=False),
            await r.send(body, sign=False, headers={"X-Signature": "sha256=" + "0" * 64}),
            await r.send(body, sign=False, headers={
                "X-Signature": "sha1=" + hmac_hex("sha1", HMAC, body)}),
            await r.send(body + b" ", sign=False, headers={
                "X-Signature": "sha256=" + hmac_hex("sha256", HMAC, body)}),
            await r.send(body, sign=False, headers={"Authorization": "Bearer nope"}),
            await r.send(body, sign=False, headers={"Authorization": f"token {BEARER}"}),
        ]
        assert {(x.status_code, x.content) for x in refusals} == {
            (401, b'{"error":"unauthorized"}')}
        ok = await r.send(body, sign=False, headers={"Authorization": f"Bearer {BEARER}"})
        assert ok.status_code == 202
        assert (await r.send(body)).status_code == 202
        assert r.metric("gfb_events_total", outcome="unauthorized") == len(refusals)


@pytest.mark.anyio
async def test_unsigned_only_behind_the_insecure_switch() -> None:
    body = fixture("kustomization-succeeded.json")
    async with rig(make_settings(events={}, insecure={"allow_unsigned_events": True})) as r:
        assert (await r.send(body, sign=False)).status_code == 202
        wrong = await r.send(body, sign=False, headers={"X-Signature": "sha256=" + "0" * 64})
        assert wrong.status_code == 401
    async with rig(make_settings(events={})) as r:
        assert (await r.send(body, sign=False)).status_code == 401
        assert (await r.send(body)).status_code == 401  # no token configured: nothing verifies


@pytest.mark.anyio
async def test_hmac_token_from_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "hmac"
    token_file.write_text(HMAC + "\n")
    async with rig(make_settings(events={"hmac_token": {"file": str(token_file)}})) as r:
        assert (await r.send(fixture("kustomization-succeeded.json"))).status_code == 202


@pytest.mark.anyio
async def test_bad_requests() -> None:
    async with rig(make_settings(body_limit_bytes=2048)) as r:
        good = fixture("kustomization-succeeded.json")
        wrong_type = await r.client.post("/events", content=good,
                                         headers={"Content-Type": "text/plain"})
        assert wrong_type.status_code == 415
        big = b"{" + b" " * 4096 + b"}"
        declared = await r.send(big)
        assert declared.status_code == 413

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b" " * 1024

        streamed = await r.client.post("/events", content=chunks(),
                                       headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413
        assert (await r.send(b"{nope")).status_code == 400
        missing = await r.send(b'{"involvedObject":{"kind":"Kustomization"},"reason":"X"}')
        assert missing.status_code == 422 and "error" in missing.json()
        for reply in (wrong_type, declared, streamed):
            assert "error" in reply.json()
        assert r.gitea.posts == []


# -- dedupe ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_exact_repeat_within_the_window_is_posted_once() -> None:
    clock = Clock()
    async with rig(clock=clock) as r:
        body = fixture("kustomization-succeeded.json")
        for i in range(20):
            reply = await r.send(with_message(body, f"Reconciliation finished in {i}.{i}s, "
                                                    "next run in 10m0s"))
            assert reply.status_code == 202
            await settled(r)  # one at a time: dedupe, not queue coalescing, saves the posts
            clock.advance(WINDOW / 40)  # all twenty inside one window
        assert len(r.gitea.posts) == 1
        assert r.metric("gfb_statuses_total", result="deduplicated") == 19
        # Each is a new event: another replica may have posted since, so Gitea is asked (and
        # shows the same status: no post). Only a redelivery of one event is answered from
        # memory.
        assert r.gitea.gets == 20
        last = with_message(body, "Reconciliation finished in 19.19s, next run in 10m0s")
        for _ in range(5):
            await r.send(last)
            await settled(r)
        # (The first of them asks once more: the read that deduplicated event 19 came before
        # this copy arrived. The other four are answered by that fresh read.)
        assert (len(r.gitea.posts), r.gitea.gets) == (1, 21)
        # After the window the memory is not believed: Gitea is asked, and it has the status.
        clock.advance(WINDOW)
        await r.send(last)
        await settled(r)
        assert (len(r.gitea.posts), r.gitea.gets) == (1, 22)
        assert r.metric("gfb_status_reads_total", purpose="check") == 22


@pytest.mark.anyio
async def test_a_change_is_never_suppressed_within_the_window() -> None:
    clock = Clock()
    async with rig(clock=clock) as r:
        for name in ("kustomization-succeeded.json", "kustomization-health-check-failed.json",
                     "kustomization-succeeded.json"):
            await r.send(fixture(name))
            await settled(r)
        assert [p[3]["state"] for p in r.gitea.posts] == ["success", "failure", "success"]
        assert r.gitea.gets == 1


@pytest.mark.anyio
async def test_window_zero_always_asks_gitea() -> None:
    settings = make_settings(statuses={"repeat_window_seconds": 0,
                                       "resync_interval_seconds": 3600})
    async with rig(settings) as r:
        for _ in range(3):
            await r.send(fixture("kustomization-succeeded.json"))
            await settled(r)
        assert (len(r.gitea.posts), r.gitea.gets) == (1, 3)


@pytest.mark.anyio
async def test_a_restarted_bridge_asks_gitea_before_posting() -> None:
    async with rig() as r:
        body = fixture("kustomization-succeeded.json")
        await r.send(body)
        await eventually(lambda: len(r.gitea.posts) == 1)
        await r.service.stop()
        r.new_service()
        await r.service.start()
        assert (await r.send(body)).status_code == 202
        await settled(r)
        assert len(r.gitea.posts) == 1
        assert r.metric("gfb_statuses_total", result="deduplicated") == 1


@pytest.mark.anyio
async def test_a_status_posted_elsewhere_is_seen_after_the_window() -> None:
    clock = Clock()
    async with rig(clock=clock) as r:
        await r.send(fixture("kustomization-succeeded.json"))
        await settled(r)
        r.gitea.add(*REPO, CONTEXT, "failure", "posted by someone else")
        # Within the window an exact repeat is believed (the documented bound) ...
        await r.send(fixture("kustomization-succeeded.json"))
        await settled(r)
        assert r.gitea.contexts(*REPO)[CONTEXT] == "failure"
        # ... and no longer: the next delivery of the same event reads Gitea and repairs.
        clock.advance(WINDOW)
        await r.send(fixture("kustomization-succeeded.json"))
        await settled(r)
        assert r.gitea.contexts(*REPO)[CONTEXT] == "success"


@pytest.mark.anyio
async def test_changed_status_is_posted_and_order_is_kept() -> None:
    async with rig() as r:
        await r.send(fixture("kustomization-progressing.json"))
        await r.send(fixture("kustomization-build-failed.json"))
        await r.send(fixture("kustomization-succeeded.json"))
        await settled(r)
        assert r.gitea.contexts(*REPO)[CONTEXT] == "success"


# -- several replicas, one Gitea --------------------------------------------------------------


@asynccontextmanager
async def replicas(count: int = 2, *, settings: Settings | None = None,
                   setup: Callable[[MemoryCluster], None] | None = None,
                   clock: Callable[[], float] = time.monotonic) -> AsyncIterator[list[Rig]]:
    """`count` status services, each with its own memory, on one cluster and ONE Gitea."""
    settings = settings or make_settings()
    store = ObjectStore(lambda u: normalise_repo_url(u, ALIASES))
    cluster = MemoryCluster(store)
    cluster.load(manifests())
    if setup is not None:
        setup(cluster)
    await cluster.start()
    fakes = {"gitea.example.com": FakeGitea(token=GITEA_TOKEN)}
    transport, _ = gitea_transport(fakes)
    rigs = []
    for _ in range(count):
        metrics = Metrics()
        service = fast(StatusService(settings, cluster, metrics, transport=transport,
                                     clock=clock))
        rigs.append(Rig(settings, cluster, fakes, transport, service, metrics,
                        http_client(service), clock))
        await service.start()
    try:
        yield rigs
    finally:
        for r in rigs:
            await r.service.stop(grace_seconds=0)
        assert fakes["gitea.example.com"].problems == []


async def all_settled(rigs: list[Rig]) -> None:
    await eventually(lambda: all(r.service.queue_depth == 0 for r in rigs))


SUCCEEDED = fixture("kustomization-succeeded.json")
FAILED = fixture("kustomization-health-check-failed.json")
EVENT_KINDS: dict[str, bytes] = {
    "succeeded": SUCCEEDED,
    "succeeded-again": with_message(SUCCEEDED, "Reconciliation finished in 2.5s, next run in 5m0s"),
    "health-check-failed": FAILED,
    "health-check-failed-again": with_message(FAILED, "timeout waiting for: [Deployment/x]"),
    "build-failed": fixture("kustomization-build-failed.json"),
    "progressing": fixture("kustomization-progressing.json"),
}


def shown_for(kind: str) -> tuple[str, str]:
    """The (state, description) an event of `kind` asks Gitea to show."""
    doc = json.loads(EVENT_KINDS[kind])
    return gitea_state(doc["reason"], doc["severity"]) or "", describe(doc["reason"],
                                                                        doc["message"])


def gitea_shows(gitea: FakeGitea) -> tuple[str, str] | None:
    latest = gitea.latest(*REPO, CONTEXT)
    return None if latest is None else (latest["status"], latest["description"])


@pytest.mark.anyio
async def test_issue_9_one_replicas_memory_never_hides_another_replicas_post() -> None:
    clock = Clock()
    async with replicas(clock=clock) as (a, b):
        await a.send(SUCCEEDED)  # A posted success, some time ago
        await settled(a)
        clock.advance(10 * WINDOW)
        await b.send(FAILED)  # B posts the health check failure
        await settled(b)
        reply = await a.send(SUCCEEDED)  # the recovery reaches A, right after
        assert reply.json() == {"accepted": True, "statuses": 1}
        await settled(a)
        assert gitea_shows(a.gitea) == shown_for("succeeded")
        assert [p[3]["state"] for p in a.gitea.posts] == ["success", "failure", "success"]


@pytest.mark.anyio
@pytest.mark.parametrize("first, second", [("succeeded", "health-check-failed"),
                                           ("health-check-failed", "succeeded"),
                                           ("progressing", "succeeded"),
                                           ("succeeded", "progressing")])
@pytest.mark.parametrize("order", ["ab", "ba"])
async def test_events_in_either_order_across_replicas_end_at_the_latest(
        first: str, second: str, order: str) -> None:
    clock = Clock()
    async with replicas(clock=clock) as rigs:
        x, y = (rigs[0], rigs[1]) if order == "ab" else (rigs[1], rigs[0])
        # Both replicas once posted the state the last event asks for (stale memory).
        for r in (x, y):
            await r.send(EVENT_KINDS[second])
            await settled(r)
        clock.advance(2 * WINDOW)
        await x.send(EVENT_KINDS[first])
        await settled(x)
        clock.advance(WINDOW)  # events of one object reach replicas at least a window apart
        await y.send(EVENT_KINDS[second])
        await settled(y)
        assert gitea_shows(x.gitea) == shown_for(second)


PROGRESSING = EVENT_KINDS["progressing"]


@pytest.mark.anyio
async def test_a_progress_event_reaching_a_replica_after_the_outcome_never_has_the_last_word(
) -> None:
    """kustomize-controller sends a run's Progressing and its outcome milliseconds apart;
    behind a Service they reach different replicas. The one with the Progressing, already
    seeing the Kustomization Ready at that commit, posts no `pending` after the outcome."""
    async with replicas() as (a, b):
        a.cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}")
        await a.send(SUCCEEDED)
        await settled(a)
        assert (await b.send(PROGRESSING)).json() == {"accepted": True, "statuses": 1}
        await settled(b)
        assert gitea_shows(a.gitea) == shown_for("succeeded")
        assert [p[3]["state"] for p in a.gitea.posts] == ["success"]


@pytest.mark.anyio
async def test_a_pending_posted_after_the_outcome_is_followed_by_the_live_state() -> None:
    """The replica posted its `pending` after the other replica's outcome (its watch had not
    seen the run end yet): once its watch does, it posts the live state after it."""
    async with replicas() as (a, b):
        a.cluster.mark_progressing(WEBAPP, f"main@sha1:{SHA}")
        await a.send(SUCCEEDED)
        await settled(a)
        await b.send(PROGRESSING)
        await settled(b)
        assert gitea_shows(a.gitea) == shown_for("progressing")  # wrong, for now
        a.cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}")  # the watch catches up
        await eventually(lambda: (gitea_shows(a.gitea) or ("",))[0] == "success")
        await all_settled([a, b])
        shown = [(p[3]["state"], p[3]["description"]) for p in a.gitea.posts]
        # (the resync may also have posted the live `pending` while the run was going on)
        assert shown[-2:] == [shown_for("progressing"), ("success", "Reconciliation succeeded")
                              ], shown
        # Followed once: the object's later changes post nothing more.
        a.cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}")
        await all_settled([a, b])
        assert len(a.gitea.posts) == len(shown)


async def deliver_sequence(steps: list[tuple[int, str, float]], *, spaced: bool,
                           final: int | None) -> tuple[tuple[str, str] | None, str]:
    clock = Clock()
    async with replicas(clock=clock) as rigs:
        previous: int | None = None
        for replica, kind, gap in steps:
            if spaced and previous is not None and replica != previous:
                gap = max(gap, 1.0)
            clock.advance(gap * WINDOW)
            reply = await rigs[replica].send(EVENT_KINDS[kind])
            assert reply.status_code == 202
            await all_settled(rigs)  # wait for the queues to drain, not for time to pass
            previous = replica
        last = steps[-1][1]
        if final is not None:  # the next delivery of the last event, once the window passed
            clock.advance(WINDOW)
            await rigs[final].send(EVENT_KINDS[last])
            await all_settled(rigs)
        return gitea_shows(rigs[0].gitea), last


STEPS = st.lists(st.tuples(st.integers(0, 1), st.sampled_from(sorted(EVENT_KINDS)),
                           st.sampled_from([0.0, 0.3, 1.0, 3.0])), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(STEPS)
def test_replicas_converge_on_the_latest_event(steps: list[tuple[int, str, float]]) -> None:
    """Any sequence of events, each to a random replica: Gitea ends at the last one.

    Events of one object that reach *different* replicas are at least a repeat window apart
    (Flux reports an object's runs seconds to minutes apart; the window is a few seconds).
    """
    shown, last = asyncio.run(deliver_sequence(steps, spaced=True, final=None))
    assert shown == shown_for(last)


@settings(max_examples=25, deadline=None)
@given(STEPS, st.integers(0, 1))
def test_replicas_converge_once_the_window_has_passed(
        steps: list[tuple[int, str, float]], final: int) -> None:
    """Without spacing, an exact repeat may be believed for one window (e.g. A: build failed,
    B: health check failed, A: build failed again, all within seconds); the next delivery
    after the window, to any replica, ends at the latest."""
    shown, last = asyncio.run(deliver_sequence(steps, spaced=False, final=final))
    assert shown == shown_for(last)


# -- Gitea failures ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_gitea_down_then_back_posts_once() -> None:
    async with rig() as r:
        r.gitea.fail = [503, httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), 502]
        await r.send(fixture("kustomization-succeeded.json"))
        await eventually(lambda: r.gitea.latest(*REPO, CONTEXT) is not None)
        await settled(r)
        assert len(r.gitea.posts) == 1
        assert r.metric("gfb_statuses_total", result="retried") == 4
        assert r.metric("gfb_statuses_total", result="posted") == 1


@pytest.mark.anyio
async def test_4xx_is_reported_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with rig() as r:
        r.gitea.fail = [404]
        await r.send(fixture("kustomization-succeeded.json"))
        await settled(r)  # the one attempt is over: a retry would still be queued
        assert r.gitea.posts == [] and not r.gitea.fail
        assert r.metric("gfb_statuses_total", result="failed") == 1
        assert r.metric("gfb_statuses_total", result="retried") == 0
    lines = [rec.getMessage() + json.dumps(rec.__dict__, default=str) for rec in caplog.records]
    assert any("not posted" in line for line in lines)
    assert not any(GITEA_TOKEN in line or HMAC in line for line in lines)


@pytest.mark.anyio
async def test_retries_stop_at_max_attempts() -> None:
    settings = make_settings(statuses={"max_attempts": 3, "resync_interval_seconds": 3600})
    async with rig(settings) as r:
        r.gitea.fail = [500] * 10
        await r.send(fixture("kustomization-succeeded.json"))
        await eventually(lambda: r.metric("gfb_statuses_total", result="failed") == 1)
        assert r.metric("gfb_statuses_total", result="retried") == 2
        assert len(r.gitea.fail) == 7


@pytest.mark.anyio
async def test_fan_out_to_every_instance_hosting_the_repo() -> None:
    fakes = {"gitea-eu.example.com": FakeGitea(token=GITEA_TOKEN),
             "gitea-us.example.com": FakeGitea(token=GITEA_TOKEN, prefix="/git/api/v1"),
             "unrelated.example.com": FakeGitea(token=GITEA_TOKEN)}
    instances = [
        {"name": "eu", "url": "https://gitea-eu.example.com",
         "token": {"secret": "gitea/api-token"}, "hosts": ["gitea.example.com"]},
        {"name": "us", "url": "https://gitea-us.example.com/git/",
         "token": {"secret": "gitea/api-token"}, "hosts": ["GITEA.example.com:443"]},
        {"name": "other", "url": "https://unrelated.example.com",
         "token": {"secret": "gitea/api-token"}},
    ]
    async with rig(make_settings(gitea=instances), fakes=fakes) as r:
        fakes["gitea-us.example.com"].fail = [503]  # one region down must not hold the other
        reply = await r.send(fixture("kustomization-succeeded.json"))
        assert reply.json() == {"accepted": True, "statuses": 2}
        for host in ("gitea-eu.example.com", "gitea-us.example.com"):
            await eventually(lambda h=host: fakes[h].latest(*REPO, CONTEXT) is not None)  # type: ignore[misc]
        assert fakes["unrelated.example.com"].posts == []


@pytest.mark.anyio
async def test_gitea_token_from_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "gitea-token"
    token_file.write_text(GITEA_TOKEN + "\n")
    instances = [{"name": "eu", "url": "https://gitea.example.com",
                  "token": {"file": str(token_file)}}]
    async with rig(make_settings(gitea=instances)) as r:
        await r.send(fixture("kustomization-succeeded.json"))
        await eventually(lambda: len(r.gitea.posts) == 1)


# -- queue full, restart, lost events: resync ----------------------------------------------


def applied(cluster: MemoryCluster) -> None:
    cluster.mark_source_fetched(SOURCE, f"main@sha1:{SHA}")
    cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}")
    cluster.mark_failed(API, f"main@sha1:{SHA}", "HealthCheckFailed", "timeout waiting")


@pytest.mark.anyio
async def test_restart_with_a_full_queue_is_repaired_by_resync() -> None:
    settings = make_settings(statuses={"queue_size": 1, "resync_interval_seconds": 3600})
    async with rig(settings, start=False, setup=applied) as r:
        # No workers yet (a stalled process): the queue fills and /events says 503.
        assert (await r.send(fixture("kustomization-succeeded.json"))).status_code == 202
        failed = fixture("kustomization-health-check-failed.json").replace(
            b'"name":"webapp"', b'"name":"api"')
        full = await r.send(failed)
        assert (full.status_code, full.json()) == (503, {"error": "status queue is full"})
        assert r.metric("gfb_events_total", outcome="queue_full") == 1
        await r.service.stop(grace_seconds=0)  # the process dies with its queue
        assert r.gitea.posts == []
        r.new_service()
        await r.service.start()  # resync at start, from live state
        await eventually(lambda: len(r.gitea.contexts(*REPO)) == 2)
        assert r.gitea.contexts(*REPO) == {CONTEXT: "success",
                                           "flux/eu-west/kustomization/apps/api": "failure"}


@pytest.mark.anyio
async def test_lost_event_is_repaired_by_resync() -> None:
    async with rig(setup=applied) as r:
        # Never an event: the resync at start reads the live state.
        await eventually(lambda: len(r.gitea.contexts(*REPO)) == 2)
        assert r.gitea.contexts(*REPO)[CONTEXT] == "success"
        await settled(r)
        posts = len(r.gitea.posts)
        assert await r.service.resync_once() == 0  # nothing missing any more
        # Flux moves on; the event is lost again; the next resync catches up.
        r.cluster.mark_progressing(WEBAPP, f"main@sha1:{OLD}")
        assert await r.service.resync_once() == 1
        await settled(r)
        assert r.gitea.contexts("team", "webapp", OLD) == {CONTEXT: "pending"}
        assert len(r.gitea.posts) == posts + 1


@pytest.mark.anyio
async def test_resync_does_not_rewrite_an_events_wording() -> None:
    async with rig(setup=applied) as r:
        await eventually(lambda: len(r.gitea.contexts(*REPO)) == 2)
        await settled(r)
        before = len(r.gitea.posts)
        failed = fixture("kustomization-health-check-failed.json").replace(
            b'"name":"webapp"', b'"name":"api"')
        await r.send(failed)  # another wording of the same failure
        await settled(r)
        assert len(r.gitea.posts) == before + 1
        assert await r.service.resync_once() == 0


API_CONTEXT = "flux/eu-west/kustomization/apps/api"


@pytest.mark.anyio
async def test_resync_repairs_what_was_changed_behind_the_bridges_back() -> None:
    clock = Clock()
    async with replicas(setup=applied, clock=clock) as (leader, other):
        await eventually(lambda: len(leader.gitea.contexts(*REPO)) == 2)
        await all_settled([leader, other])
        # Someone posts by hand. (A stale event reaching another replica late no longer
        # posts over the live outcome: test_a_progress_event_reaching_a_replica_after_...)
        leader.gitea.add(*REPO, CONTEXT, "pending", "set by hand")
        leader.gitea.add(*REPO, API_CONTEXT, "success", "set by hand")
        assert leader.gitea.contexts(*REPO) == {CONTEXT: "pending", API_CONTEXT: "success"}
        # Within the leader's repeat window: it still reads Gitea, it does not trust itself.
        reads = len(leader.gitea.reads)
        repairs = leader.metric("gfb_status_repairs_total")  # the resync at start made some
        assert await leader.service.resync_once() == 2
        await settled(leader)
        assert leader.gitea.contexts(*REPO) == {CONTEXT: "success", API_CONTEXT: "failure"}
        assert len(leader.gitea.reads) == reads + 1  # one listing answered both contexts
        assert leader.metric("gfb_status_repairs_total") == repairs + 2
        clock.advance(WINDOW)
        assert await leader.service.resync_once() == 0  # now Gitea shows the truth


def many_commits(count: int) -> Callable[[MemoryCluster], None]:
    """`count` Kustomizations from the webapp source, each deployed at its own commit."""
    def setup(cluster: MemoryCluster) -> None:
        cluster.mark_source_fetched(SOURCE, f"main@sha1:{SHA}")
        for i in range(count):
            cluster.apply({"kind": "Kustomization",
                           "metadata": {"name": f"k{i}", "namespace": "apps"},
                           "spec": {"sourceRef": {"kind": "GitRepository", "name": "webapp",
                                                  "namespace": "flux-system"},
                                    "path": f"./k{i}"}})
            cluster.mark_applied(ObjectKey("Kustomization", "apps", f"k{i}"),
                                 f"main@sha1:{commit_sha(i)}")
    return setup


def commit_sha(i: int) -> str:
    return f"{i:x}" * 40


@pytest.mark.anyio
async def test_resync_read_budget_and_round_robin() -> None:
    settings = make_settings(statuses={"resync_read_budget": 3,
                                       "resync_interval_seconds": 3600})
    async with rig(settings, start=False, setup=many_commits(7)) as r:
        gitea = r.gitea
        for i in range(7):
            context = f"flux/eu-west/kustomization/apps/k{i}"
            gitea.add("team", "webapp", commit_sha(i), context,
                      "failure" if i == 3 else "success")  # commit 3 shows a stale state
        for n in range(120):  # commit 5: our status is the oldest of 121, three pages away
            gitea.add("team", "webapp", commit_sha(5), "ci/build", "success", f"#{n}")

        async def run() -> tuple[int, list[tuple[int, int]]]:
            before = len(gitea.reads)
            queued = await r.service.resync_once()
            return queued, [(int(sha[0], 16), page) for *_, sha, page in gitea.reads[before:]]

        assert await run() == (0, [(0, 1), (1, 1), (2, 1)])
        # Commit 5 needs three pages; one is left: it is started, then it comes first next run.
        assert await run() == (1, [(3, 1), (4, 1), (5, 1)])
        assert await run() == (0, [(5, 1), (5, 2), (5, 3)])
        assert await run() == (0, [(6, 1), (0, 1), (1, 1)])  # round robin wraps around
        assert r.metric("gfb_status_reads_total", purpose="resync") == 12
        assert r.metric("gfb_status_repairs_total") == 1
        # The repair queued in the second run goes out once workers run.
        await r.service.start()
        await settled(r)
        assert gitea.contexts("team", "webapp", commit_sha(3)) == {
            "flux/eu-west/kustomization/apps/k3": "success"}


@pytest.mark.anyio
async def test_resync_skips_a_repository_gitea_does_not_host() -> None:
    fakes = {"gitea.example.com": FakeGitea(token=GITEA_TOKEN, repos={("team", "other")})}
    async with rig(start=False, setup=many_commits(2), fakes=fakes) as r:
        assert await r.service.resync_once() == 0
        assert r.metric("gfb_status_reads_total", purpose="resync") == 2  # one 404 each
        assert r.gitea.posts == []


@pytest.mark.anyio
async def test_resync_leaves_a_down_instance_for_the_next_run() -> None:
    async with rig(start=False, setup=many_commits(3)) as r:
        r.gitea.fail = [503]
        assert await r.service.resync_once() == 0
        assert r.metric("gfb_status_reads_total", purpose="resync") == 1  # then it stopped
        assert await r.service.resync_once() == 3  # starts again where it was: all three
        assert [int(sha[0], 16) for *_, sha, _ in r.gitea.reads] == [0, 1, 2]


@pytest.mark.anyio
async def test_resync_only_with_the_lease() -> None:
    async def other_holder(cluster: MemoryCluster) -> None:
        assert await cluster.try_acquire_lease("gitea-flux-bridge-resync", "other-pod", 60)

    settings = make_settings()
    store = ObjectStore(lambda u: normalise_repo_url(u, ALIASES))
    cluster = MemoryCluster(store)
    cluster.load(manifests())
    applied(cluster)
    await cluster.start()
    await other_holder(cluster)
    fake = FakeGitea(token=GITEA_TOKEN)
    transport, _ = gitea_transport({"gitea.example.com": fake})
    answers: list[bool] = []
    ask = cluster.try_acquire_lease

    async def counted(*args: Any, **kwargs: Any) -> bool:
        answers.append(await ask(*args, **kwargs))
        return answers[-1]

    cluster.try_acquire_lease = counted  # type: ignore[method-assign]
    service = fast(StatusService(settings, cluster, Metrics(), transport=transport))
    await service.start()
    # The resync loop has asked for the lease, been refused, and decided on that answer.
    await until(lambda: answers, what="the resync loop's lease request")
    assert answers == [False]
    assert fake.posts == []
    await service.stop(grace_seconds=0)


@pytest.mark.anyio
async def test_stop_flushes_the_queue() -> None:
    async with rig(start=False) as r:
        await r.send(fixture("kustomization-succeeded.json"))
        await r.send(fixture("kustomization-progressing.json").replace(
            b'"name":"webapp"', b'"name":"api"'))
        assert r.service.queue_depth == 2
        await r.service.start()
        await r.service.stop(grace_seconds=5)
        assert len(r.gitea.posts) == 2 and r.service.queue_depth == 0
        stopped = await r.send(fixture("kustomization-succeeded.json"))
        assert stopped.status_code == 503


# -- pushes and delivery outcomes ------------------------------------------------------------


def delivery(sha: str = SHA, keys: tuple[ObjectKey, ...] = (WEBAPP, API)) -> Delivery:
    tracked = tuple(Target("kustomize.toolkit.fluxcd.io/v1", k.kind, k.namespace, k.name,
                           "touched") for k in keys)
    plan = Plan("flux-system/gitea", (), tracked)
    record = DeliveryRecord("flux-system/gitea", sha, "refs/heads/main", time.time(), "m-1",
                            record_targets(plan))
    return Delivery.from_record("d-1", record, plan)


def push(sha: str = SHA) -> Push:
    return Push(repo_urls=("https://gitea.example.com/team/webapp.git",),
                full_name="team/webapp", ref="refs/heads/main", sha=sha)


@pytest.mark.anyio
async def test_pending_for_every_tracked_consumer_at_push_time() -> None:
    async with rig() as r:
        r.service.on_push_routed(delivery(), push())
        await settled(r)
        assert r.gitea.contexts(*REPO) == {CONTEXT: "pending",
                                           "flux/eu-west/kustomization/apps/api": "pending"}
        latest = r.gitea.latest(*REPO, CONTEXT)
        assert latest is not None and latest["description"] == "Push received, waiting for Flux"
        assert r.gitea.gets == 1  # one listing of the commit answers for both contexts
        r.service.on_push_routed(delivery(""), push(""))  # a branch deletion: no commit
        await settled(r)
        assert len(r.gitea.posts) == 2


@pytest.mark.anyio
async def test_no_pending_for_a_commit_already_deployed() -> None:
    async with rig(setup=applied) as r:
        await eventually(lambda: len(r.gitea.contexts(*REPO)) == 2)
        await settled(r)
        r.service.on_push_routed(delivery(keys=(WEBAPP,)), push())
        await settled(r)
        assert r.gitea.contexts(*REPO)[CONTEXT] == "success"


@pytest.mark.anyio
async def test_delivery_outcomes_close_the_loop_without_events() -> None:
    async with rig() as r:
        d = delivery()
        r.service.on_push_routed(d, push())
        await settled(r)
        r.cluster.mark_source_fetched(SOURCE, f"main@sha1:{SHA}")
        r.cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}")
        r.service.on_target_changed(d, WEBAPP, RECONCILING)  # not an outcome: nothing
        r.service.on_target_changed(d, WEBAPP, READY)
        await settled(r)
        assert r.gitea.contexts(*REPO)[CONTEXT] == "success"
        # The same success from the event afterwards is not posted again.
        posts = len(r.gitea.posts)
        await r.send(fixture("kustomization-succeeded.json"))
        await settled(r)
        assert len(r.gitea.posts) == posts


@pytest.mark.anyio
async def test_a_timed_out_or_superseded_pending_is_ended() -> None:
    async with rig() as r:
        d = delivery(keys=(API,))
        r.service.on_push_routed(d, push())
        await settled(r)
        # Flux never fetched our commit: the source still holds the one before.
        r.cluster.mark_source_fetched(SOURCE, f"main@sha1:{OLD}")
        r.cluster.mark_applied(API, f"main@sha1:{OLD}")
        r.service.on_target_changed(d, API, TIMED_OUT)
        await settled(r)
        latest = r.gitea.latest(*REPO, "flux/eu-west/kustomization/apps/api")
        assert latest is not None and latest["status"] == "error"
        # Superseded: the delivery saw Flux go past it to a later commit.
        later = delivery(sha="2" * 40, keys=(API,))
        r.service.on_push_routed(later, push("2" * 40))
        await settled(r)
        later.view = DeliveryView((TargetView(API, "track", "skipped", "Superseded", "",
                                              commit=OLD),))
        r.service.on_target_changed(later, API, "skipped")
        await settled(r)
        shown = r.gitea.latest("team", "webapp", "2" * 40, "flux/eu-west/kustomization/apps/api")
        assert shown is not None and shown["status"] == "skipped"


# -- badges ----------------------------------------------------------------------------------


def svg_state(response: httpx.Response) -> tuple[str, str]:
    root = ET.fromstring(response.text)  # noqa: S314 (our own SVG)
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text for t in root.iter(f"{ns}text")]
    colours = [rect.get("fill") for rect in root.iter(f"{ns}rect")
               if rect.get("fill") in ("#4c1", "#e05d44", "#dfb317", "#9f9f9f")]
    assert len(colours) == 1
    return str(texts[-1]), str(colours[0])


@pytest.mark.anyio
async def test_public_badges() -> None:
    async with rig(setup=applied) as r:
        ok = await r.client.get("/badge/team/webapp.svg", params={"branch": "main"})
        assert ok.status_code == 200 and ok.headers["content-type"].startswith("image/svg+xml")
        assert ok.headers["cache-control"] == "no-cache, max-age=0"
        assert svg_state(ok) == ("failed", "#e05d44")  # api failed: the worst wins
        r.cluster.mark_applied(API, f"main@sha1:{SHA}")
        good = await r.client.get("/badge/Team/WebApp.svg?branch=main&cluster=eu-west"
                                  "&style=flat-square")
        assert svg_state(good) == ("deployed", "#4c1")
        cached = await r.client.get("/badge/Team/WebApp.svg?branch=main&cluster=eu-west"
                                    "&style=flat-square",
                                    headers={"If-None-Match": good.headers["etag"]})
        assert cached.status_code == 304 and cached.headers["etag"] == good.headers["etag"]
        r.cluster.mark_progressing(API, f"main@sha1:{OLD}")
        assert svg_state(await r.client.get("/badge/team/webapp.svg")) == ("deploying",
                                                                           "#dfb317")


@pytest.mark.anyio
@pytest.mark.parametrize("path", [
    "/badge/team/webapp.svg?branch=other",
    "/badge/team/webapp.svg?cluster=us-east",
    "/badge/team/webapp.png",
    "/badge/only.svg",
    "/badge/a/b/c.svg",
    "/badge/nobody/nothing.svg?style=%3Cscript%3E",
])
async def test_unknown_badges_are_grey_never_errors(path: str) -> None:
    async with rig(setup=applied) as r:
        reply = await r.client.get(path)
        assert reply.status_code == 200
        assert svg_state(reply) == ("unknown", "#9f9f9f")


@pytest.mark.anyio
async def test_private_badges_need_a_signed_token() -> None:
    def keyed(cluster: MemoryCluster) -> None:
        applied(cluster)
        cluster.mark_applied(API, f"main@sha1:{SHA}")
        cluster.secrets[("gitea-flux-bridge", "badge")] = {"token": b"badge-signing-key"}

    settings = make_settings(badge_key={"secret": "gitea-flux-bridge/badge"})
    async with rig(settings, setup=keyed) as r:
        token = mint_badge_token("badge-signing-key", "team", "webapp", "main")
        ok = await r.client.get("/badge/team/webapp.svg", params={"branch": "main",
                                                                  "token": token})
        assert svg_state(ok) == ("deployed", "#4c1")
        for params in ({"branch": "main"}, {"branch": "main", "token": token[:-3]},
                       {"branch": "dev", "token": token},
                       {"branch": "main", "token": mint_badge_token("x", "team", "webapp",
                                                                    "main")}):
            reply = await r.client.get("/badge/team/webapp.svg", params=params)
            assert reply.status_code == 200 and svg_state(reply) == ("unknown", "#9f9f9f")


@pytest.mark.anyio
async def test_badge_with_an_unreadable_key_is_grey() -> None:
    settings = make_settings(badge_key={"secret": "gitea-flux-bridge/missing"})
    async with rig(settings, setup=applied) as r:
        token = mint_badge_token("k", "team", "webapp", "main")
        reply = await r.client.get(f"/badge/team/webapp.svg?branch=main&token={token}")
        assert reply.status_code == 200 and svg_state(reply) == ("unknown", "#9f9f9f")


# -- configuration and the app -----------------------------------------------------------------


def test_bad_templates_fail_at_start() -> None:
    store = ObjectStore(lambda u: normalise_repo_url(u, {}))
    for statuses in ({"context_template": "flux/{sha}"},
                     {"target_url_template": "https://x/{nope}"},
                     {"context_template": "flux/{cluster"}):
        with pytest.raises(ConfigError):
            StatusService(make_settings(statuses=statuses), MemoryCluster(store), Metrics())


def test_repeat_window_and_read_budget_are_validated() -> None:
    defaults = StatusConfig()
    assert (defaults.repeat_window_seconds, defaults.resync_read_budget) == (5.0, 200)
    for bad, key in (({"repeat_window_seconds": -1}, "repeat_window_seconds"),
                     ({"repeat_window_seconds": 3600}, "repeat_window_seconds"),
                     ({"resync_read_budget": 0}, "resync_read_budget")):
        with pytest.raises(ConfigError, match=f"statuses.{key}"):
            make_settings(statuses=bad)
    env = load_settings(environ={"GFB_STATUSES__REPEAT_WINDOW_SECONDS": "2",
                                 "GFB_STATUSES__RESYNC_READ_BUDGET": "50"})
    assert (env.statuses.repeat_window_seconds, env.statuses.resync_read_budget) == (2.0, 50)


@pytest.mark.anyio
async def test_queue_depth_gauge() -> None:
    async with rig(start=False) as r:
        await r.send(fixture("kustomization-succeeded.json"))
        assert r.metric("gfb_status_queue_depth") == 1 == r.service.queue_depth


# -- wired into the whole app ----------------------------------------------------------------


@pytest.mark.anyio
async def test_whole_app_push_pending_then_ready_success(
    bridge_factory: Any, tmp_path: Path
) -> None:
    (tmp_path / "gitea").write_text(GITEA_TOKEN)
    (tmp_path / "hmac").write_text(HMAC)
    fake = FakeGitea(token=GITEA_TOKEN)
    transport, _ = gitea_transport({"gitea.example.com": fake})
    settings = app_settings(
        gitea=[{"name": "eu", "url": "https://gitea.example.com",
                "token": {"file": str(tmp_path / "gitea")}}],
        events={"hmac_token": {"file": str(tmp_path / "hmac")}})
    bridge = await bridge_factory(settings, transport=transport)
    doc = gp.push("platform/fleet", "refs/heads/main", [gp.commit(
        "platform/fleet", "bump", modified=["clusters/eu-west/apps/podinfo.yaml"])])
    body = gp.gitea_bytes(doc)
    mac = hmac_hex("sha256", RECEIVER_TOKEN, body)
    reply = await bridge.client.post(
        "/hook/" + hook_digest(RECEIVER_TOKEN, "gitea", "flux-system"),
        content=body, headers={"Content-Type": "application/json", "X-Gitea-Event": "push",
                               "X-Gitea-Delivery": "d-status", "X-Gitea-Signature": mac})
    assert reply.status_code == 202, reply.text
    sha = doc["after"]
    context = "flux/eu-west/kustomization/flux-system/apps"
    await eventually(lambda: fake.contexts("platform", "fleet", sha).get(context) == "pending")
    # Flux fetches and applies; the delivery's outcome turns the pending into success.
    bridge.cluster.mark_source_fetched(
        ObjectKey("GitRepository", "flux-system", "flux-system"), f"main@sha1:{sha}")
    bridge.cluster.mark_applied(ObjectKey("Kustomization", "flux-system", "apps"),
                                f"main@sha1:{sha}")
    await eventually(lambda: fake.contexts("platform", "fleet", sha).get(context) == "success",
                     timeout=5)
    event = json.loads(fixture("kustomization-succeeded.json"))
    event["involvedObject"].update(namespace="flux-system", name="apps")
    event["metadata"]["revision"] = f"main@sha1:{sha}"
    event_body = json.dumps(event, separators=(",", ":")).encode()
    sent = await bridge.client.post("/events", content=event_body, headers={
        "Content-Type": "application/json",
        "X-Signature": "sha256=" + hmac_hex("sha256", HMAC, event_body)})
    assert sent.json() == {"accepted": True, "statuses": 1}
    badge = await bridge.client.get("/badge/platform/fleet.svg?branch=main")
    assert badge.status_code == 200 and "image/svg+xml" in badge.headers["content-type"]
    await eventually(lambda: bridge.parts.statuses.queue_depth == 0)
    assert [p[3]["state"] for p in fake.posts if p[3]["context"] == context] == [
        "pending", "success"]
    assert fake.problems == []


@pytest.mark.anyio
async def test_a_pending_still_queued_when_its_push_timed_out_is_not_posted_after_the_outcome(
) -> None:
    gitea = FakeGitea(token=GITEA_TOKEN, version="1.26.3")
    async with rig(fakes={"gitea.example.com": gitea}) as r:
        context = "flux/eu-west/kustomization/apps/api"
        gitea.fail = [503] * 3  # Gitea down: the pending waits for its retry
        d = delivery(keys=(API,))
        r.service.on_push_routed(d, push())
        await eventually(lambda: r.metric("gfb_statuses_total", result="retried") >= 1)
        # The push times out meanwhile: Flux deployed another commit.
        r.cluster.mark_source_fetched(SOURCE, f"main@sha1:{OLD}")
        r.cluster.mark_applied(API, f"main@sha1:{OLD}")
        r.service.on_target_changed(d, API, "timed_out")
        await settled(r)
        shown = gitea.latest(*REPO, context)
        assert shown is not None and shown["status"] == "error", shown
        assert all(body["state"] != "pending" for *_, body in gitea.posts
                   if body["context"] == context)


def test_a_waiting_job_keeps_its_wording_only_for_the_same_state() -> None:
    from receiver.status.decisions import DesiredStatus, replaces_waiting

    def status(state: str, text: str) -> DesiredStatus:
        return DesiredStatus("gitea.example.com/team/webapp", "team", "webapp", SHA,
                             "flux/eu-west/kustomization/apps/api", state, text)

    event = status("success", "Reconciliation succeeded: applied revision main@sha1:x")
    assert not replaces_waiting(event, False, status("success", "Succeeded"), True)
    assert replaces_waiting(event, False, status("failure", "Health check failed"), True)
    assert replaces_waiting(status("pending", "Push received"), False,
                            status("skipped", "Superseded"), True)
    assert replaces_waiting(event, True, status("success", "x"), False)
