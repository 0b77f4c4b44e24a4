"""The in-memory cluster fails and caches as the Kubernetes backend does."""

from __future__ import annotations

from pathlib import Path

import kubernetes
import pytest
import yaml

from receiver.flux.cluster import NEGATIVE_SECRET_TTL, ClusterError, NotFound
from receiver.flux.kube_api import cluster_error as _cluster_error
from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.flux.revisions import READY, applied_revision, progress_at
from receiver.flux.store import ObjectStore
from receiver.web.app import url_normaliser
from tests.conftest import FLEET, make_settings

pytestmark = pytest.mark.anyio
SOURCE = ObjectKey("GitRepository", "flux-system", "fleet")
SECRET = ("flux-system", "gitea-token")
CRDS = Path(__file__).parent.parent / "fixtures" / "crds"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, ttl: float = 30.0) -> MemoryCluster:
    store = ObjectStore(url_normaliser(make_settings()))
    return MemoryCluster.from_directory(store, FLEET, secret_ttl_seconds=ttl, clock=clock)


@pytest.mark.parametrize("status", [400, 403, 404, 409, 410, 413, 422, 429, 500, 502, 503, 504])
async def test_a_failed_patch_is_retryable_exactly_when_kubernetes_would_retry_it(
        status: int) -> None:
    cluster = make(Clock())
    cluster.fail_next_patches = [status]
    with pytest.raises(ClusterError) as caught:
        await cluster.annotate(SOURCE, {"a": "b"})
    real = _cluster_error("patch", kubernetes.client.ApiException(status=status, reason="x"))
    assert type(caught.value) is type(real)
    assert caught.value.retryable == real.retryable
    assert caught.value.status == real.status
    assert isinstance(caught.value, NotFound) == (status == 404)
    assert cluster.patches == []


async def test_secret_reads_are_cached_and_fresh_reads_bypass_the_cache() -> None:
    clock = Clock()
    cluster = make(clock)
    first = await cluster.read_secret(*SECRET)
    assert first is not None and cluster.secret_reads == 1
    cluster.secrets[SECRET] = {"token": b"rotated"}
    # Within the TTL a plain read is served from the cache, as the Kubernetes backend does.
    assert await cluster.read_secret(*SECRET) == first
    assert cluster.secret_reads == 1
    # A fresh read goes to the "API server" and refreshes the cache for later plain reads.
    assert await cluster.read_secret(*SECRET, fresh=True) == {"token": b"rotated"}
    assert cluster.secret_reads == 2
    cluster.secrets[SECRET] = {"token": b"again"}
    assert await cluster.read_secret(*SECRET) == {"token": b"rotated"}
    clock.now += 30.1
    assert await cluster.read_secret(*SECRET) == {"token": b"again"}
    assert cluster.secret_reads == 3


async def test_a_missing_secret_is_remembered_only_briefly() -> None:
    clock = Clock()
    cluster = make(clock)
    assert await cluster.read_secret("apps", "later") is None
    cluster.secrets[("apps", "later")] = {"token": b"t"}
    assert await cluster.read_secret("apps", "later") is None
    clock.now += NEGATIVE_SECRET_TTL + 0.1
    assert await cluster.read_secret("apps", "later") == {"token": b"t"}


async def test_a_read_is_a_copy() -> None:
    cluster = make(Clock(), ttl=0.0)
    data = await cluster.read_secret(*SECRET)
    assert data is not None
    data["token"] = b"changed by a caller"  # type: ignore[index]
    assert cluster.secrets[SECRET]["token"] != b"changed by a caller"


def _crd_status_fields(kind_file: str) -> set[str]:
    crd = yaml.safe_load((CRDS / kind_file).read_text())
    served = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return set(served[0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"])


async def test_a_released_helmrelease_has_only_the_status_fields_its_crd_has() -> None:
    cluster = make(Clock())
    release = next(o for o in cluster.store.list("HelmRelease"))
    sha = "5394cb7f48ab0b1c2d3e4f5a6b7c8d9e0f1a2b3c"
    done = cluster.mark_applied(release.key, f"6.5.0+{sha[:12]}")
    assert set(done.status) <= _crd_status_fields("helm.toolkit.fluxcd.io_helmreleases.yaml")
    assert "lastAppliedRevision" not in done.status
    assert applied_revision(done) == f"6.5.0+{sha[:12]}"
    again = cluster.mark_applied(release.key, "6.5.1+0123456789ab")
    assert [h["version"] for h in again.status["history"]] == [2, 1]
    assert applied_revision(again) == "6.5.1+0123456789ab"


def test_a_helmrelease_is_not_taken_as_applied_from_a_field_its_crd_lacks() -> None:
    sha = "5394cb7f48ab0b1c2d3e4f5a6b7c8d9e0f1a2b3c"
    release = FluxObject({
        "apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease",
        "metadata": {"name": "web", "namespace": "apps", "generation": 1},
        "spec": {"chart": {"spec": {"chart": "./charts/web", "reconcileStrategy": "Revision"}}},
        "status": {"observedGeneration": 1, "lastAppliedRevision": f"6.5.0+{sha[:12]}",
                   "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded"}]},
    })
    assert applied_revision(release) == ""
    assert progress_at(release, sha).state != READY
