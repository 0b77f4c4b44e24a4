"""Two replicas, one cluster: any replica answers for any delivery, and a repeat of a request
is refused whichever replica receives it. Each replica is a whole app with its own memory; they
share only the cluster (here one in-memory cluster, as a real one is shared through watches)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from receiver import signatures as sig
from receiver.delivery.marks import DELIVERIES_ANNOTATION
from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import RECONCILE_ANNOTATION, ObjectKey
from receiver.flux.store import ObjectStore
from receiver.web.app import create_app, url_normaliser
from tests import gitea_payloads as gp
from tests.conftest import ACTIONS_TOKEN, FLEET, GITEA_TOKEN, make_settings, until

pytestmark = pytest.mark.anyio

GITEA_PATH = "/hook/" + sig.hook_digest(GITEA_TOKEN, "gitea", "flux-system")
ACTIONS_PATH = "/hook/" + sig.hook_digest(ACTIONS_TOKEN, "actions", "apps")
SOURCE = ObjectKey("GitRepository", "flux-system", "flux-system")
APPS = ObjectKey("Kustomization", "flux-system", "apps")
AUTH = {"Authorization": f"Bearer {GITEA_TOKEN}"}


class Replicas:
    def __init__(self, cluster: MemoryCluster) -> None:
        self.cluster = cluster
        self.clients: list[httpx.AsyncClient] = []
        self._stack: list[tuple[Any, httpx.AsyncClient]] = []

    async def start(self, **settings: Any) -> httpx.AsyncClient:
        app = create_app(make_settings(**settings), self.cluster)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                   base_url=f"http://replica-{len(self.clients)}.test")
        self._stack.append((lifespan, client))
        self.clients.append(client)
        return client

    async def stop(self, client: httpx.AsyncClient) -> None:
        for i, (lifespan, c) in enumerate(self._stack):
            if c is client:
                await c.aclose()
                await lifespan.__aexit__(None, None, None)
                del self._stack[i]
                return

    async def close(self) -> None:
        for lifespan, client in reversed(self._stack):
            await client.aclose()
            await lifespan.__aexit__(None, None, None)

    def patches(self, key: ObjectKey) -> int:
        return sum(1 for k, _ in self.cluster.patches if k == key)


@pytest.fixture
async def replicas() -> AsyncIterator[Replicas]:
    settings = make_settings()
    cluster = MemoryCluster.from_directory(ObjectStore(url_normaliser(settings)), FLEET)
    group = Replicas(cluster)
    await group.start()
    await group.start()
    yield group
    await group.close()


def push_doc(path: str = "clusters/eu-west/apps/a.yaml") -> dict[str, Any]:
    return gp.push("platform/fleet", "refs/heads/main",
                   [gp.commit("platform/fleet", path + str(time.monotonic_ns()), modified=[path])])


def gitea_headers(body: bytes, delivery: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Gitea-Event": "push",
            "X-Gitea-Delivery": delivery,
            "X-Gitea-Signature": sig.hmac_hex("sha256", GITEA_TOKEN, body)}


async def test_any_replica_answers_for_a_delivery(replicas: Replicas) -> None:
    a, b = replicas.clients
    doc = push_doc()
    body = gp.gitea_bytes(doc)
    reply = await a.post(GITEA_PATH, content=body, headers=gitea_headers(body, "r-1"))
    assert reply.status_code == 202, reply.text
    delivery = reply.json()["delivery"]
    on_a = (await a.get(f"/deliveries/{delivery}", headers=AUTH)).json()
    on_b = (await b.get(f"/deliveries/{delivery}", headers=AUTH)).json()
    assert on_a == on_b
    assert {t["name"]: t["state"] for t in on_b["targets"]}["flux-system"] == "annotated"

    # Flux moves; the replica that never saw the push follows it to the end.
    replicas.cluster.mark_source_fetched(SOURCE, f"main@sha1:{doc['after']}")
    await until(lambda: replicas.patches(APPS) == 1)  # A annotates the consumer
    replicas.cluster.mark_applied(APPS, f"main@sha1:{doc['after']}")
    canary = ObjectKey("HelmRelease", "flux-system", "podinfo-canary")
    replicas.cluster.mark_applied(canary, f"6.5.0+{doc['after'][:12]}")
    r = await b.get(f"/deliveries/{delivery}?wait=5", headers=AUTH)
    last = json.loads(r.text.splitlines()[-1])
    assert last["outcome"] == "ready" and last["final"] is True
    assert last == (await a.get(f"/deliveries/{delivery}", headers=AUTH)).json()


async def test_a_restarted_replica_still_knows_the_delivery(replicas: Replicas) -> None:
    a, _ = replicas.clients
    body = gp.gitea_bytes(push_doc())
    delivery = (await a.post(GITEA_PATH, content=body,
                             headers=gitea_headers(body, "r-2"))).json()["delivery"]
    await replicas.stop(a)
    fresh = await replicas.start()
    answer = await fresh.get(f"/deliveries/{delivery}", headers=AUTH)
    assert answer.status_code == 200
    assert answer.json()["targets"][0]["state"] == "annotated"


async def test_a_repeated_gitea_delivery_on_the_other_replica_annotates_nothing(
    replicas: Replicas,
) -> None:
    a, b = replicas.clients
    body = gp.gitea_bytes(push_doc())
    first = await a.post(GITEA_PATH, content=body, headers=gitea_headers(body, "r-3"))
    assert first.status_code == 202
    before = len(replicas.cluster.patches)
    again = await b.post(GITEA_PATH, content=body, headers=gitea_headers(body, "r-3"))
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate", "delivery": "r-3"}
    assert len(replicas.cluster.patches) == before


async def test_a_replayed_signature_on_the_other_replica_is_refused(replicas: Replicas) -> None:
    a, b = replicas.clients
    body = json.dumps({"repository": "https://gitea.example.com/teams/apps",
                       "ref": "refs/heads/production", "sha": "ab" * 20}).encode()
    headers = {"Content-Type": "application/json",
               "X-Signature": sig.sign_timestamped(ACTIONS_TOKEN, body, int(time.time()))}
    first = await a.post(ACTIONS_PATH, content=body, headers=headers)
    assert first.status_code == 202, first.text
    assert first.json()["targets"], "the push must annotate something for this to mean anything"
    before = len(replicas.cluster.patches)
    replay = await b.post(ACTIONS_PATH, content=body, headers=headers)
    assert replay.status_code == 401
    assert len(replicas.cluster.patches) == before


async def test_two_replicas_racing_on_one_request_annotate_once(replicas: Replicas) -> None:
    a, b = replicas.clients
    body = gp.gitea_bytes(push_doc())
    replies = await asyncio.gather(
        a.post(GITEA_PATH, content=body, headers=gitea_headers(body, "r-4")),
        b.post(GITEA_PATH, content=body, headers=gitea_headers(body, "r-4")))
    assert sorted(r.status_code for r in replies) in ([200, 202], [202, 202])
    assert replicas.patches(SOURCE) == 1
    marks = replicas.cluster.store.get(SOURCE).annotations[DELIVERIES_ANNOTATION]  # type: ignore[union-attr]
    assert len(marks.split()) == 1


async def test_a_conflict_is_read_again_not_lost(replicas: Replicas) -> None:
    a, _ = replicas.clients
    replicas.cluster.fail_next_patches = [409]
    body = gp.gitea_bytes(push_doc())
    reply = await a.post(GITEA_PATH, content=body, headers=gitea_headers(body, "r-5"))
    assert reply.status_code == 202
    assert reply.json()["targets"][0]["state"] == "annotated"
    source = replicas.cluster.store.get(SOURCE)
    assert source is not None and RECONCILE_ANNOTATION in source.annotations


async def test_a_push_refused_as_busy_keeps_its_delivery_id_for_the_retry() -> None:
    settings = make_settings(deliveries={"max_count": 1})
    cluster = MemoryCluster.from_directory(ObjectStore(url_normaliser(settings)), FLEET)
    group = Replicas(cluster)
    client = await group.start(deliveries={"max_count": 1})
    try:
        first = gp.gitea_bytes(push_doc("clusters/eu-west/apps/x.yaml"))
        assert (await client.post(GITEA_PATH, content=first,
                                  headers=gitea_headers(first, "busy-1"))).status_code == 202
        second = gp.gitea_bytes(push_doc("clusters/eu-west/apps/y.yaml"))
        refused = await client.post(GITEA_PATH, content=second,
                                    headers=gitea_headers(second, "busy-2"))
        assert refused.status_code == 503
        # The first delivery finishes; Gitea's redelivery of the refused one is taken.
        doc = json.loads(first)
        cluster.mark_source_fetched(SOURCE, f"main@sha1:{doc['after']}")
        cluster.mark_applied(APPS, f"main@sha1:{doc['after']}")
        cluster.mark_applied(ObjectKey("HelmRelease", "flux-system", "podinfo-canary"),
                             f"6.5.0+{doc['after'][:12]}")
        parts = client._transport.app.state.parts  # type: ignore[attr-defined]
        await until(lambda: parts.deliveries.active_count == 0)
        retried = await client.post(GITEA_PATH, content=second,
                                    headers=gitea_headers(second, "busy-2"))
        assert retried.status_code == 202, retried.text
    finally:
        await group.close()


async def test_ids_cannot_be_forged_or_read_without_the_token(replicas: Replicas) -> None:
    a, b = replicas.clients
    body = gp.gitea_bytes(push_doc())
    delivery = (await a.post(GITEA_PATH, content=body,
                             headers=gitea_headers(body, "r-6"))).json()["delivery"]
    assert (await b.get(f"/deliveries/{delivery}")).status_code == 404
    assert (await b.get(f"/deliveries/{delivery}",
                        headers={"Authorization": "Bearer nope"})).status_code == 404
    assert (await b.get(f"/deliveries/{delivery}",
                        headers={"Authorization": f"Bearer {ACTIONS_TOKEN}"})).status_code == 404
    tampered = delivery[:-3] + ("AAA" if not delivery.endswith("AAA") else "BBB")
    assert (await b.get(f"/deliveries/{tampered}", headers=AUTH)).status_code == 404
    assert (await b.get("/deliveries/a/b", headers=AUTH)).status_code == 404


async def test_a_repeated_push_of_a_commit_in_flight_joins_its_delivery(
    replicas: Replicas,
) -> None:
    a, _ = replicas.clients
    body = gp.gitea_bytes(push_doc())
    first = await a.post(GITEA_PATH, content=body, headers=gitea_headers(body, "join-1"))
    patches = len(replicas.cluster.patches)
    # The webhook fired again under a new delivery id, and a CI job retried: same commit.
    again = await a.post(GITEA_PATH, content=body, headers=gitea_headers(body, "join-2"))
    assert again.status_code == 202
    assert again.json()["delivery"] == first.json()["delivery"]
    assert len(replicas.cluster.patches) == patches
    parts = a._transport.app.state.parts  # type: ignore[attr-defined]
    assert len(parts.deliveries) == 1


async def test_the_same_commits_pushed_over_and_over_never_fill_the_store() -> None:
    settings = make_settings(deliveries={"max_count": 5})
    cluster = MemoryCluster.from_directory(ObjectStore(url_normaliser(settings)), FLEET)
    group = Replicas(cluster)
    client = await group.start(deliveries={"max_count": 5})
    try:
        bodies = [gp.gitea_bytes(push_doc(f"clusters/eu-west/apps/{i}.yaml")) for i in range(5)]
        codes = [
            (await client.post(GITEA_PATH, content=body,
                               headers=gitea_headers(body, f"flood-{round_}-{i}"))).status_code
            for round_ in range(4) for i, body in enumerate(bodies)]
        assert codes == [202] * 20
    finally:
        await group.close()
