"""Pull-request previews against a real Gitea: the bridge's comment appears on a real pull
request, is edited in place as the preview changes, is found again by a restarted bridge,
and says torn down when the preview's objects go; the statuses land on the head commit.

Gitea is real (its REST API, scopes, poster checks); the cluster is a MemoryCluster playing
Flux, so the module needs no API server.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from receiver.config import Settings
from receiver.config_load import load_settings
from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import ObjectKey
from receiver.flux.store import ObjectStore
from receiver.giturls import normalise_repo_url
from receiver.metrics import Metrics
from receiver.status.service import StatusService
from tests.conftest import until
from tests.e2e.e2e_env import start_gitea, stopping
from tests.e2e.e2e_harness import Gitea, e2e_peers

pytestmark = pytest.mark.e2e

OWNER, REPO = "team", "webapp"
SOURCE = ObjectKey("GitRepository", "previews", "pr")
APP = ObjectKey("Kustomization", "previews", "pr")
MARKER = "<!-- gitea-flux-bridge:preview cluster=e2e -->"


@pytest.fixture(scope="module")
def gitea(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gitea]:
    bin_dir, static_root = e2e_peers(("gitea",))
    assert static_root is not None
    with stopping() as teardown:
        server = start_gitea(bin_dir, static_root, tmp_path_factory.mktemp("previews") / "gitea",
                             teardown)
        server.create_org(OWNER)
        server.create_repo(OWNER, REPO)
        yield server


def open_pull(gitea: Gitea, branch: str) -> tuple[int, str]:
    head = gitea.commit_files(OWNER, REPO, {f"{branch}.txt": branch}, f"work on {branch}",
                              new_branch=branch)
    pull = gitea.api("POST", f"/repos/{OWNER}/{REPO}/pulls",
                     {"head": branch, "base": "main", "title": f"Preview {branch}"})
    return int(pull["number"]), head


def settings_for(gitea: Gitea, home: Path) -> Settings:
    token = gitea.create_token(f"bridge-{time.monotonic_ns()}",
                               ["write:repository", "write:issue", "read:user"])
    (home / "gitea-token").write_text(token)
    return load_settings(environ={}, overrides={
        "cluster_name": "e2e",
        "gitea": [{"name": "e2e", "url": gitea.url,
                   "token": {"file": str(home / "gitea-token")}}],
        "statuses": {"resync_interval_seconds": 3600, "lease_duration_seconds": 10,
                     "previews": {"comment_interval_seconds": 0.2}}})


def preview(gitea: Gitea, number: int, sha: str) -> list[dict[str, Any]]:
    notes = {"event.toolkit.fluxcd.io/change_request": str(number),
             "event.toolkit.fluxcd.io/commit": sha,
             "event.toolkit.fluxcd.io/preview-url": f"https://pr-{number}.preview.example.com"}
    return [
        {"kind": "GitRepository",
         "metadata": {"name": "pr", "namespace": "previews", "annotations": notes},
         "spec": {"url": gitea.clone_url(OWNER, REPO), "ref": {"commit": sha}}},
        {"kind": "Kustomization",
         "metadata": {"name": "pr", "namespace": "previews", "annotations": notes},
         "spec": {"sourceRef": {"kind": "GitRepository", "name": "pr"}, "path": "./"}}]


def ours(gitea: Gitea, number: int) -> list[dict[str, Any]]:
    comments = gitea.api("GET", f"/repos/{OWNER}/{REPO}/issues/{number}/comments")
    return [c for c in comments if MARKER in c["body"] and c["user"]["login"] == gitea.admin]


def says(gitea: Gitea, number: int, text: str) -> dict[str, Any] | None:
    found = ours(gitea, number)
    return found[0] if len(found) == 1 and text in found[0]["body"] else None


async def started(settings: Settings, cluster: MemoryCluster) -> StatusService:
    service = StatusService(settings, cluster, Metrics())
    await service.start()
    return service


@pytest.fixture
async def cluster() -> AsyncIterator[MemoryCluster]:
    store = ObjectStore(lambda url: normalise_repo_url(url, {}))
    memory = MemoryCluster(store)
    await memory.start()
    yield memory


@pytest.mark.anyio
async def test_the_comment_on_a_real_pull_request_is_edited_in_place(
        gitea: Gitea, cluster: MemoryCluster, tmp_path: Path) -> None:
    number, head = open_pull(gitea, "feature")
    settings = settings_for(gitea, tmp_path)
    cluster.load(preview(gitea, number, head))
    cluster.mark_source_fetched(SOURCE, f"sha1:{head}")
    cluster.mark_applied(APP, f"sha1:{head}")
    service = await started(settings, cluster)
    try:
        first = await until(lambda: says(gitea, number, "on cluster `e2e`: success"), 120,
                            "the preview comment", in_thread=True)
        await until(lambda: any(s["status"] == "success" and
                                s["context"] == "flux/e2e/kustomization/previews/pr"
                                for s in gitea.statuses(OWNER, REPO, head)),
                    120, "the head commit's status", in_thread=True)
        cluster.mark_failed(APP, f"sha1:{head}", "HealthCheckFailed",
                            "timeout waiting for Deployment/previews/web")
        edited = await until(lambda: says(gitea, number, "Deployment/previews/web"), 120,
                             "the edited comment", in_thread=True)
        assert edited["id"] == first["id"]
    finally:
        await service.stop(grace_seconds=0)

    # A restarted bridge (nothing remembered; it takes the Lease once the old holder's
    # expires) finds the comment and tears it down in place.
    service = await started(settings, cluster)
    try:
        cluster.store.delete(APP)
        cluster.store.delete(SOURCE)
        gone = await until(lambda: says(gitea, number, ": torn down"), 120,
                           "the torn-down comment", in_thread=True)
        assert gone["id"] == first["id"]
    finally:
        await service.stop(grace_seconds=0)
