"""The /hook endpoint through HTTP: every signature scheme, every error code, and the
with-source order, coalescing and delivery tracking with the in-memory cluster playing Flux."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

from receiver import signatures as sig
from receiver.flux.objects import RECONCILE_ANNOTATION, ObjectKey
from tests import gitea_payloads as gp
from tests.conftest import ACTIONS_TOKEN, GITEA_TOKEN, HMAC_TOKEN, Bridge, make_settings, until

pytestmark = pytest.mark.anyio

GITEA_PATH = "/hook/" + sig.hook_digest(GITEA_TOKEN, "gitea", "flux-system")
ACTIONS_PATH = "/hook/" + sig.hook_digest(ACTIONS_TOKEN, "actions", "apps")
HMAC_PATH = "/hook/" + sig.hook_digest(HMAC_TOKEN, "hmac", "flux-system")
SOURCE = ObjectKey("GitRepository", "flux-system", "flux-system")
APPS = ObjectKey("Kustomization", "flux-system", "apps")


def app_push(*paths: str, ref: str = "refs/heads/main") -> dict[str, Any]:
    return gp.push("platform/fleet", ref, [gp.commit("platform/fleet", "c" + "".join(paths),
                                                     modified=list(paths))])


def gitea_headers(body: bytes, token: str = GITEA_TOKEN, delivery: str | None = None,
                  event: str = "push", content_type: str = "application/json") -> dict[str, str]:
    mac = sig.hmac_hex("sha256", token, body)
    return {
        "Content-Type": content_type,
        "X-Gitea-Event": event, "X-Gitea-Event-Type": event, "X-GitHub-Event": event,
        "X-Gitea-Delivery": delivery or f"d-{time.monotonic_ns()}",
        "X-Gitea-Signature": mac, "X-Gogs-Signature": mac,
        "X-Hub-Signature": "sha1=" + sig.hmac_hex("sha1", token, body),
        "X-Hub-Signature-256": "sha256=" + mac,
        "X-Gitea-Hook-Installation-Target-Type": "repository",
    }


async def post_gitea(bridge: Bridge, doc: dict[str, Any], **kw: Any) -> Any:
    body = gp.gitea_bytes(doc)
    return await bridge.client.post(GITEA_PATH, content=body, headers=gitea_headers(body, **kw))


def patched(bridge: Bridge) -> list[str]:
    return [f"{k.kind}/{k.name}" for k, _ in bridge.cluster.patches]


# -- accepted requests, each scheme ---------------------------------------------------------


async def test_gitea_json_push_annotates_source_first(bridge: Bridge) -> None:
    doc = app_push("clusters/eu-west/apps/podinfo.yaml")
    r = await post_gitea(bridge, doc)
    assert r.status_code == 202, r.text
    reply = r.json()
    assert reply["receiver"] == "flux-system/gitea"
    assert [(t["kind"], t["name"]) for t in reply["targets"]] == [
        ("GitRepository", "flux-system"), ("Kustomization", "apps")]
    assert reply["targets"][0]["state"] == "annotated"
    assert all(t["reason"] for t in reply["targets"])
    # read back from the cluster: only the source carries the annotation so far
    assert RECONCILE_ANNOTATION in bridge.cluster.store.get(SOURCE).annotations  # type: ignore[union-attr]
    assert RECONCILE_ANNOTATION not in bridge.cluster.store.get(APPS).annotations  # type: ignore[union-attr]


async def test_hub_signature_alone_is_enough(bridge: Bridge) -> None:
    body = gp.gitea_bytes(app_push("clusters/eu-west/apps/a.yaml"))
    headers = gitea_headers(body)
    del headers["X-Gitea-Signature"], headers["X-Gogs-Signature"]
    r = await bridge.client.post(GITEA_PATH, content=body, headers=headers)
    assert r.status_code == 202


async def test_gitea_form_content_type_verifies_the_signed_json(bridge: Bridge) -> None:
    body, signed = gp.form_body(app_push("clusters/eu-west/apps/a.yaml"))
    headers = gitea_headers(signed, content_type="application/x-www-form-urlencoded")
    r = await bridge.client.post(GITEA_PATH, content=body, headers=headers)
    assert r.status_code == 202, r.text
    assert [t["name"] for t in r.json()["targets"]] == ["flux-system", "apps"]


@pytest.mark.parametrize("algo", ["sha1", "sha256", "sha512"])
async def test_generic_hmac(bridge: Bridge, algo: str) -> None:
    body = json.dumps({"repository": "https://gitea.example.com/platform/fleet.git",
                       "ref": "main", "sha": "c" * 40, "paths": ["x"]}).encode()
    r = await bridge.client.post(HMAC_PATH, content=body, headers={
        "Content-Type": "application/json",
        "X-Signature": f"{algo}={sig.hmac_hex(algo, HMAC_TOKEN, body)}"})
    assert r.status_code == 202, r.text
    assert [t["name"] for t in r.json()["targets"]] == ["flux-system"]


async def test_actions_bearer_and_timestamped(bridge: Bridge) -> None:
    body = json.dumps({"repository": "https://gitea.example.com/teams/apps", "ref": "production",
                       "sha": "d" * 40, "paths": ["deploy/app.yaml"]}).encode()
    bearer = await bridge.client.post(ACTIONS_PATH, content=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {ACTIONS_TOKEN}"})
    assert bearer.status_code == 202
    assert [t["name"] for t in bearer.json()["targets"]] == ["team-apps", "team-apps"]
    signed = {"Content-Type": "application/json",
              "X-Signature": sig.sign_timestamped(ACTIONS_TOKEN, body, int(time.time()))}
    first = await bridge.client.post(ACTIONS_PATH, content=body, headers=signed)
    assert first.status_code == 202
    replay = await bridge.client.post(ACTIONS_PATH, content=body, headers=signed)
    assert replay.status_code == 401


async def test_actions_call_without_body_reconciles_the_listed_resources(bridge: Bridge) -> None:
    r = await bridge.client.post(ACTIONS_PATH, headers={"Authorization": f"Bearer {ACTIONS_TOKEN}"})
    assert r.status_code == 202
    assert [t["kind"] for t in r.json()["targets"]] == [
        "GitRepository", "Kustomization", "Kustomization"]


# -- refusals --------------------------------------------------------------------------------


async def test_every_auth_failure_gets_the_same_401(bridge: Bridge) -> None:
    body = gp.gitea_bytes(app_push("x"))
    bad = [
        {"Content-Type": "application/json", "X-Gitea-Event": "push"},
        {**gitea_headers(body, token="wrong")},
        {"Content-Type": "application/json", "X-Hub-Signature": "sha1="
         + sig.hmac_hex("sha1", GITEA_TOKEN, body)},
        {"Content-Type": "application/json", "X-Gitea-Signature": "", "X-Hub-Signature-256": "sha256="},
    ]
    replies = [await bridge.client.post(GITEA_PATH, content=body, headers=h) for h in bad]
    assert {r.status_code for r in replies} == {401}
    assert len({r.content for r in replies}) == 1
    unsigned = await bridge.client.post(ACTIONS_PATH, content=b"{}",
                                        headers={"Content-Type": "application/json"})
    assert unsigned.status_code == 401 and unsigned.content == replies[0].content
    stale = await bridge.client.post(ACTIONS_PATH, content=b"{}", headers={
        "Content-Type": "application/json",
        "X-Signature": sig.sign_timestamped(ACTIONS_TOKEN, b"{}", int(time.time()) - 400)})
    assert stale.status_code == 401 and stale.content == replies[0].content
    assert bridge.cluster.patches == []


async def test_unsigned_generic_only_behind_the_insecure_switch(bridge_factory: Any) -> None:
    open_bridge = await bridge_factory(make_settings(insecure={"allow_unsigned_generic": True}))
    r = await open_bridge.client.post(ACTIONS_PATH)
    assert r.status_code == 202


async def test_unknown_path_is_404(bridge: Bridge) -> None:
    for path in ("/hook/" + "0" * 64, "/hook/short", "/hook/" + "z" * 64):
        r = await bridge.client.post(path, content=b"{}")
        assert r.status_code == 404 and r.json() == {"error": "no receiver for this path"}


async def test_body_limit_by_header_and_by_stream(bridge_factory: Any) -> None:
    small = await bridge_factory(make_settings(body_limit_bytes=2048))
    big = b"x" * 4096
    r = await small.client.post(GITEA_PATH, content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413

    async def chunks() -> Any:
        for _ in range(4):
            yield b"y" * 1024

    r = await small.client.post(GITEA_PATH, content=chunks(),
                                headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert small.cluster.patches == []


async def test_unsupported_content_type_is_415_on_github_only_once_signed(bridge: Bridge) -> None:
    # Unsigned: a 401 like any other, before anything about the body is judged.
    r = await bridge.client.post(GITEA_PATH, content=b"hello", headers={"Content-Type": "text/plain"})
    assert r.status_code == 401
    signed = {**gitea_headers(b"hello"), "Content-Type": "text/plain"}
    r = await bridge.client.post(GITEA_PATH, content=b"hello", headers=signed)
    assert r.status_code == 415  # Flux's github Receiver (go-github) refuses it too
    # generic-hmac takes any content type, as Flux's does: no push details.
    r = await bridge.client.post(HMAC_PATH, content=b"hello", headers={
        "Content-Type": "text/plain", "X-Signature": "sha256=" + sig.hmac_hex(
            "sha256", HMAC_TOKEN, b"hello")})
    assert r.status_code == 202 and r.json()["note"] == "no push details: the body is not JSON"


async def test_invalid_json_has_no_push_details_and_incomplete_payload_is_422(
    bridge: Bridge,
) -> None:
    for doc in ({"ref": "refs/heads/main", "after": "a" * 40},
                {"repository": {"clone_url": "https://gitea.example.com/platform/fleet.git"},
                 "after": "a" * 40}):
        body = gp.gitea_bytes(doc)
        r = await bridge.client.post(GITEA_PATH, content=body, headers=gitea_headers(body))
        assert r.status_code == 422, doc
    assert bridge.cluster.patches == []
    # Flux's github Receiver never parses the body: a signed one that is no JSON object
    # reconciles every listed object; so does the bridge's.
    for body in (b'{"ref": "refs/heads/main",', b"[1, 2, 3]"):
        r = await bridge.client.post(GITEA_PATH, content=body, headers=gitea_headers(body))
        assert r.status_code == 202 and r.json()["note"].startswith("no push details"), body
    assert bridge.cluster.patches


async def test_rate_limit_is_429(bridge_factory: Any) -> None:
    limited = await bridge_factory(make_settings(rate_limit={"requests_per_second": 0.001,
                                                             "burst": 2}))
    codes = []
    for _ in range(4):
        codes.append((await post_gitea(limited, app_push("clusters/eu-west/apps/a"))).status_code)
    assert codes == [202, 202, 429, 429]


async def test_not_synced_and_suspended_are_503(bridge: Bridge) -> None:
    bridge.cluster._synced = False
    assert (await post_gitea(bridge, app_push("x"))).status_code == 503
    assert (await bridge.client.get("/readyz")).status_code == 503
    bridge.cluster._synced = True
    raw = dict(bridge.cluster.store.get(ObjectKey("Receiver", "flux-system", "gitea")).raw)  # type: ignore[union-attr]
    raw["spec"] = {**raw["spec"], "suspend": True}
    bridge.cluster.apply(raw)
    await until(lambda: bridge.cluster.store.get(  # type: ignore[union-attr]
        ObjectKey("Receiver", "flux-system", "gitea")).suspended, what="the suspended Receiver")
    r = await post_gitea(bridge, app_push("x"))
    assert r.status_code == 503 and r.json()["error"] == "receiver is suspended"


async def test_too_many_deliveries_in_flight_is_503(bridge_factory: Any) -> None:
    full = await bridge_factory(make_settings(deliveries={"max_count": 1}))
    assert (await post_gitea(full, app_push("clusters/eu-west/apps/a"))).status_code == 202
    r = await post_gitea(full, app_push("clusters/eu-west/apps/b"))
    assert r.status_code == 503


async def test_ping_other_events_and_duplicates(bridge: Bridge) -> None:
    body = gp.gitea_bytes({"zen": "hi", "hook_id": 1})
    r = await bridge.client.post(GITEA_PATH, content=body, headers=gitea_headers(body, event="ping"))
    assert (r.status_code, r.json()) == (200, {"status": "pong"})
    body = gp.gitea_bytes({"action": "opened"})
    r = await bridge.client.post(GITEA_PATH, content=body, headers=gitea_headers(body, event="issues"))
    assert (r.status_code, r.json()["status"]) == (200, "ignored")
    doc = app_push("clusters/eu-west/apps/a.yaml")
    assert (await post_gitea(bridge, doc, delivery="same-id")).status_code == 202
    before = len(bridge.cluster.patches)
    dup = await post_gitea(bridge, doc, delivery="same-id")
    assert (dup.status_code, dup.json()["status"]) == (200, "duplicate")
    await until(lambda: bridge.parts.reconciler.patches.idle, what="no patch in flight")
    assert len(bridge.cluster.patches) == before


async def test_kubernetes_failure_is_reported_in_reply_and_metrics(bridge: Bridge) -> None:
    bridge.cluster.fail_next_patches = [403]
    r = await post_gitea(bridge, app_push("clusters/eu-west/apps/a"))
    assert r.status_code == 202
    source = r.json()["targets"][0]
    assert source["state"] == "failed" and "403" in source["error"]
    metrics = (await bridge.client.get("/metrics")).text
    assert 'gfb_annotate_errors_total{kind="GitRepository",status="403"} 1.0' in metrics


async def test_a_patch_that_raises_fails_its_target_instead_of_hanging(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("client library bug")

    monkeypatch.setattr(bridge.cluster, "annotate", broken)
    r = await post_gitea(bridge, app_push("clusters/eu-west/apps/a"))
    assert r.status_code == 202
    source = r.json()["targets"][0]
    assert source["state"] == "failed" and "client library bug" in source["error"]


async def test_conflicts_are_retried(bridge: Bridge) -> None:
    bridge.cluster.fail_next_patches = [409, 500]
    r = await post_gitea(bridge, app_push("clusters/eu-west/apps/a"))
    assert r.json()["targets"][0]["state"] == "annotated"


# -- order, tracking, coalescing -------------------------------------------------------------


async def test_with_source_order_and_delivery_tracking(bridge: Bridge) -> None:
    doc = app_push("clusters/eu-west/apps/a.yaml")
    sha = doc["after"]
    delivery = (await post_gitea(bridge, doc)).json()["delivery"]
    assert patched(bridge) == ["GitRepository/flux-system"]
    auth = {"Authorization": f"Bearer {GITEA_TOKEN}"}
    state = (await bridge.client.get(f"/deliveries/{delivery}", headers=auth)).json()
    assert {t["name"]: (t["role"], t["state"]) for t in state["targets"]} == {
        "flux-system": ("annotate", "annotated"), "apps": ("annotate", "queued"),
        # reconcileStrategy Revision: touched by every commit, followed but not listed
        "podinfo-canary": ("track", "reconciling")}

    bridge.cluster.mark_source_fetched(SOURCE, f"main@sha1:{sha}")
    await until(lambda: len(patched(bridge)) == 2, what="the consumer patch")
    assert patched(bridge) == ["GitRepository/flux-system", "Kustomization/apps"]
    bridge.cluster.mark_applied(APPS, f"main@sha1:{sha}")
    state = (await bridge.client.get(f"/deliveries/{delivery}", headers=auth)).json()
    assert state["outcome"] == "in_progress"
    canary = ObjectKey("HelmRelease", "flux-system", "podinfo-canary")
    bridge.cluster.mark_applied(canary, f"6.5.0+{sha[:12]}")
    state = (await bridge.client.get(f"/deliveries/{delivery}", headers=auth)).json()
    assert state["outcome"] == "ready" and state["final"] is True
    # The lead time is observed by the replica that follows the delivery, as it sees it.
    await until(lambda: bridge.parts.deliveries.active_count == 0, what="the delivery to finish")
    assert (await bridge.client.get(f"/deliveries/{delivery}")).status_code == 404
    metrics = (await bridge.client.get("/metrics")).text
    assert 'gfb_push_to_ready_seconds_count{cluster="eu-west"} 2.0' in metrics


async def test_failed_deploy_and_streaming_wait(bridge: Bridge) -> None:
    doc = app_push("clusters/eu-west/apps/b.yaml")
    sha = doc["after"]
    delivery = (await post_gitea(bridge, doc)).json()["delivery"]

    async def flux() -> None:
        # Once the stream is waiting on the delivery's objects, Flux moves.
        await until(lambda: bridge.parts.follow.changes.waiting, what="the stream to wait")
        bridge.cluster.mark_source_fetched(SOURCE, f"main@sha1:{sha}")
        await until(lambda: len(patched(bridge)) == 2, what="the consumer patch")
        bridge.cluster.mark_failed(APPS, f"main@sha1:{sha}", "BuildFailed",
                                   "kustomize build failed: accumulating resources")

    task = asyncio.create_task(flux())
    ts = int(time.time())
    r = await bridge.client.get(f"/deliveries/{delivery}?wait=10", headers={
        "X-Signature": sig.sign_read(GITEA_TOKEN, delivery, ts)})
    await task
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[0]["outcome"] == "in_progress"
    assert len(lines) >= 2
    last = lines[-1]
    assert last["outcome"] == "failed"
    apps = next(t for t in last["targets"] if t["name"] == "apps")
    assert apps["detail"]["reason"] == "BuildFailed"


async def test_source_timeout_is_reported(bridge_factory: Any) -> None:
    quick = await bridge_factory(make_settings(reconcile={"source_timeout_seconds": 0.2,
                                                          "consumer_timeout_seconds": 0.3}))
    delivery = (await post_gitea(quick, app_push("clusters/eu-west/apps/c"))).json()["delivery"]
    # The stream ends when the delivery settles: here, when its deadlines pass.
    r = await quick.client.get(f"/deliveries/{delivery}?wait=10",
                               headers={"Authorization": f"Bearer {GITEA_TOKEN}"})
    state = json.loads(r.text.splitlines()[-1])
    assert {t["name"]: t["state"] for t in state["targets"]}["flux-system"] == "timed_out"
    assert state["outcome"] == "timed_out"


async def test_a_burst_costs_at_most_two_patches_per_object(bridge: Bridge) -> None:
    replies = await asyncio.gather(*(
        post_gitea(bridge, app_push(f"clusters/eu-west/apps/{i}.yaml")) for i in range(60)))
    assert {r.status_code for r in replies} == {202}
    await until(lambda: bridge.parts.reconciler.patches.idle, what="the trailing patch")
    # At most two: one at the start of the window, one trailing (none when all came within it).
    assert 1 <= patched(bridge).count("GitRepository/flux-system") <= 2


async def test_requested_at_is_unique_per_delivery(bridge_factory: Any) -> None:
    bridge = await bridge_factory(make_settings(reconcile={"coalesce_window_seconds": 0}))
    await post_gitea(bridge, app_push("clusters/eu-west/apps/a"))
    await post_gitea(bridge, app_push("clusters/eu-west/apps/b"))
    values = [a[RECONCILE_ANNOTATION] for k, a in bridge.cluster.patches if k == SOURCE]
    assert len(values) == 2 and len(set(values)) == 2


def _secret_cache_expired(bridge: Bridge) -> None:
    """Move the fake cluster's clock past its Secret cache, as time does for a real one."""
    ttl = bridge.cluster.secret_ttl_seconds
    bridge.cluster.clock = lambda: time.monotonic() + ttl + 1


async def test_token_rotation_without_restart(bridge: Bridge) -> None:
    bridge.cluster.secrets[("flux-system", "gitea-token")] = {"token": b"rotated"}
    bridge.parts.hooks._miss_refresh = 0
    _secret_cache_expired(bridge)
    body = gp.gitea_bytes(app_push("clusters/eu-west/apps/a"))
    new_path = "/hook/" + sig.hook_digest("rotated", "gitea", "flux-system")
    r = await bridge.client.post(new_path, content=body, headers=gitea_headers(body, token="rotated"))
    assert r.status_code == 202
    old = await bridge.client.post(GITEA_PATH, content=body, headers=gitea_headers(body))
    assert old.status_code == 404


# -- no secret in any log line or reply ---------------------------------------------------------


async def test_no_secret_in_logs_or_replies(bridge: Bridge, caplog: pytest.LogCaptureFixture) -> None:
    from receiver.logs import JsonFormatter

    caplog.set_level(logging.DEBUG)
    body = gp.gitea_bytes(app_push("clusters/eu-west/apps/a"))
    good = gitea_headers(body)
    secrets = {GITEA_TOKEN, ACTIONS_TOKEN, HMAC_TOKEN, good["X-Gitea-Signature"],
               GITEA_PATH.rsplit("/", 1)[1]}
    replies = [
        await bridge.client.post(GITEA_PATH, content=body, headers=good),
        await bridge.client.post(GITEA_PATH, content=body, headers=gitea_headers(body, token="x")),
        await bridge.client.post(ACTIONS_PATH, headers={"Authorization": "Bearer wrong"}),
        await bridge.client.post(ACTIONS_PATH, headers={"Authorization": f"Bearer {ACTIONS_TOKEN}"}),
        await bridge.client.post(GITEA_PATH, content=b"{", headers=gitea_headers(b"{")),
    ]
    formatter = JsonFormatter()
    # The httpx records are this test's own client logging its request URLs.
    lines = [formatter.format(r) for r in caplog.records if r.name != "httpx"]
    assert lines, "the requests above must have logged something"
    for text in lines + [r.text for r in replies]:
        for secret in secrets:
            assert secret not in text


async def test_chart_version_helm_release_is_annotated_but_not_followed(bridge: Bridge) -> None:
    # podinfo uses reconcileStrategy ChartVersion: its status names a chart version, never the
    # commit, so the bridge annotates it (it is listed and touched) and then stops following
    # it instead of waiting for a readiness it can never see (and posting a bogus error).
    doc = app_push("clusters/eu-west/values/podinfo.yaml")
    sha = doc["after"]
    reply = (await post_gitea(bridge, doc)).json()
    assert [t["name"] for t in reply["targets"]] == ["flux-system", "podinfo"]
    assert "podinfo" not in [t["name"] for t in reply["tracked"]]
    bridge.cluster.mark_source_fetched(SOURCE, f"main@sha1:{sha}")
    await until(lambda: len(patched(bridge)) == 2, what="the consumer patch")
    assert patched(bridge) == ["GitRepository/flux-system", "HelmRelease/podinfo"]
    state = (await bridge.client.get(f"/deliveries/{reply['delivery']}",
                                     headers={"Authorization": f"Bearer {GITEA_TOKEN}"})).json()
    podinfo = next(t for t in state["targets"] if t["name"] == "podinfo")
    assert (podinfo["state"], podinfo["detail"]["reason"]) == ("skipped", "NotFollowed")


# -- hardening --------------------------------------------------------------------


async def test_a_read_credential_replayed_as_a_push_annotates_nothing(bridge: Bridge) -> None:
    delivery = (await bridge.client.post(ACTIONS_PATH, headers={
        "Authorization": f"Bearer {ACTIONS_TOKEN}"})).json()["delivery"]
    await bridge.parts.reconciler.stop()
    before = len(bridge.cluster.patches)
    read = {"X-Signature": sig.sign_read(ACTIONS_TOKEN, delivery, int(time.time()))}
    assert (await bridge.client.get(f"/deliveries/{delivery}", headers=read)).status_code == 200
    # M2: a poll's credential, replayed as an empty-body push (what it used to be valid as).
    replayed = await bridge.client.post(ACTIONS_PATH, headers=read)
    assert replayed.status_code == 401
    assert len(bridge.cluster.patches) == before
    # ... and a push credential does not read.
    push = {"X-Signature": sig.sign_timestamped(ACTIONS_TOKEN, b"", int(time.time()))}
    assert (await bridge.client.get(f"/deliveries/{delivery}", headers=push)).status_code == 404


async def test_a_non_ascii_digit_timestamp_is_refused_not_a_500(bridge: Bridge) -> None:
    delivery = (await bridge.client.post(ACTIONS_PATH, headers={
        "Authorization": f"Bearer {ACTIONS_TOKEN}"})).json()["delivery"]
    header = {"X-Signature": "t=\u00b2,v1=" + "0" * 64}
    # Starlette decodes header bytes as latin-1: byte 0xb2 arrives as "\u00b2".
    encoded = {k: v.encode("latin-1") for k, v in header.items()}
    hook = await bridge.client.post(ACTIONS_PATH, headers=encoded)
    assert hook.status_code == 401
    read = await bridge.client.get(f"/deliveries/{delivery}", headers=encoded)
    assert read.status_code == 404


async def test_a_receiver_with_a_blank_token_is_closed(bridge: Bridge) -> None:
    bridge.cluster.secrets[("flux-system", "gitea-token")] = {"token": b" \n"}
    _secret_cache_expired(bridge)
    await bridge.parts.hooks.refresh_all()
    body = gp.gitea_bytes(app_push("clusters/eu-west/apps/a.yaml"))
    for token in ("", " \n"):
        path = "/hook/" + sig.hook_digest(token, "gitea", "flux-system")
        r = await bridge.client.post(path, content=body, headers=gitea_headers(body, token=token))
        assert r.status_code == 404
    assert bridge.cluster.patches == []
    assert bridge.parts.hooks.unusable() == {"flux-system/gitea": "blank token"}
    metrics = (await bridge.client.get("/metrics")).text
    assert "gfb_receivers_unusable 1.0" in metrics


async def test_wrong_signatures_do_not_each_read_the_secret(bridge: Bridge) -> None:
    body = gp.gitea_bytes(app_push("x"))
    before = bridge.cluster.secret_reads
    for _ in range(50):
        r = await bridge.client.post(GITEA_PATH, content=body,
                                     headers=gitea_headers(body, token="wrong"))
        assert r.status_code == 401
    assert bridge.cluster.secret_reads - before <= 1


@pytest.mark.parametrize(("ref", "message"), [
    ("refs/heads/" + "r" * 3_000_000, "ref is longer than 1024 bytes"),
    ("refs/heads/main\ud800", "ref is not valid UTF-8 text"),
])
async def test_a_hostile_ref_is_a_422_before_anything_is_annotated(
    bridge: Bridge, ref: str, message: str
) -> None:
    body = json.dumps({"repository": "https://gitea.example.com/teams/apps", "ref": ref,
                       "sha": "d" * 40, "paths": ["deploy/app.yaml"]}).encode()
    r = await bridge.client.post(ACTIONS_PATH, content=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {ACTIONS_TOKEN}"})
    assert (r.status_code, r.json()) == (422, {"error": message})
    assert bridge.cluster.patches == []


async def test_form_bodies_without_a_signed_payload_are_401_for_every_type(
    bridge: Bridge,
) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    many = "&".join(f"f{i}=x" for i in range(51)).encode()
    for path in (GITEA_PATH, HMAC_PATH, ACTIONS_PATH):
        for body in (many, b"a=b"):
            r = await bridge.client.post(path, content=body, headers=form)
            assert r.status_code == 401
    # A github Receiver verifies the form's JSON `payload`: without one nothing can be signed.
    r = await bridge.client.post(GITEA_PATH, content=b"a=b", headers={
        **form, "X-Hub-Signature-256": "sha256=" + sig.hmac_hex("sha256", GITEA_TOKEN, b"a=b")})
    assert r.status_code == 401
    assert bridge.cluster.patches == []


async def test_answers_before_authentication_do_not_depend_on_the_receiver_type(
    bridge: Bridge,
) -> None:
    requests: list[tuple[bytes, dict[str, str]]] = [
        (b"", {}),
        (b"", {"Content-Type": "application/x-www-form-urlencoded"}),
        (b"", {"Content-Type": "text/plain"}),
        (b"hello", {"Content-Type": "text/plain"}),
        (b"payload=%7B%7D", {"Content-Type": "application/x-www-form-urlencoded"}),
        (b"{}", {"Content-Type": "application/json"}),
        (b"x=1", {"Content-Type": "application/x-www-form-urlencoded"}),
    ]
    for body, headers in requests:
        answers = set()
        for path in (GITEA_PATH, HMAC_PATH, ACTIONS_PATH):
            r = await bridge.client.post(path, content=body, headers=headers)
            answers.add((r.status_code, r.content))
        assert len(answers) == 1, (body, headers, answers)
    assert bridge.cluster.patches == []


async def test_a_signed_form_body_on_generic_hmac_is_taken_as_flux_takes_it(
    bridge: Bridge,
) -> None:
    body = b"payload=%7B%7D"
    r = await bridge.client.post(HMAC_PATH, content=body, headers={
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Signature": "sha256=" + sig.hmac_hex("sha256", HMAC_TOKEN, body)})
    assert r.status_code == 202, r.text
    assert r.json()["note"] == "no push details: the body is not JSON"
    assert [t["name"] for t in r.json()["targets"]] == ["flux-system"]


async def test_a_client_that_disconnects_mid_body_is_one_quiet_line(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    messages = [{"type": "http.request", "body": b'{"ref": ', "more_body": True},
                {"type": "http.disconnect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": ACTIONS_PATH, "raw_path":
             ACTIONS_PATH.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {ACTIONS_TOKEN}".encode())],
             "client": ("127.0.0.1", 5), "server": ("bridge.test", 80)}
    caplog.set_level(logging.INFO)
    await bridge.app(scope, receive, send)  # nothing escapes to the server
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(gone) == 1
    assert bridge.cluster.patches == []
