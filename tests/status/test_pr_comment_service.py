"""Pull-request previews end to end over HTTP: the preview objects in a MemoryCluster, the
comment and statuses in a fake Gitea (every request checked against Gitea's swagger). What
counts is what Gitea holds: how many comments, what they say, which statuses."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import ObjectKey
from receiver.gitea.ref_payloads import parse_gitea_pull_request
from receiver.metrics import Metrics
from receiver.signatures import hmac_hex, hook_digest
from receiver.status.service import StatusService
from tests import gitea_payloads as gp
from tests.conftest import FLEET
from tests.conftest import GITEA_TOKEN as HOOK_TOKEN
from tests.conftest import make_settings as app_settings
from tests.fakegitea import FakeGitea, gitea_transport
from tests.status.test_status_service import (
    GITEA_TOKEN,
    SHA,
    WEBAPP,
    eventually,
    fast,
    make_settings,
    rig,
)

HEAD = "c0ffee" + "0" * 34
NEXT = "beef00" + "0" * 34
PR_SOURCE = ObjectKey("GitRepository", "previews", "pr-7")
PR_APP = ObjectKey("Kustomization", "previews", "pr-7")
OWNER, REPO = "team", "webapp"
PR_CONTEXT = "flux/eu-west/kustomization/previews/pr-7"
REPO_URL = "http://gitea-http.gitea.svc.cluster.local:3000/team/webapp.git"


def settings(**previews: Any) -> Any:
    return make_settings(statuses={"resync_interval_seconds": 3600,
                                   "previews": {"comment_interval_seconds": 0.05, **previews}})


def preview_docs(sha: str = HEAD, number: str = "7") -> list[dict[str, Any]]:
    notes = {"event.toolkit.fluxcd.io/change_request": number,
             "event.toolkit.fluxcd.io/commit": sha,
             "event.toolkit.fluxcd.io/preview-url": "https://pr-7.preview.example.com"}
    return [
        {"kind": "GitRepository", "metadata": {"name": "pr-7", "namespace": "previews"},
         "spec": {"url": REPO_URL, "ref": {"commit": sha}}},
        {"kind": "Kustomization",
         "metadata": {"name": "pr-7", "namespace": "previews", "annotations": notes},
         "spec": {"sourceRef": {"kind": "GitRepository", "name": "pr-7"}, "path": "./"}},
    ]


def deploy(cluster: MemoryCluster, sha: str) -> None:
    cluster.mark_source_fetched(PR_SOURCE, f"sha1:{sha}")
    cluster.mark_applied(PR_APP, f"sha1:{sha}")


def ours(fake: FakeGitea, number: int = 7) -> list[dict[str, Any]]:
    return [c for c in fake.pull_comments(OWNER, REPO, number)
            if c["user"]["login"] == fake.login]


def one_saying(fake: FakeGitea, text: str, number: int = 7) -> bool:
    mine = ours(fake, number)
    return len(mine) == 1 and text in mine[0]["body"]


def with_pull(fake: FakeGitea, *numbers: int) -> FakeGitea:
    for number in numbers:
        fake.add_pull(OWNER, REPO, number)
    return fake


@pytest.mark.anyio
async def test_one_comment_per_pull_request_edited_in_place_until_torn_down() -> None:
    fake = with_pull(FakeGitea(token=GITEA_TOKEN), 7)

    def previews(cluster: MemoryCluster) -> None:
        cluster.load(preview_docs())
        deploy(cluster, HEAD)

    async with rig(settings(), fakes={"gitea.example.com": fake}, setup=previews) as r:
        await eventually(lambda: one_saying(fake, "Preview of #7 on cluster `eu-west`: "
                                                  "success"))
        body = ours(fake)[0]["body"]
        assert "Preview: <https://pr-7.preview.example.com>" in body
        assert f"[`{PR_CONTEXT}`](https://gitea.example.com/team/webapp/commit/{HEAD})" in body
        first = ours(fake)[0]["id"]
        await eventually(lambda: fake.contexts(OWNER, REPO, HEAD).get(PR_CONTEXT) == "success")

        # A new head: pending at once on it, then the failure and its reason, same comment.
        r.cluster.load(preview_docs(NEXT))
        await eventually(lambda: one_saying(fake, "pending") and
                         fake.contexts(OWNER, REPO, NEXT).get(PR_CONTEXT) == "pending")
        r.cluster.mark_source_fetched(PR_SOURCE, f"sha1:{NEXT}")
        r.cluster.mark_failed(PR_APP, f"sha1:{NEXT}", "HealthCheckFailed",
                              "timeout waiting for Deployment/previews/web")
        await eventually(lambda: one_saying(fake, "failure: Health check failed: timeout "
                                                  "waiting for Deployment/previews/web"))
        await eventually(lambda: fake.contexts(OWNER, REPO, NEXT).get(PR_CONTEXT) == "failure")

        # The pull request closes; its objects go; the comment says so.
        r.cluster.store.delete(PR_APP)
        r.cluster.store.delete(PR_SOURCE)
        await eventually(lambda: one_saying(fake, ": torn down"))
        assert ours(fake)[0]["id"] == first
        assert fake.comments_created == 1 and fake.comment_deletes == 0


@pytest.mark.anyio
async def test_edits_are_coalesced_when_the_preview_changes_fast() -> None:
    fake = with_pull(FakeGitea(token=GITEA_TOKEN), 7)

    def previews(cluster: MemoryCluster) -> None:
        cluster.load(preview_docs())

    async with rig(settings(comment_interval_seconds=2.0), fakes={"gitea.example.com": fake},
                   setup=previews) as r:
        await eventually(lambda: one_saying(fake, ": pending"))
        started = time.monotonic()
        for _ in range(20):  # twenty changes inside one interval
            deploy(r.cluster, HEAD)
            r.cluster.mark_failed(PR_APP, f"sha1:{HEAD}", "BuildFailed", "kustomize build")
        deploy(r.cluster, HEAD)
        await eventually(lambda: one_saying(fake, ": success"), timeout=30)
        # The created comment, then at most one edit per interval since.
        edits_allowed = 1 + int((time.monotonic() - started) / 2.0)
        assert 1 <= fake.comment_edits <= edits_allowed
        assert fake.comments_created == 1


@pytest.mark.anyio
async def test_a_lost_race_is_repaired_and_peoples_comments_are_left_alone() -> None:
    fake = with_pull(FakeGitea(token=GITEA_TOKEN), 7)
    marker = "<!-- gitea-flux-bridge:preview cluster=eu-west -->"
    # Two comments by the bridge (a race across a Lease handover) and one by a person who
    # quotes the marker.
    kept = fake.add_comment(OWNER, REPO, 7, marker + "\nold")["id"]
    fake.add_comment(OWNER, REPO, 7, marker + "\nolder twin")
    person = fake.add_comment(OWNER, REPO, 7, "why does " + marker + " say that?", "alice")

    def previews(cluster: MemoryCluster) -> None:
        cluster.load(preview_docs())
        deploy(cluster, HEAD)

    async with rig(settings(), fakes={"gitea.example.com": fake}, setup=previews):
        await eventually(lambda: one_saying(fake, ": success"))
        assert ours(fake)[0]["id"] == kept
        assert fake.comments[person["id"]]["body"] == "why does " + marker + " say that?"
        assert fake.comments_created == 0


@pytest.mark.anyio
async def test_two_replicas_write_one_comment_never_two() -> None:
    fake = with_pull(FakeGitea(token=GITEA_TOKEN), 7, 8)

    def previews(cluster: MemoryCluster) -> None:
        cluster.load(preview_docs())
        deploy(cluster, HEAD)

    async with rig(settings(), fakes={"gitea.example.com": fake}, setup=previews) as r:
        transport, _ = gitea_transport({"gitea.example.com": fake})
        other_metrics = Metrics()
        other = fast(StatusService(r.settings, r.cluster, other_metrics, transport=transport))
        await other.start()
        try:
            await eventually(lambda: one_saying(fake, ": success"))
            # Both see every change; one comment per pull request, each edited in place.
            r.cluster.load(preview_docs(NEXT))
            r.cluster.load([{**doc, "metadata": {**doc["metadata"], "name": "pr-8"}}
                            for doc in preview_docs(NEXT, "8")[1:]])
            await eventually(lambda: one_saying(fake, ": pending") and
                             one_saying(fake, ": pending", 8))
            leaders = [s for s in (r.service, other) if s.resync.leader]
            assert len(leaders) == 1
        finally:
            await other.stop(grace_seconds=0)
        assert fake.comments_created == 2 and fake.comment_deletes == 0
        # Only the Lease holder wrote: the other replica created and edited nothing.
        follower = other_metrics if leaders[0] is r.service else r.metrics
        assert written(follower) == 0 and written(leaders[0].metrics) >= 3


def written(metrics: Metrics) -> float:
    return sum(sample.value for family in metrics.registry.collect()
               for sample in family.samples
               if sample.name == "gfb_pr_comments_total"
               and sample.labels["result"] in ("created", "edited", "deleted"))


@pytest.mark.anyio
async def test_a_pull_request_push_posts_pending_on_its_head_at_once() -> None:
    fake = with_pull(FakeGitea(token=GITEA_TOKEN), 7)

    def previews(cluster: MemoryCluster) -> None:
        cluster.load(preview_docs())
        deploy(cluster, HEAD)

    async with rig(settings(), fakes={"gitea.example.com": fake}, setup=previews) as r:
        await eventually(lambda: fake.contexts(OWNER, REPO, HEAD).get(PR_CONTEXT) == "success")
        payload = {"action": "synchronized", "number": 7,
                   "pull_request": {"number": 7, "state": "open", "merged": False,
                                    "head": {"sha": NEXT, "ref": "feature"},
                                    "base": {"ref": "main"}},
                   "repository": {"clone_url": "https://gitea.example.com/team/webapp.git",
                                  "full_name": "team/webapp"}}
        assert r.service.on_pull_request(parse_gitea_pull_request(payload)) == 1
        await eventually(lambda: fake.contexts(OWNER, REPO, NEXT).get(PR_CONTEXT) == "pending")
        other = parse_gitea_pull_request({**payload, "number": 8})
        assert r.service.on_pull_request(other) == 0  # no preview of #8 runs


@pytest.mark.anyio
async def test_a_merged_pull_request_gets_a_line_when_its_merge_commit_is_deployed() -> None:
    fake = FakeGitea(token=GITEA_TOKEN)
    fake.add_pull(OWNER, REPO, 3, merged=True, merge_commit_sha=SHA)

    async with rig(settings(), fakes={"gitea.example.com": fake}) as r:
        r.cluster.mark_source_fetched(ObjectKey("GitRepository", "flux-system", "webapp"),
                                      f"main@sha1:{SHA}")
        r.cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}")
        await eventually(lambda: one_saying(fake, "Kustomization `apps/webapp` runs", 3))
        r.cluster.mark_applied(ObjectKey("Kustomization", "apps", "api"), f"main@sha1:{SHA}")
        await eventually(lambda: one_saying(fake, "Kustomization `apps/api` runs", 3))
        body = ours(fake, 3)[0]["body"]
        assert "#3 deployed on cluster `eu-west`" in body and "apps/webapp" in body
        assert fake.comments_created == 1


@pytest.mark.anyio
async def test_an_old_merge_still_running_gets_no_late_comment() -> None:
    fake = FakeGitea(token=GITEA_TOKEN)
    fake.add_pull(OWNER, REPO, 2, merged=True, merge_commit_sha=SHA,
                  merged_at=time.time() - 30 * 86400)
    fake.add_pull(OWNER, REPO, 4)

    async with rig(settings(), fakes={"gitea.example.com": fake}) as r:
        r.cluster.mark_source_fetched(ObjectKey("GitRepository", "flux-system", "webapp"),
                                      f"main@sha1:{SHA}")
        r.cluster.mark_applied(WEBAPP, f"main@sha1:{SHA}")
        # A preview on another pull request, written after the merge was looked at: once it
        # shows, the old merge was handled (in order) and left alone.
        r.cluster.load(preview_docs(HEAD, "4"))
        deploy(r.cluster, HEAD)
        await eventually(lambda: one_saying(fake, ": success", 4))
        assert ours(fake, 2) == [] and fake.comments_created == 1


@pytest.mark.anyio
async def test_an_events_commit_metadata_names_the_commit_its_status_goes_to() -> None:
    fake = with_pull(FakeGitea(token=GITEA_TOKEN), 7)

    def previews(cluster: MemoryCluster) -> None:
        cluster.load(preview_docs())

    async with rig(settings(comments=False), fakes={"gitea.example.com": fake},
                   setup=previews) as r:
        for metadata in ({"commit": HEAD, "change_request": "7", "revision": f"sha1:{NEXT}"},
                         {"event.toolkit.fluxcd.io/commit": NEXT,
                          "kustomize.toolkit.fluxcd.io/revision": f"sha1:{HEAD}"}):
            body = json.dumps({
                "involvedObject": {"kind": "Kustomization", "namespace": "previews",
                                   "name": "pr-7",
                                   "apiVersion": "kustomize.toolkit.fluxcd.io/v1"},
                "severity": "info", "reason": "ReconciliationSucceeded",
                "message": "Reconciliation finished", "metadata": metadata}).encode()
            assert (await r.send(body)).json() == {"accepted": True, "statuses": 1}
        await eventually(lambda: fake.contexts(OWNER, REPO, HEAD).get(PR_CONTEXT) == "success"
                         and fake.contexts(OWNER, REPO, NEXT).get(PR_CONTEXT) == "success")
        # Comments off: statuses still follow the preview (pending on a new head at once),
        # and nothing is written on the pull request.
        r.cluster.load(preview_docs("d" * 40))
        await eventually(lambda: fake.contexts(OWNER, REPO, "d" * 40).get(PR_CONTEXT) ==
                         "pending")
        assert fake.comments_created == 0 and fake.comment_lists == 0


@pytest.mark.anyio
async def test_a_pull_request_webhook_puts_pending_on_the_new_head_at_once(
        bridge_factory: Any, tmp_path: Path) -> None:
    """Through the whole app: Gitea's signed `pull_request` webhook at /hook/<digest> ->
    `pending` on the pushed head for the preview already running, before Flux moves."""
    for item in FLEET.iterdir():
        if item.suffix == ".yaml":
            shutil.copy(item, tmp_path / item.name)
    running = "1" * 40
    docs = preview_docs(running)
    docs[0]["spec"]["url"] = "https://gitea.example.com/platform/fleet.git"
    (tmp_path / "previews.yaml").write_text(yaml.safe_dump_all(docs))
    fake = FakeGitea(token=HOOK_TOKEN)
    fake.add_pull("platform", "fleet", 7)
    transport, _ = gitea_transport({"gitea.example.com": fake})
    bridge = await bridge_factory(app_settings(gitea=[{
        "name": "main", "url": "https://gitea.example.com",
        "token": {"secret": "flux-system/gitea-token"}}]), directory=tmp_path,
        transport=transport)
    bridge.cluster.mark_source_fetched(PR_SOURCE, f"sha1:{running}")
    bridge.cluster.mark_applied(PR_APP, f"sha1:{running}")
    body = json.dumps(gp.pull_request("platform/fleet", 7, "synchronized", sha=NEXT)).encode()
    reply = await bridge.client.post(
        "/hook/" + hook_digest(HOOK_TOKEN, "gitea", "flux-system"), content=body, headers={
            "Content-Type": "application/json", "X-Gitea-Event": "pull_request",
            "X-GitHub-Event": "pull_request",
            "X-Gitea-Signature": hmac_hex("sha256", HOOK_TOKEN, body)})
    assert reply.status_code == 202, reply.text
    await eventually(lambda: fake.contexts("platform", "fleet", NEXT).get(PR_CONTEXT) ==
                     "pending")
    assert fake.problems == []


@pytest.mark.anyio
async def test_an_object_that_stops_being_a_preview_leaves_the_comment() -> None:
    fake = with_pull(FakeGitea(token=GITEA_TOKEN), 7)

    def previews(cluster: MemoryCluster) -> None:
        cluster.load(preview_docs())
        deploy(cluster, HEAD)

    async with rig(settings(), fakes={"gitea.example.com": fake}, setup=previews) as r:
        await eventually(lambda: one_saying(fake, ": success"))
        current = r.cluster.store.get(PR_APP)
        assert current is not None
        raw = json.loads(json.dumps(current.raw))
        del raw["metadata"]["annotations"]["event.toolkit.fluxcd.io/change_request"]
        r.cluster.apply(raw)
        await eventually(lambda: one_saying(fake, ": torn down"))
        assert fake.comments_created == 1


@pytest.mark.anyio
async def test_a_replica_that_lost_the_lease_creates_no_comment() -> None:
    fake = with_pull(FakeGitea(token=GITEA_TOKEN), 7)

    def previews(cluster: MemoryCluster) -> None:
        cluster.load(preview_docs())
        deploy(cluster, HEAD)

    async with rig(settings(), fakes={"gitea.example.com": fake}, setup=previews,
                   start=False) as r:
        cfg = r.settings.statuses
        assert await r.cluster.try_acquire_lease(cfg.lease_name, "the-new-holder",
                                                 cfg.lease_duration_seconds)
        await r.service.start()
        r.service.comments.resync()

        def yielded() -> bool:
            # A stale belief (as in the moment before its next Lease check): it keeps
            # thinking it leads, whatever its resync loop last saw.
            r.service.resync.leader = True
            return r.metric("gfb_pr_comments_total", result="yielded") >= 1

        await eventually(yielded)
        assert fake.comments_created == 0 and fake.comment_lists >= 1
