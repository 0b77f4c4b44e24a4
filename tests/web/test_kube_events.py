"""Kubernetes Events as a user sees them in `kubectl describe`: on the Receiver, a push
accepted with its targets, a push that reconciles nothing (Warning), a token or filter it
cannot use (Warning); on each annotated object, who asked. Written off the request path,
aggregated, and never able to change an answer."""

from __future__ import annotations

import time
from typing import Any

import pytest

from receiver.flux.event_book import EventBook
from tests import gitea_payloads as gp
from tests.conftest import Bridge, BridgeFactory, make_settings, until
from tests.web.test_ingest import GITEA_PATH, app_push, gitea_headers, post_gitea

pytestmark = pytest.mark.anyio


def events(bridge: Bridge, reason: str, name: str = "gitea") -> list[dict[str, Any]]:
    return [e for e in bridge.cluster.events.values()
            if e["reason"] == reason and e["involvedObject"]["name"] == name]


def fast(bridge: Bridge, patch_interval: float = 1.0) -> EventBook:
    """A book that patches a repeat within a second (the product waits 30 s)."""
    book = bridge.parts.recorder.book = EventBook(patch_interval=patch_interval, burst=10,
                                                  refill_seconds=patch_interval)
    return book


async def test_an_accepted_push_is_an_event_on_the_receiver_and_on_what_it_annotated(
        bridge: Bridge) -> None:
    reply = await post_gitea(bridge, app_push("clusters/eu-west/apps/podinfo.yaml"))
    assert reply.status_code == 202
    targets = [t["name"] for t in reply.json()["targets"]]
    (accepted,) = await until(lambda: events(bridge, "PushAccepted"), what="PushAccepted")
    assert accepted["type"] == "Normal" and accepted["count"] == 1
    assert accepted["involvedObject"]["kind"] == "Receiver"
    assert "push of refs/heads/main" in accepted["message"]
    assert all(name in accepted["message"] for name in targets[:5])
    requested = await until(lambda: [e for e in bridge.cluster.events.values()
                                     if e["reason"] == "ReconcileRequested"] or None)
    assert {e["involvedObject"]["name"] for e in requested} <= set(targets)
    # Sources only: a consumer is annotated once its source has the commit, not now.
    assert {e["involvedObject"]["kind"] for e in requested} == {"GitRepository"}
    assert all("Receiver flux-system/gitea" in e["message"] for e in requested)


async def test_a_push_matching_nothing_is_a_warning_and_a_flood_of_them_one_event(
        bridge_factory: BridgeFactory) -> None:
    bridge = await bridge_factory(make_settings(rate_limit={"requests_per_second": 1e6,
                                                            "burst": 1000}))
    fast(bridge)
    started = time.monotonic()
    for i in range(200):
        doc = gp.push("someone/elsewhere", commits=[gp.commit("someone/elsewhere", f"c{i}")])
        reply = await post_gitea(bridge, doc)
        assert reply.status_code == 202 and reply.json()["targets"] == []
    (warning,) = await until(
        lambda: [e for e in events(bridge, "PushMatchedNothing") if e["count"] == 200] or None,
        what="the one Warning counting all 200 pushes")
    assert warning["type"] == "Warning" and "reconciles nothing" in warning["message"]
    # 200 pushes, one Event: its create and a patch at most every second.
    assert bridge.cluster.event_writes <= 2 + (time.monotonic() - started) / 1.0


async def test_an_unusable_type_a_blank_token_and_an_invalid_filter_are_warnings(
        bridge_factory: BridgeFactory, tmp_path: Any) -> None:
    import shutil

    from tests.conftest import FLEET

    fleet = tmp_path / "fleet"
    shutil.copytree(FLEET, fleet)
    text = (fleet / "receivers.yaml").read_text()
    text = text.replace("stringData: {token: hmac-secret-token}", "stringData: {token: ' '}")
    text = text.replace("  type: generic\n", "  type: generic\n  resourceFilter: 'nope('\n", 1)
    text += ("---\napiVersion: notification.toolkit.fluxcd.io/v1\nkind: Receiver\n"
             "metadata: {name: gitlab, namespace: flux-system}\n"
             "spec: {type: gitlab, secretRef: {name: gitea-token}, resources: []}\n")
    (fleet / "receivers.yaml").write_text(text)
    bridge = await bridge_factory(directory=fleet)
    (unsupported,) = await until(lambda: events(bridge, "UnsupportedType", "gitlab"))
    assert unsupported["type"] == "Warning" and "'gitlab'" in unsupported["message"]
    (blank,) = await until(lambda: events(bridge, "TokenUnusable", "hmac"), what="TokenUnusable")
    assert blank["type"] == "Warning" and "blank token" in blank["message"]
    assert "404" in blank["message"] and "hmac-secret-token" not in str(blank)
    from receiver import signatures as sig
    from tests.conftest import ACTIONS_TOKEN

    path = "/hook/" + sig.hook_digest(ACTIONS_TOKEN, "actions", "apps")
    reply = await bridge.client.post(path, content=b"{}", headers={
        "Authorization": f"Bearer {ACTIONS_TOKEN}", "Content-Type": "application/json"})
    assert reply.status_code == 503
    (invalid,) = await until(lambda: events(bridge, "InvalidFilter", "actions"))
    assert invalid["type"] == "Warning" and "spec.resourceFilter" in invalid["message"]


async def test_events_the_api_server_refuses_change_no_answer(bridge: Bridge) -> None:
    bridge.cluster.fail_events = True  # type: ignore[attr-defined]
    reply = await post_gitea(bridge, app_push("clusters/eu-west/apps/podinfo.yaml"))
    assert reply.status_code == 202 and reply.json()["targets"]
    await until(lambda: bridge.parts.recorder.failed >= 1, what="a refused Event write")
    assert bridge.cluster.events == {}
    body = gp.gitea_bytes(app_push("clusters/eu-west/apps/podinfo.yaml", ref="refs/heads/x"))
    again = await bridge.client.post(GITEA_PATH, content=body, headers=gitea_headers(body))
    assert again.status_code == 202


async def test_an_unreadable_secret_file_is_a_warning_on_the_bridges_pod(
        bridge_factory: BridgeFactory, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "bridge-7d9f")
    monkeypatch.setenv("POD_NAMESPACE", "flux-system")
    settings = make_settings(gitea=[{"name": "main", "url": "https://gitea.example.com",
                                     "token": {"file": str(tmp_path / "not-mounted")}}])
    bridge = await bridge_factory(settings)
    assert (await bridge.client.get("/readyz")).status_code == 503
    (pod,) = await until(lambda: events(bridge, "SecretUnreadable", "bridge-7d9f"))
    assert pod["involvedObject"]["kind"] == "Pod" and pod["type"] == "Warning"
    assert "gitea[main].token" in pod["message"] and "not-mounted" in pod["message"]

