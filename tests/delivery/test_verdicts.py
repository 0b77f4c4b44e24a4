"""Verdicts a CI gate can trust, over HTTP: `ready` only once Flux reconciled the pushed commit.

The false "deployed" these tests pin: a workflow step notifies the bridge of commit S through
its generic Receiver, Gitea's own push webhook for the same S arrives a moment later through
the Gitea Receiver, and the first delivery must go on waiting for Flux, not end `ready` with
every target skipped. A later commit, once Flux has gone to it, ends it `superseded` (naming
that commit), which is final but never `ready`.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from receiver import signatures as sig
from receiver.delivery.view import DeliveryView, TargetView
from receiver.flux.objects import ObjectKey
from tests import gitea_payloads as gp
from tests.conftest import GITEA_TOKEN, HMAC_TOKEN, Bridge, make_settings, settled_delivery, until
from tests.fakegitea import FakeGitea, gitea_transport
from tests.status.test_status_service import API, OLD, delivery, eventually, push, rig, settled
from tests.status.test_status_service import GITEA_TOKEN as STATUS_TOKEN
from tests.status.test_status_service import REPO as STATUS_REPO
from tests.status.test_status_service import SOURCE as STATUS_SOURCE
from tests.web.test_ingest import gitea_headers

pytestmark = pytest.mark.anyio

GITEA_PATH = "/hook/" + sig.hook_digest(GITEA_TOKEN, "gitea", "flux-system")
HMAC_PATH = "/hook/" + sig.hook_digest(HMAC_TOKEN, "hmac", "flux-system")
SOURCE = ObjectKey("GitRepository", "flux-system", "flux-system")
REPO = "https://gitea.example.com/platform/fleet"


def _commit(n: int) -> str:
    return f"{n:040x}"


async def _step_push(bridge: Bridge, sha: str) -> dict[str, Any]:
    """What the notify-flux step sends: the commit, through the generic-hmac Receiver."""
    body = json.dumps({"repository": REPO, "ref": "refs/heads/main", "sha": sha}).encode()
    reply = await bridge.client.post(HMAC_PATH, content=body, headers={
        "Content-Type": "application/json",
        "X-Signature": "sha256=" + sig.hmac_hex("sha256", HMAC_TOKEN, body)})
    assert reply.status_code == 202, reply.text
    doc: dict[str, Any] = reply.json()
    return doc


async def _gitea_push(bridge: Bridge, sha: str) -> dict[str, Any]:
    """Gitea's push webhook for the same commit, through the Gitea Receiver."""
    commit = {**gp.commit("platform/fleet", "change", modified=["README.md"]), "id": sha}
    doc = gp.push("platform/fleet", "refs/heads/main", [commit])
    body = gp.gitea_bytes(doc)
    reply = await bridge.client.post(GITEA_PATH, content=body, headers=gitea_headers(body))
    assert reply.status_code == 202, reply.text
    out: dict[str, Any] = reply.json()
    return out


async def _read(bridge: Bridge, delivery: str) -> dict[str, Any]:
    reply = await bridge.client.get(f"/deliveries/{delivery}",
                                    headers={"Authorization": f"Bearer {HMAC_TOKEN}"})
    assert reply.status_code == 200, reply.text
    doc: dict[str, Any] = reply.json()
    return doc


def _marks_on_source(bridge: Bridge) -> int:
    obj = bridge.cluster.store.get(SOURCE)
    value = obj.annotations.get("gitea-flux-bridge.io/deliveries", "") if obj else ""
    return len(value.split())


async def test_the_same_commit_through_a_second_receiver_does_not_make_it_ready(
        bridge: Bridge) -> None:
    sha = _commit(0x5A)
    first = await _step_push(bridge, sha)
    await _gitea_push(bridge, sha)
    # Both requests reached the object: two marks, and Flux has fetched nothing yet.
    await until(lambda: _marks_on_source(bridge) == 2, what="both marks on the source")
    now = await _read(bridge, first["delivery"])
    assert now["outcome"] == "in_progress", now
    assert {t["state"] for t in now["targets"]} & {"skipped", "ready"} == set(), now
    # Flux fetches S: the source is ready at S, the delivery still waits for its consumers.
    revision = f"main@sha1:{sha}"
    bridge.cluster.mark_source_fetched(SOURCE, revision)
    await until(lambda: bridge.parts.deliveries.get(first["delivery"]).view.get(SOURCE).state
                == "ready", what="the source ready at S")
    now = await _read(bridge, first["delivery"])
    assert now["outcome"] == "in_progress", now
    consumers = [ObjectKey(t["kind"], t["namespace"], t["name"]) for t in now["targets"]
                 if t["kind"] != "GitRepository"]
    assert consumers
    for key in consumers:
        # A HelmRelease from Git (reconcileStrategy Revision) names the commit in its chart
        # version; the others name the source's revision.
        bridge.cluster.mark_applied(
            key, f"6.5.0+{sha[:12]}" if key.kind == "HelmRelease" else revision)
    done = await settled_delivery(bridge, first["delivery"], HMAC_TOKEN)
    assert done["outcome"] == "ready", done
    assert {t["state"] for t in done["targets"]} == {"ready"}


async def test_a_later_commit_flux_went_to_ends_it_superseded_naming_that_commit(
        bridge: Bridge) -> None:
    ours, later = _commit(0x51), _commit(0x52)
    first = await _step_push(bridge, ours)
    await _gitea_push(bridge, later)
    await until(lambda: _marks_on_source(bridge) == 2, what="both marks on the source")
    assert (await _read(bridge, first["delivery"]))["outcome"] == "in_progress"
    # Flux handles the latest request (the memory cluster copies requestedAt into
    # lastHandledReconcileAt, as source-controller does) and fetches the later commit.
    bridge.cluster.mark_source_fetched(SOURCE, f"main@sha1:{later}")
    done = await settled_delivery(bridge, first["delivery"], HMAC_TOKEN)
    assert done["outcome"] == "superseded" and done["final"], done
    assert done["supersededBy"] == later
    source = next(t for t in done["targets"] if t["kind"] == "GitRepository")
    assert source["state"] == "skipped" and source["supersededBy"] == later
    assert later[:12] in source["detail"]["message"]


async def test_flux_still_at_the_old_commit_after_a_bare_request_is_not_superseded(
        bridge: Bridge) -> None:
    old, ours = _commit(0x40), _commit(0x41)
    bridge.cluster.mark_source_fetched(SOURCE, f"main@sha1:{old}")
    first = await _step_push(bridge, ours)
    # An empty-body request through the same generic-hmac Receiver: a bare "reconcile now".
    reply = await bridge.client.post(HMAC_PATH, content=b"", headers={
        "X-Signature": "sha256=" + sig.hmac_hex("sha256", HMAC_TOKEN, b"")})
    assert reply.status_code == 202, reply.text
    await until(lambda: _marks_on_source(bridge) == 2, what="both marks on the source")
    now = await _read(bridge, first["delivery"])
    assert now["outcome"] == "in_progress", now


async def test_a_superseded_commit_leaves_pending_for_skipped_naming_what_flux_deployed() -> None:
    """What Gitea shows converges: a commit Flux went past gets `skipped` at once, not a
    `pending` that lasts until the deadline (or for good, once the delivery is final)."""
    context = "flux/eu-west/kustomization/apps/api"
    gitea = FakeGitea(token=STATUS_TOKEN, version="1.26.3")
    async with rig(fakes={"gitea.example.com": gitea}) as r:
        d = delivery(keys=(API,))
        r.service.on_push_routed(d, push())
        await settled(r)
        assert (gitea.latest(*STATUS_REPO, context) or {}).get("status") == "pending"
        r.cluster.mark_source_fetched(STATUS_SOURCE, f"main@sha1:{OLD}")
        r.cluster.mark_applied(API, f"main@sha1:{OLD}")
        d.view = DeliveryView((TargetView(API, "track", "skipped", "Superseded", "", commit=OLD),))
        r.service.on_target_changed(d, API, "skipped")
        await settled(r)
        await eventually(lambda: (gitea.latest(*STATUS_REPO, context) or {}).get("status") == "skipped")
        latest = gitea.latest(*STATUS_REPO, context)
        assert latest is not None and OLD[:12] in str(latest["description"])
        # A skipped target that was merely not followable posts nothing of its own.
        posts = len(gitea.posts)
        d.view = DeliveryView((TargetView(API, "track", "skipped", "NotFollowed", ""),))
        r.service.on_target_changed(d, API, "skipped")
        await settled(r)
        assert len(gitea.posts) == posts


@pytest.fixture
async def with_gitea(bridge_factory: Any, tmp_path: Any) -> tuple[Any, Bridge]:
    """The bridge over the fleet fixture, with a fake Gitea whose compare API knows a history."""
    fake = FakeGitea(token="gitea-api-token")
    transport, _ = gitea_transport({"gitea.example.com": fake})
    (tmp_path / "gitea").write_text("gitea-api-token")
    # A test that makes this Gitea fail leaves statuses queued: the teardown does not give them
    # the default 10 s to drain.
    settings = make_settings(
        gitea=[{"name": "eu", "url": "https://gitea.example.com",
                "token": {"file": str(tmp_path / "gitea")}}],
        statuses={"resync_interval_seconds": 3600}, shutdown={"flush_seconds": 0})
    bridge: Bridge = await bridge_factory(settings, transport=transport)
    return fake, bridge


async def _deploy(bridge: Bridge, delivery: str, sha: str) -> None:
    """Flux applies `sha` on every consumer the delivery follows."""
    doc = await _read(bridge, delivery)
    for t in doc["targets"]:
        if t["kind"] != "GitRepository":
            key = ObjectKey(t["kind"], t["namespace"], t["name"])
            bridge.cluster.mark_applied(
                key, f"6.5.0+{sha[:12]}" if key.kind == "HelmRelease" else f"main@sha1:{sha}")


async def test_a_later_commit_that_contains_ours_ends_it_ready_as_gitea_says(
        with_gitea: tuple[Any, Bridge]) -> None:
    fake, bridge = with_gitea
    ours, later = _commit(0x61), _commit(0x62)
    fake.parents.update({_commit(0x60): (), ours: (_commit(0x60),), later: (ours,)})
    first = await _step_push(bridge, ours)
    await _gitea_push(bridge, later)
    await until(lambda: _marks_on_source(bridge) == 2, what="both marks on the source")
    # Flux went straight to the later commit, which has ours in its history.
    bridge.cluster.mark_source_fetched(SOURCE, f"main@sha1:{later}")
    await _deploy(bridge, first["delivery"], later)
    done = await settled_delivery(bridge, first["delivery"], HMAC_TOKEN)
    assert done["outcome"] == "ready", done
    source = next(t for t in done["targets"] if t["kind"] == "GitRepository")
    assert source["detail"]["reason"] == "ContainsCommit"
    assert ("platform", "fleet", later, ours) in fake.compares  # asked of Gitea, not assumed
    asked = len(fake.compares)
    assert (await _read(bridge, first["delivery"]))["outcome"] == "ready"
    assert len(fake.compares) == asked  # the answer is remembered


async def test_a_later_commit_on_another_line_of_history_ends_it_superseded(
        with_gitea: tuple[Any, Bridge]) -> None:
    fake, bridge = with_gitea
    base, ours, later = _commit(0x70), _commit(0x71), _commit(0x72)
    fake.parents.update({base: (), ours: (base,), later: (base,)})  # a force-push dropped ours
    first = await _step_push(bridge, ours)
    await _gitea_push(bridge, later)
    await until(lambda: _marks_on_source(bridge) == 2, what="both marks on the source")
    bridge.cluster.mark_source_fetched(SOURCE, f"main@sha1:{later}")
    done = await settled_delivery(bridge, first["delivery"], HMAC_TOKEN)
    assert (done["outcome"], done["supersededBy"]) == ("superseded", later)
    assert ("platform", "fleet", later, ours) in fake.compares


async def test_gitea_down_reads_superseded_and_never_ready(
        with_gitea: tuple[Any, Bridge]) -> None:
    fake, bridge = with_gitea
    ours, later = _commit(0x81), _commit(0x82)
    first = await _step_push(bridge, ours)
    await _gitea_push(bridge, later)
    await until(lambda: _marks_on_source(bridge) == 2, what="both marks on the source")
    fake.fail.extend([503] * 50)
    bridge.cluster.mark_source_fetched(SOURCE, f"main@sha1:{later}")
    await _deploy(bridge, first["delivery"], later)
    done = await settled_delivery(bridge, first["delivery"], HMAC_TOKEN)
    assert done["outcome"] == "superseded", done
