"""KubeCluster through the real `kubernetes` client against the in-process fake API server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from receiver.flux.cluster import ClusterError, NotFound
from receiver.flux.kube import KubeCluster
from receiver.flux.objects import (
    API_VERSIONS,
    RECONCILE_ANNOTATION,
    WATCHED_KINDS,
    ObjectKey,
    cache_kinds,
)
from receiver.flux.store import ObjectStore
from receiver.retry import Backoff
from tests.conftest import until
from tests.kubefake import MERGE_PATCH, FakeKube

GIT = API_VERSIONS["GitRepository"]
KS = API_VERSIONS["Kustomization"]
LEASE = "coordination.k8s.io/v1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    with FakeKube() as server:
        yield server


@pytest.fixture
def api_client(fake: FakeKube) -> Iterator[kubernetes.client.ApiClient]:
    client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=fake.url))
    yield client
    client.close()


@pytest.fixture
def make(api_client: kubernetes.client.ApiClient) -> Callable[..., KubeCluster]:
    def build(**options: Any) -> KubeCluster:
        options.setdefault("backoff", Backoff(initial=0.02, maximum=0.1))
        options.setdefault("watch_timeout_seconds", 10)
        return KubeCluster(ObjectStore(lambda url: url), api_client, **options)

    return build


@contextlib.asynccontextmanager
async def running(cluster: KubeCluster) -> AsyncIterator[KubeCluster]:
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    await until(check, timeout)


async def synced(cluster: KubeCluster) -> KubeCluster:
    await eventually(lambda: cluster.synced)
    return cluster


def obj(kind: str, name: str, namespace: str = "flux-system", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSIONS[kind],
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def gitrepo(name: str, namespace: str = "flux-system") -> dict[str, Any]:
    return obj("GitRepository", name, namespace, url=f"https://gitea.example/org/{name}.git")


def secret(name: str, namespace: str, **data: bytes) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def key(kind: str, name: str, namespace: str = "flux-system") -> ObjectKey:
    return ObjectKey(kind, namespace, name)


def seed(fake: FakeKube) -> None:
    fake.put(gitrepo("app"))
    fake.put(gitrepo("infra"))
    fake.put(obj("Kustomization", "app", path="./apps", sourceRef={"kind": "GitRepository",
                                                                    "name": "app"}))
    fake.put(obj("OCIRepository", "charts", url="oci://example/charts"))
    fake.put(obj("HelmRelease", "web", chartRef={"kind": "OCIRepository", "name": "charts"}))
    fake.put(obj("Receiver", "gitea", type="generic-hmac"))


# -- list + watch ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_list_fills_the_store_and_marks_synced(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    seed(fake)
    cluster = make()
    assert not cluster.synced
    async with running(cluster):
        await synced(cluster)
        assert len(cluster.store) == 6
        app = cluster.store.get(key("GitRepository", "app"))
        assert app is not None
        # List items arrive without kind/apiVersion; the cache fills them in.
        assert app.raw["kind"] == "GitRepository" and app.raw["apiVersion"] == GIT
        assert [o.name for o in cluster.store.consumers_of(app.key)] == ["app"]
        assert fake.count("list") == len(WATCHED_KINDS)
        assert cluster.sync_errors == {}


@pytest.mark.anyio
async def test_watch_events_add_modify_delete(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    seed(fake)
    async with running(make()) as cluster:
        await synced(cluster)
        store = cluster.store
        fake.put(gitrepo("new"))
        await eventually(lambda: store.get(key("GitRepository", "new")) is not None)
        fake.modify(GIT, "GitRepository", "flux-system", "app",
                    lambda o: o["spec"].update(url="https://gitea.example/org/moved.git"))
        await eventually(
            lambda: [o.name for o in store.sources_for_url("https://gitea.example/org/moved.git")]
            == ["app"]
        )
        fake.delete(KS, "Kustomization", "flux-system", "app")
        await eventually(lambda: store.get(key("Kustomization", "app")) is None)
        assert fake.count("list") == len(WATCHED_KINDS)  # no relist needed


@pytest.mark.anyio
@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_expired_watch_relists_without_losing_changes(
    fake: FakeKube, make: Callable[..., KubeCluster], as_http: bool
) -> None:
    fake.gone_as_http = as_http
    seed(fake)
    async with running(make()) as cluster:
        await synced(cluster)
        store = cluster.store
        # Changes the open watches never see; then the history is compacted away.
        fake.modify(GIT, "GitRepository", "flux-system", "infra",
                    lambda o: o["metadata"].setdefault("labels", {}).update(tier="core"),
                    notify=False)
        fake.delete(GIT, "GitRepository", "flux-system", "app", notify=False)
        fake.put(gitrepo("late"), notify=False)
        fake.compact()
        await eventually(lambda: store.get(key("GitRepository", "late")) is not None)
        await eventually(lambda: store.get(key("GitRepository", "app")) is None)
        infra = store.get(key("GitRepository", "infra"))
        assert infra is not None and infra.labels == {"tier": "core"}
        await eventually(lambda: fake.count("list") == 2 * len(WATCHED_KINDS))
        # The relist kept unchanged objects and the watches carry on from it.
        assert store.get(key("Receiver", "gitea")) is not None
        fake.put(gitrepo("after"))
        await eventually(lambda: store.get(key("GitRepository", "after")) is not None)


@pytest.mark.anyio
async def test_dropped_watches_resume_from_last_resource_version(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    seed(fake)
    async with running(make()) as cluster:
        await synced(cluster)
        watches = fake.count("watch")
        fake.drop_watches()
        fake.put(gitrepo("during-outage"))
        await eventually(
            lambda: cluster.store.get(key("GitRepository", "during-outage")) is not None
        )
        assert fake.count("watch") > watches
        assert fake.count("list") == len(WATCHED_KINDS)  # resumed, not relisted


@pytest.mark.anyio
async def test_watch_server_errors_back_off_then_recover(
    fake: FakeKube, make: Callable[..., KubeCluster], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="receiver.flux.kube")
    seed(fake)
    calls: list[tuple[str, bool]] = []
    cluster = make(kinds=("GitRepository",), observe=lambda c, s, e: calls.append((c, e)))
    async with running(cluster):
        await synced(cluster)
        fake.fail_next(3, 500, verb="watch")
        fake.drop_watches()
        fake.put(gitrepo("after-errors"))
        await eventually(
            lambda: cluster.store.get(key("GitRepository", "after-errors")) is not None
        )
        assert any("HTTP 500" in r.getMessage() for r in caplog.records)
        assert ("watch", True) in calls and ("watch", False) in calls
        await eventually(lambda: cluster.sync_errors == {})
        assert fake.count("list") == 1


@pytest.mark.anyio
async def test_bookmarks_advance_the_resume_point(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    fake.put(gitrepo("app"))
    async with running(make(kinds=("GitRepository",))) as cluster:
        await synced(cluster)
        await eventually(lambda: fake.open_watches() == 1)
        fake.put(gitrepo("elsewhere"), notify=False)
        fake.send_bookmark()
        # The watch thread has taken the bookmark's resourceVersion as its resume point.
        await eventually(lambda: [t.resource_version for t in cluster._watches._targets] == [
            str(fake.resource_version)])
        fake.drop_watches()
        await eventually(lambda: fake.count("watch") == 2)
        resume = [r for r in fake.requests if r.verb == "watch"][-1]
        assert resume.query["resourceVersion"] == str(fake.resource_version)
        assert resume.query["allowWatchBookmarks"] == "true"


@pytest.mark.anyio
async def test_watch_timeout_resumes_without_relist(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    fake.put(gitrepo("app"))
    async with running(make(kinds=("GitRepository",), watch_timeout_seconds=1)) as cluster:
        await synced(cluster)
        await eventually(lambda: fake.count("watch") >= 2, timeout=4)
        assert fake.count("list") == 1
        assert cluster.sync_errors == {}


@pytest.mark.anyio
async def test_missing_crd_keeps_that_kind_unsynced(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    seed(fake)
    fake.unserve(API_VERSIONS["HelmRelease"], "HelmRelease")
    async with running(make()) as cluster:
        await eventually(lambda: "HelmRelease" in cluster.sync_errors)
        await eventually(lambda: cluster.store.get(key("Receiver", "gitea")) is not None)
        assert not cluster.synced
        assert "404" in cluster.sync_errors["HelmRelease"]
        fake.serve(API_VERSIONS["HelmRelease"], "HelmRelease")
        await synced(cluster)
        assert cluster.store.get(key("HelmRelease", "web")) is not None
        await eventually(lambda: cluster.sync_errors == {})


@pytest.mark.anyio
async def test_an_optional_kind_without_its_crd_is_not_installed_not_unready(
    fake: FakeKube, make: Callable[..., KubeCluster], caplog: pytest.LogCaptureFixture
) -> None:
    seed(fake)
    policy = API_VERSIONS["ImagePolicy"]
    fake.unserve(policy, "ImagePolicy")
    fake.put(obj("ImagePolicy", "app", imageRepositoryRef={"name": "app"}))
    caplog.set_level(logging.INFO, logger="receiver.flux.kube")
    async with running(make(absent_recheck_seconds=0.05)) as cluster:
        await synced(cluster)
        assert cluster.not_installed == ["ImagePolicy"]
        assert cluster.sync_errors == {}
        # Looked for again, said once.
        await eventually(lambda: fake.count("list", "imagepolicies") >= 3)
        assert sum("ImagePolicy is not installed" in r.getMessage()
                   for r in caplog.records) == 1
        fake.serve(policy, "ImagePolicy")  # the CRD is installed later
        await eventually(lambda: cluster.store.get(key("ImagePolicy", "app")) is not None)
        assert cluster.not_installed == []
        fake.put(obj("ImagePolicy", "web", imageRepositoryRef={"name": "web"}))
        await eventually(lambda: cluster.store.get(key("ImagePolicy", "web")) is not None)
        # Uninstalled again: what was cached goes, and it is reported again.
        fake.unserve(policy, "ImagePolicy")
        fake.drop_watches()
        await eventually(lambda: cluster.not_installed == ["ImagePolicy"])
        await eventually(lambda: cluster.store.list("ImagePolicy") == [])
        await eventually(lambda: cluster.sync_errors == {})  # the dropped watches resume
        assert cluster.synced


@pytest.mark.anyio
async def test_an_optional_kind_rbac_leaves_out_is_not_permitted_not_unready(
    fake: FakeKube, make: Callable[..., KubeCluster], caplog: pytest.LogCaptureFixture
) -> None:
    # RBAC managed outside the chart, written before the image kinds were watched: the
    # bridge keeps serving Git pushes and says what it cannot see, instead of going unready.
    seed(fake)
    repository = API_VERSIONS["ImageRepository"]
    fake.forbid(repository, "ImageRepository")
    fake.put(obj("ImageRepository", "app", image="gitea.example.com/platform/app"))
    caplog.set_level(logging.INFO, logger="receiver.flux.kube")
    async with running(make(absent_recheck_seconds=0.05)) as cluster:
        await synced(cluster)
        assert cluster.not_permitted == ["ImageRepository"]
        assert cluster.not_installed == [] and cluster.sync_errors == {}
        assert cluster.store.get(key("GitRepository", "app")) is not None
        await eventually(lambda: fake.count("list", "imagerepositories") >= 3)
        assert sum("ImageRepository is not permitted" in r.getMessage()
                   for r in caplog.records) == 1
        fake.forbid(repository, "ImageRepository", False)  # the grant is added
        await eventually(lambda: cluster.store.get(key("ImageRepository", "app")) is not None)
        assert cluster.not_permitted == []


@pytest.mark.anyio
async def test_a_routed_kind_without_its_crd_is_still_a_failure(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    fake.unserve(API_VERSIONS["GitRepository"], "GitRepository")
    async with running(make(kinds=("GitRepository", "ImageRepository"))) as cluster:
        await eventually(lambda: "GitRepository" in cluster.sync_errors)
        assert not cluster.synced and cluster.not_installed == []


@pytest.mark.anyio
async def test_paged_list(fake: FakeKube, make: Callable[..., KubeCluster]) -> None:
    for i in range(5):
        fake.put(gitrepo(f"repo-{i}"))
    async with running(make(kinds=("GitRepository",), list_page_size=2)) as cluster:
        await synced(cluster)
        assert len(cluster.store.list("GitRepository")) == 5
        assert fake.count("list") == 3


def test_the_fake_serves_custom_resource_lists_as_the_api_server_does(
    fake: FakeKube, api_client: kubernetes.client.ApiClient
) -> None:
    for i in range(3):
        fake.put(gitrepo(f"repo-{i}"))
    api = kubernetes.client.CustomObjectsApi(api_client)
    group, version = GIT.split("/")
    first = api.list_cluster_custom_object(group, version, "gitrepositories", limit=2)
    assert first["kind"] == "GitRepositoryList" and first["apiVersion"] == GIT
    assert {(i["kind"], i["apiVersion"]) for i in first["items"]} == {("GitRepository", GIT)}
    token = first["metadata"]["continue"]
    rest = api.list_cluster_custom_object(group, version, "gitrepositories", limit=2,
                                          _continue=token)
    assert [i["metadata"]["name"] for i in rest["items"]] == ["repo-2"]
    # A token outlives neither compaction nor, here, zero seconds.
    fake.continue_ttl_seconds = 0.0
    with pytest.raises(kubernetes.client.ApiException) as expired:
        api.list_cluster_custom_object(group, version, "gitrepositories", limit=2,
                                       _continue=token)
    assert expired.value.status == 410 and expired.value.reason == "Gone"
    assert '"reason":"Expired"' in (expired.value.body or "").replace(" ", "")
    fake.continue_ttl_seconds = None
    fake.compact()
    with pytest.raises(kubernetes.client.ApiException) as compacted:
        api.list_cluster_custom_object(group, version, "gitrepositories", limit=2,
                                       _continue=token)
    assert compacted.value.status == 410


@pytest.mark.anyio
async def test_a_continue_token_expired_between_pages_starts_the_list_again(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    for i in range(5):
        fake.put(gitrepo(f"repo-{i}"))
    fake.before_next_continue = fake.compact  # etcd compacts between the first two pages
    async with running(make(kinds=("GitRepository",), list_page_size=2)) as cluster:
        await synced(cluster)
        assert len(cluster.store.list("GitRepository")) == 5
        lists = [r for r in fake.requests if r.verb == "list"]
        # First page, the expired continue (410), then a whole new list of three pages.
        assert [bool(r.query.get("continue")) for r in lists] == [False, True, False, True, True]
        assert cluster.sync_errors == {}


@pytest.mark.anyio
async def test_namespaced_mode_only_sees_watched_namespaces(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    for ns in ("team-a", "team-b", "other"):
        fake.put(gitrepo("app", ns))
    async with running(make(namespaces=("team-a", "team-b"), kinds=("GitRepository",))) as c:
        await synced(c)
        assert {o.namespace for o in c.store.list("GitRepository")} == {"team-a", "team-b"}
        namespaced = [r for r in fake.requests if r.verb == "list"]
        assert sorted(r.namespace or "" for r in namespaced) == ["team-a", "team-b"]
        fake.put(gitrepo("ignored", "other"))
        fake.put(gitrepo("seen", "team-a"))
        await eventually(lambda: c.store.get(key("GitRepository", "seen", "team-a")) is not None)
        assert c.store.get(key("GitRepository", "ignored", "other")) is None
        # A relist in one namespace replaces only that namespace's objects.
        fake.delete(GIT, "GitRepository", "team-a", "app", notify=False)
        fake.compact()
        await eventually(lambda: c.store.get(key("GitRepository", "app", "team-a")) is None)
        await eventually(lambda: fake.count("list") == 4)
        assert c.store.get(key("GitRepository", "app", "team-b")) is not None
        assert c.lease_namespace == "team-a"


@pytest.mark.anyio
async def test_stop_is_prompt(fake: FakeKube, make: Callable[..., KubeCluster]) -> None:
    seed(fake)
    cluster = make(watch_timeout_seconds=300)
    await cluster.start()
    await synced(cluster)
    await eventually(lambda: fake.open_watches() == len(WATCHED_KINDS))
    started = time.monotonic()
    await cluster.stop()
    assert time.monotonic() - started < 1.0
    assert not [t for t in threading.enumerate() if t.name.startswith("watch ")]


# -- annotate -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_annotate_sends_a_merge_patch_of_only_the_annotation(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    ks = obj("Kustomization", "app", path="./apps", interval="10m")
    ks["metadata"]["annotations"] = {"team": "a"}
    ks["metadata"]["labels"] = {"tier": "web"}
    fake.put(ks)
    async with running(make()) as cluster:
        await synced(cluster)
        patched = await cluster.annotate(key("Kustomization", "app"), {RECONCILE_ANNOTATION: "t1"})
        patch = [r for r in fake.requests if r.verb == "patch"]
        assert len(patch) == 1
        assert patch[0].content_type == MERGE_PATCH
        assert patch[0].body == {"metadata": {"annotations": {RECONCILE_ANNOTATION: "t1"}}}
        stored = fake.get(KS, "Kustomization", "flux-system", "app")
        assert stored is not None
        assert stored["metadata"]["annotations"] == {"team": "a", RECONCILE_ANNOTATION: "t1"}
        assert stored["metadata"]["labels"] == {"tier": "web"}
        assert stored["spec"] == {"path": "./apps", "interval": "10m"}
        assert patched.annotations[RECONCILE_ANNOTATION] == "t1"
        assert patched.kind == "Kustomization"
        # Visible in the cache as soon as annotate returns, not only after the watch event.
        cached = cluster.store.get(key("Kustomization", "app"))
        assert cached is not None and cached.annotations[RECONCILE_ANNOTATION] == "t1"


@pytest.mark.anyio
async def test_annotate_missing_object_is_not_found(make: Callable[..., KubeCluster]) -> None:
    async with running(make()) as cluster:
        await synced(cluster)
        with pytest.raises(NotFound):
            await cluster.annotate(key("GitRepository", "nope"), {RECONCILE_ANNOTATION: "t"})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "retryable"), [(500, True), (503, True), (429, True), (409, True), (403, False)]
)
async def test_annotate_errors_map_to_cluster_error(
    fake: FakeKube, make: Callable[..., KubeCluster], status: int, retryable: bool
) -> None:
    fake.put(gitrepo("app"))
    calls: list[tuple[str, bool]] = []
    cluster = make(kinds=("GitRepository",), observe=lambda c, s, e: calls.append((c, e)))
    async with running(cluster):
        await synced(cluster)
        fake.fail_next(1, status, verb="patch")
        with pytest.raises(ClusterError) as caught:
            await cluster.annotate(key("GitRepository", "app"), {RECONCILE_ANNOTATION: "t"})
        assert caught.value.status == status
        assert caught.value.retryable is retryable
        assert not isinstance(caught.value, NotFound)
        if status >= 500:
            assert ("patch", True) in calls
        # The next attempt goes through.
        await cluster.annotate(key("GitRepository", "app"), {RECONCILE_ANNOTATION: "t"})


# -- Secrets --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_secret_is_read_by_get_cached_and_refreshed(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    fake.put(secret("token", "flux-system", token=b"s3cr3t\n", other=b"\x00\xff"))
    cluster = make(kinds=())
    async with running(cluster):
        data = await cluster.read_secret("flux-system", "token")
        assert data == {"token": b"s3cr3t\n", "other": b"\x00\xff"}
        assert await cluster.read_secret("flux-system", "token") == data
        assert fake.count("get", "secrets") == 1
        fake.put(secret("token", "flux-system", token=b"rotated"))
        assert await cluster.read_secret("flux-system", "token") == data  # still cached
        fresh = await cluster.read_secret("flux-system", "token", fresh=True)
        assert fresh == {"token": b"rotated"}
        assert await cluster.read_secret("flux-system", "token") == fresh  # cache refreshed
        assert fake.count("get", "secrets") == 2
        assert fake.count("list", "secrets") == fake.count("watch", "secrets") == 0


@pytest.mark.anyio
async def test_concurrent_secret_reads_share_one_request(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    fake.put(secret("token", "flux-system", token=b"t"))
    cluster = make(kinds=(), secret_ttl_seconds=0.0)
    async with running(cluster):
        results = await asyncio.gather(
            *(cluster.read_secret("flux-system", "token") for _ in range(10))
        )
        assert all(r == {"token": b"t"} for r in results)
        assert fake.count("get", "secrets") == 1


@pytest.mark.anyio
async def test_missing_secret_is_none_and_briefly_cached(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    async with running(make(kinds=())) as cluster:
        assert await cluster.read_secret("flux-system", "absent") is None
        assert await cluster.read_secret("flux-system", "absent") is None
        assert fake.count("get", "secrets") == 1
        fake.put(secret("absent", "flux-system", token=b"now"))
        assert await cluster.read_secret("flux-system", "absent", fresh=True) == {"token": b"now"}


@pytest.mark.anyio
async def test_secret_errors_raise_without_leaking(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    fake.put(secret("token", "flux-system", token=b"s3cr3t"))
    async with running(make(kinds=())) as cluster:
        fake.fail_next(1, 500, verb="get")
        with pytest.raises(ClusterError) as caught:
            await cluster.read_secret("flux-system", "token")
        assert caught.value.retryable and caught.value.status == 500
        assert "s3cr3t" not in str(caught.value)
        # Failures are not cached.
        assert await cluster.read_secret("flux-system", "token") == {"token": b"s3cr3t"}


# -- Lease ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_lease_acquire_renew_and_contention(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    one, two = (make(kinds=(), lease_namespace="bridge") for _ in range(2))
    assert await one.try_acquire_lease("resync", "one", 15)
    lease = fake.get(LEASE, "Lease", "bridge", "resync")
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == "one"
    assert lease["spec"]["leaseDurationSeconds"] == 15
    assert lease["spec"]["renewTime"].endswith("Z") and "." in lease["spec"]["renewTime"]

    assert not await two.try_acquire_lease("resync", "two", 15)
    assert await one.try_acquire_lease("resync", "one", 15)  # renew
    renewed = fake.get(LEASE, "Lease", "bridge", "resync")
    assert renewed is not None
    assert renewed["metadata"]["resourceVersion"] != lease["metadata"]["resourceVersion"]
    assert renewed["spec"]["acquireTime"] == lease["spec"]["acquireTime"]
    assert renewed["spec"].get("leaseTransitions", 0) == lease["spec"].get("leaseTransitions", 0)

    # Expired: the other replica takes over, and the old holder is refused.
    fake.modify(LEASE, "Lease", "bridge", "resync",
                lambda o: o["spec"].update(renewTime="2020-01-01T00:00:00.000000Z"))
    assert await two.try_acquire_lease("resync", "two", 15)
    taken = fake.get(LEASE, "Lease", "bridge", "resync")
    assert taken is not None and taken["spec"]["holderIdentity"] == "two"
    assert taken["spec"]["leaseTransitions"] == lease["spec"].get("leaseTransitions", 0) + 1
    assert not await one.try_acquire_lease("resync", "one", 15)


def test_lease_namespace_defaults(
    make: Callable[..., KubeCluster], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    assert make(kinds=()).lease_namespace == "flux-system"
    monkeypatch.setenv("POD_NAMESPACE", "bridge")
    assert make(kinds=()).lease_namespace == "bridge"
    assert make(kinds=(), namespaces=("apps",)).lease_namespace == "apps"
    assert make(kinds=(), namespaces=("apps",), lease_namespace="x").lease_namespace == "x"


@pytest.mark.anyio
async def test_lease_write_conflict_is_false(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    cluster = make(kinds=(), lease_namespace="bridge")
    fake.fail_next(1, 409, verb="create")
    assert not await cluster.try_acquire_lease("resync", "one", 15)
    assert await cluster.try_acquire_lease("resync", "one", 15)
    fake.fail_next(1, 409, verb="update")
    assert not await cluster.try_acquire_lease("resync", "one", 15)
    fake.fail_next(1, 500, verb="get")
    with pytest.raises(ClusterError) as caught:
        await cluster.try_acquire_lease("resync", "one", 15)
    assert caught.value.retryable


@pytest.mark.anyio
async def test_racing_replicas_get_exactly_one_lease(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    replicas = [make(kinds=(), lease_namespace="bridge") for _ in range(4)]
    won = await asyncio.gather(
        *(r.try_acquire_lease("resync", f"r{i}", 15) for i, r in enumerate(replicas))
    )
    assert won.count(True) == 1
    lease = fake.get(LEASE, "Lease", "bridge", "resync")
    assert lease is not None and lease["spec"]["holderIdentity"] == f"r{won.index(True)}"


@pytest.mark.anyio
async def test_the_helm_source_kinds_are_optional_and_indexed_once_permitted(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    # RBAC managed outside the chart, from before HelmRepository / HelmChart were watched (it
    # grants them `patch` only): reported, not unready; cached and indexed once granted.
    seed(fake)
    for kind in ("HelmRepository", "HelmChart"):
        fake.forbid(API_VERSIONS[kind], kind)
    fake.put(obj("HelmRepository", "charts", type="oci", url="oci://gitea.example.com/platform"))
    fake.put(obj("HelmChart", "flux-system-web", chart="web",
                 sourceRef={"kind": "HelmRepository", "name": "charts"}))
    async with running(make(absent_recheck_seconds=0.05)) as cluster:
        await synced(cluster)
        assert cluster.not_permitted == ["HelmChart", "HelmRepository"]
        assert cluster.sync_errors == {}
        for kind in ("HelmRepository", "HelmChart"):
            fake.forbid(API_VERSIONS[kind], kind, False)
        # (This store's URL normaliser is the identity.)
        url = "oci://gitea.example.com/platform"
        await eventually(lambda: bool(cluster.store.helm_repositories_for_url(url)))
        repos = cluster.store.helm_repositories_for_url(url)
        assert [r.name for r in repos] == ["charts"]
        await eventually(lambda: cluster.store.get(key("HelmChart", "flux-system-web"))
                         is not None)
        assert [c.name for c in cluster.store.helm_charts_for(repos[0].key, "WEB")] == [
            "flux-system-web"]
        assert cluster.not_permitted == []


@pytest.mark.anyio
async def test_the_cache_keeps_no_field_ownership(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    # managedFields is about half of a listed Flux object and nothing reads it: at 120,000
    # objects keeping it cost about 450 MiB (docs/benchmarks.md).
    seed(fake)
    owned = obj("Kustomization", "owned", path="./owned",
                sourceRef={"kind": "GitRepository", "name": "app"})
    owned["metadata"]["labels"] = {"team": "a"}
    owned["metadata"]["managedFields"] = [
        {"manager": "kubectl", "operation": "Apply", "time": "2026-12-07T10:00:00Z",
         "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:path": {}}}}]
    fake.put(owned)
    async with running(make()) as cluster:
        await synced(cluster)
        cached = cluster.store.get(key("Kustomization", "owned"))
        assert cached is not None
        assert "managedFields" not in cached.metadata
        # Everything else of it is kept: routing reads spec, labels and annotations.
        assert cached.labels == {"team": "a"} and cached.spec["path"] == "./owned"
        # A watch event is stored the same way.
        fake.put(dict(owned, spec={**owned["spec"], "path": "./moved"}))
        await eventually(lambda: (k := cluster.store.get(key("Kustomization", "owned")))
                         is not None and k.spec["path"] == "./moved")
        moved = cluster.store.get(key("Kustomization", "owned"))
        assert moved is not None and "managedFields" not in moved.metadata


# -- canaries (`statuses.canaries`) ---------------------------------------------------------


@pytest.mark.anyio
async def test_canaries_and_their_targets_labels_are_cached_targets_slim(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    seed(fake)
    labels = {"kustomize.toolkit.fluxcd.io/name": "app",
              "kustomize.toolkit.fluxcd.io/namespace": "flux-system"}
    deployment = obj("Deployment", "web", "apps", replicas=2,
                     template={"spec": {"containers": [{"name": "web", "image": "x" * 500}]}})
    deployment["metadata"]["labels"] = labels
    fake.put(deployment)
    fake.put(obj("Canary", "web", "apps", targetRef={"kind": "Deployment", "name": "web"}))
    async with running(make(**cache_kinds(True))) as cluster:
        await synced(cluster)
        canary = cluster.store.get(key("Canary", "web", "apps"))
        assert canary is not None and canary.spec["targetRef"]["name"] == "web"
        cached = cluster.store.get(key("Deployment", "web", "apps"))
        assert cached is not None and cached.labels == labels
        assert "spec" not in cached.raw  # the pod template is not kept
        # A change of the target's labels (a new owner) reaches the cache, slim as ever.
        moved = dict(deployment, metadata={**deployment["metadata"], "labels": {"app": "web"}})
        fake.put(moved)
        await eventually(lambda: (d := cluster.store.get(key("Deployment", "web", "apps")))
                         is not None and d.labels == {"app": "web"})
        updated = cluster.store.get(key("Deployment", "web", "apps"))
        assert updated is not None and "spec" not in updated.raw


@pytest.mark.anyio
async def test_without_flagger_installed_canaries_are_not_installed_not_unready(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    seed(fake)
    fake.unserve(API_VERSIONS["Canary"], "Canary")
    async with running(make(absent_recheck_seconds=0.05, **cache_kinds(True))) as cluster:
        await synced(cluster)
        assert cluster.not_installed == ["Canary"]
        assert cluster.sync_errors == {}
    assert fake.count("list", "canaries") >= 1


@pytest.mark.anyio
async def test_with_canaries_off_neither_canaries_nor_workloads_are_read(
    fake: FakeKube, make: Callable[..., KubeCluster]
) -> None:
    seed(fake)
    async with running(make()) as cluster:
        await synced(cluster)
    assert fake.count("list", "canaries") == fake.count("list", "deployments") == 0
    assert fake.count("list") == len(WATCHED_KINDS)


def test_the_backend_leaves_the_core_v1_models_unloaded() -> None:
    """The client's `CoreV1Api` builds a pydantic model for every core/v1 type when loaded
    (about 20 MB of every bridge's memory); the backend reads Secrets and writes Events
    without it, through the same ApiClient (the calls themselves: the tests above)."""
    probe = ("import sys, kubernetes\n"
             "from receiver.flux.kube import KubeCluster\n"
             "from receiver.flux.store import ObjectStore\n"
             "client = kubernetes.client.ApiClient(kubernetes.client.Configuration())\n"
             "KubeCluster(ObjectStore(lambda url: url), client)\n"
             "print(hasattr(client, 'param_serialize'),\n"
             "      'kubernetes.client.api.core_v1_api' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    pydantic_client, loaded = out.stdout.split()
    assert loaded == ("False" if pydantic_client == "True" else "True")
