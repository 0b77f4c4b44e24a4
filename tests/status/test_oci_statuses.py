"""Commit statuses for OCI-sourced deployments (Flux's "Git to OCI" path).

CI runs `flux push artifact oci://<gitea>/<owner>/<name>:<tag> --source=<git url>
--revision=main@sha1:<sha>`; source-controller copies the manifest annotations into the
OCIRepository's `status.artifact.metadata`; kustomize-controller records
`lastAppliedOriginRevision`. The pure mapping first, then the service over HTTP with the memory
cluster playing Flux and the fake Gitea.
"""

from __future__ import annotations

import calendar
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.delivery import marks as delivery_marks
from receiver.delivery.package import has_push, package_commit
from receiver.delivery.record import ROLE_ANNOTATE, ROLE_TRACK, DeliveryRecord, RecordTarget
from receiver.delivery.state import evaluate
from receiver.delivery.view import Timeouts
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.flux.origin import (
    consumer_commits,
    event_commit,
    has_pushed_artifact,
    origin_commit,
    package_ref,
    package_tag,
    ties_to_artifact,
)
from receiver.flux.revisions import FAILED, READY, RECONCILING, TIMED_OUT
from receiver.giturls import normalise_repo_url
from receiver.status.decisions import (
    MAPPED,
    NO_COMMIT,
    PENDING,
    SKIPPED,
    SUCCESS,
    UNMAPPED,
    desired_after_timeout,
    desired_from_event,
    desired_from_object,
)
from receiver.status.flux_events import FluxEvent, InvolvedObject
from receiver.templates import StatusTemplates
from tests.conftest import (
    FIXTURES,
    Bridge,
    BridgeFactory,
    make_settings,
    send_package_event,
    until,
)
from tests.fakegitea import FakeGitea, gitea_transport

SHA = "5394cb7f48ab9fd33a7a95f6ee1f7b9c4b2b8a3e"
OLD = "1" * 40
NEW_DIGEST = "b" * 64
OLD_DIGEST = "a" * 64
NEW_REV = f"latest@sha256:{NEW_DIGEST}"
OLD_REV = f"latest@sha256:{OLD_DIGEST}"
GIT_URL = "https://gitea.example.com/platform/fleet"
ALIASES = {"gitea-http.gitea.svc.cluster.local:3000": "gitea.example.com"}
TEMPLATES = StatusTemplates("eu-west")
TOKEN = "registry-secret-token"
GITEA_TOKEN = "gitea-api-token"
OCI = ObjectKey("OCIRepository", "flux-system", "apps")
APPS = ObjectKey("Kustomization", "flux-system", "apps")
INFRA = ObjectKey("Kustomization", "flux-system", "infra")
APPS_CONTEXT = "flux/eu-west/kustomization/flux-system/apps"
INFRA_CONTEXT = "flux/eu-west/kustomization/flux-system/infra"
PAYLOAD = FIXTURES / "payloads" / "gitea-package-container.json"
MANIFESTS = FIXTURES / "oci-statuses"
MARK = "0123456789abcdef"


def normalise(url: str) -> str | None:
    return normalise_repo_url(url, ALIASES)


def metadata(revision: str | None = f"main@sha1:{SHA}",
             source: str | None = GIT_URL) -> dict[str, str]:
    out = {}
    if source is not None:
        out["org.opencontainers.image.source"] = source
    if revision is not None:
        out["org.opencontainers.image.revision"] = revision
    return out


def oci_source(revision: str = NEW_REV, meta: dict[str, str] | None = None,
               stored: str = "2026-11-30T06:00:00Z", **extra: Any) -> FluxObject:
    artifact: dict[str, Any] = {"revision": revision, "lastUpdateTime": stored,
                                "metadata": metadata() if meta is None else meta}
    return FluxObject({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "OCIRepository",
                       "metadata": {"name": "apps", "namespace": "flux-system", **extra},
                       "spec": {"url": "oci://gitea.example.com/platform/manifests/apps"},
                       "status": {"artifact": artifact}})


def kustomization(ready: str = "True", reason: str = "ReconciliationSucceeded",
                  **status: Any) -> FluxObject:
    conditions = [{"type": "Ready", "status": ready, "reason": reason, "message": ""}]
    return FluxObject({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                       "metadata": {"name": "apps", "namespace": "flux-system"},
                       "spec": {"sourceRef": {"kind": "OCIRepository", "name": "apps"}},
                       "status": {"conditions": conditions, **status}})


def helm_release(**status: Any) -> FluxObject:
    return FluxObject({"apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease",
                       "metadata": {"name": "podinfo", "namespace": "flux-system"},
                       "spec": {"chartRef": {"kind": "OCIRepository", "name": "apps"}},
                       "status": {"conditions": [{"type": "Ready", "status": "True",
                                                  "reason": "UpgradeSucceeded"}], **status}})


def event(reason: str = "ReconciliationSucceeded", severity: str = "info",
          kind: str = "Kustomization", **meta: str) -> FluxEvent:
    return FluxEvent(InvolvedObject(kind, "flux-system", "apps" if kind != "HelmRelease"
                                    else "podinfo"), severity, reason, "", metadata=meta)


# -- the origin revision ---------------------------------------------------------------------


@pytest.mark.parametrize(("revision", "commit"), [
    (f"main@sha1:{SHA}", SHA),
    (f"refs/heads/feature/x@sha1:{SHA}", SHA),
    (f"v1.2.0@SHA1:{SHA.upper()}", SHA),
    (f"sha1:{SHA}", SHA),
    (SHA, SHA),
    (f" {SHA}\n", SHA),
    (f"main/{SHA}", SHA),
    (f"feature/x/{SHA}", SHA),
    (f"main@sha256:{'c' * 64}", None),  # a SHA-256 object name, or an OCI digest
    (f"sha256:{'c' * 64}", None),
    ("c" * 64, None),
    (f"@sha1:{SHA}", None),
    (f"/{SHA}", None),
    (SHA[:12], None),
    (f"main@{SHA}", None),
    (f"main@sha1:{SHA}0", None),
    ("main", None),
    ("", None),
    (None, None),
    (42, None),
])
def test_origin_revisions_name_only_sha1_commits(revision: Any, commit: str | None) -> None:
    assert origin_commit(revision) == commit


@given(st.one_of(st.text(), st.from_regex(r"[a-z/]*@?(sha1|sha256)?:?[0-9a-fA-F]{38,66}"),
                 st.none(), st.integers()))
def test_any_origin_revision_is_a_40_hex_commit_or_nothing(revision: Any) -> None:
    found = origin_commit(revision)
    assert found is None or (len(found) == 40 and set(found) <= set("0123456789abcdef"))


@given(st.sampled_from(["", "main", "refs/tags/v1", "a/b"]),
       st.text("0123456789abcdef", min_size=40, max_size=40))
def test_every_accepted_form_gives_its_commit(ref: str, sha: str) -> None:
    forms = [f"sha1:{sha}", sha] + ([f"{ref}@sha1:{sha}", f"{ref}/{sha}"] if ref else [])
    assert {origin_commit(f) for f in forms} == {sha}


# -- events ----------------------------------------------------------------------------------


def test_an_event_s_origin_revision_names_the_commit() -> None:
    mapped = desired_from_event(event(revision=NEW_REV, originRevision=f"main@sha1:{SHA}"),
                                kustomization(), oci_source(), TEMPLATES, normalise)
    assert mapped.outcome == MAPPED and mapped.status is not None
    status = mapped.status
    assert (status.owner, status.repo, status.sha, status.context, status.state) == (
        "platform", "fleet", SHA, APPS_CONTEXT, SUCCESS)


def test_the_repository_comes_from_the_artifact_with_host_aliases_applied() -> None:
    meta = metadata(source="http://gitea-http.gitea.svc.cluster.local:3000/Platform/Fleet.git")
    mapped = desired_from_event(event(originRevision=f"main@sha1:{SHA}"), kustomization(),
                                oci_source(meta=meta), TEMPLATES, normalise)
    assert mapped.status is not None
    assert mapped.status.repo_key == "gitea.example.com/platform/fleet"


def test_without_an_origin_revision_the_source_vouches_only_for_its_own_artifact() -> None:
    ours = desired_from_event(event(revision=NEW_REV), kustomization(), oci_source(),
                              TEMPLATES, normalise)
    assert ours.status is not None and ours.status.sha == SHA
    older = desired_from_event(event(revision=OLD_REV), kustomization(), oci_source(),
                               TEMPLATES, normalise)
    assert older.outcome == NO_COMMIT


def test_an_oci_digest_is_never_taken_for_a_commit() -> None:
    # `revision` is `<tag>@sha256:<64 hex>`: 64 hex is also a SHA-256 object name to Git.
    meta = metadata(revision=f"latest@sha256:{NEW_DIGEST}")
    for source in (oci_source(meta=meta), oci_source(revision=OLD_REV)):
        mapped = desired_from_event(event(revision=NEW_REV), kustomization(), source,
                                    TEMPLATES, normalise)
        assert mapped.outcome == NO_COMMIT


def test_an_artifact_without_annotations_maps_to_nothing() -> None:
    no_url = desired_from_event(event(originRevision=f"main@sha1:{SHA}"), kustomization(),
                                oci_source(meta=metadata(source=None)), TEMPLATES, normalise)
    assert no_url.outcome == UNMAPPED
    no_revision = desired_from_event(event(revision=NEW_REV), kustomization(),
                                     oci_source(meta=metadata(revision=None)), TEMPLATES,
                                     normalise)
    assert no_revision.outcome == NO_COMMIT


def test_notification_controller_s_order_commit_first() -> None:
    other = "2" * 40
    meta = {"commit": other, "originRevision": f"main@sha1:{SHA}", "revision": NEW_REV}
    assert event_commit(meta, oci_source()) == other
    assert event_commit({"commit": "not-a-sha", "originRevision": f"main@sha1:{SHA}"},
                        oci_source()) == SHA


def test_a_helm_release_event_ties_through_its_chart_version_digest() -> None:
    tied = desired_from_event(event("UpgradeSucceeded", kind="HelmRelease",
                                    revision=f"1.4.0+{NEW_DIGEST[:12]}"),
                              helm_release(), oci_source(), TEMPLATES, normalise)
    assert tied.status is not None and tied.status.sha == SHA
    assert tied.status.context == "flux/eu-west/helmrelease/flux-system/podinfo"
    other = desired_from_event(event("UpgradeSucceeded", kind="HelmRelease",
                                     revision=f"1.4.0+{OLD_DIGEST[:12]}"),
                               helm_release(), oci_source(), TEMPLATES, normalise)
    assert other.outcome == NO_COMMIT


def test_the_oci_source_itself_gets_no_status() -> None:
    source = oci_source()
    mapped = desired_from_event(
        FluxEvent(InvolvedObject("OCIRepository", "flux-system", "apps"), "info",
                  "NewArtifact", "", metadata={"revision": NEW_REV}),
        source, None, TEMPLATES, normalise)
    assert mapped.outcome == UNMAPPED


# -- live state (resync) ---------------------------------------------------------------------


def test_ready_kustomization_is_success_at_its_applied_origin_revision() -> None:
    obj = kustomization(lastAppliedRevision=NEW_REV, lastAttemptedRevision=NEW_REV,
                        lastAppliedOriginRevision=f"main@sha1:{SHA}")
    desired = desired_from_object(obj, oci_source(), TEMPLATES, normalise)
    assert desired is not None
    assert (desired.sha, desired.state, desired.context) == (SHA, SUCCESS, APPS_CONTEXT)


def test_a_new_artifact_being_reconciled_is_pending_at_its_commit() -> None:
    # The interval poll pulled a new artifact; no package push was seen.
    obj = kustomization("Unknown", "Progressing", lastAppliedRevision=OLD_REV,
                        lastAttemptedRevision=NEW_REV,
                        lastAppliedOriginRevision=f"main@sha1:{OLD}")
    assert consumer_commits(obj, oci_source()) == (OLD, SHA)
    desired = desired_from_object(obj, oci_source(), TEMPLATES, normalise)
    assert desired is not None and (desired.sha, desired.state) == (SHA, PENDING)


def test_a_failure_is_at_the_commit_of_the_artifact_it_attempted() -> None:
    obj = kustomization("False", "HealthCheckFailed", lastAppliedRevision=OLD_REV,
                        lastAttemptedRevision=NEW_REV,
                        lastAppliedOriginRevision=f"main@sha1:{OLD}")
    desired = desired_from_object(obj, oci_source(), TEMPLATES, normalise)
    assert desired is not None and (desired.sha, desired.state) == (SHA, "failure")
    # The source moved on since: the attempt can no longer be tied to a commit.
    moved = oci_source(revision=f"latest@sha256:{'d' * 64}")
    assert desired_from_object(obj, moved, TEMPLATES, normalise) is None


def test_a_last_attempted_origin_revision_is_used_when_the_crd_has_one() -> None:
    obj = kustomization("False", "BuildFailed", lastAttemptedRevision=f"x@sha256:{'e' * 64}",
                        lastAttemptedOriginRevision=f"main@sha1:{SHA}")
    assert consumer_commits(obj, oci_source())[1] == SHA


def test_helm_release_from_an_oci_chart_ties_through_the_artifact() -> None:
    chart = f"1.4.0+{NEW_DIGEST[:12]}"
    release = helm_release(history=[{"chartVersion": chart, "status": "deployed"}],
                           lastAttemptedRevision=chart,
                           lastAttemptedRevisionDigest=f"sha256:{NEW_DIGEST}")
    desired = desired_from_object(release, oci_source(), TEMPLATES, normalise)
    assert desired is not None and (desired.sha, desired.state) == (SHA, SUCCESS)
    assert ties_to_artifact(f"sha256:{NEW_DIGEST}", oci_source())
    assert not ties_to_artifact(f"1.4.0+{OLD_DIGEST[:12]}", oci_source())
    # A new artifact replaced the one it deployed: nothing to vouch for.
    assert desired_from_object(release, oci_source(revision=OLD_REV), TEMPLATES,
                               normalise) is None


def test_a_timed_out_commit_superseded_by_a_newer_artifact_is_skipped() -> None:
    source = oci_source()
    source.raw["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    desired = desired_after_timeout(kustomization(), source, OLD, TEMPLATES, normalise)
    assert desired is not None and desired.state == SKIPPED
    assert SHA[:12] in desired.description


# -- package deliveries, as any replica sees them ------------------------------------------


def test_a_package_delivery_records_the_pushed_reference() -> None:
    ref = package_ref("gitea.example.com", "platform", "manifests/apps", "latest")
    assert ref == "oci://gitea.example.com/platform/manifests/apps:latest"
    assert package_tag(ref) == "latest"
    assert package_tag("oci://gitea.example.com:3000/platform/app:v1.2.0") == "v1.2.0"
    assert package_tag(package_ref("h", "o", "n", f"sha256:{NEW_DIGEST}")) is None
    assert package_tag("refs/heads/main") is None


@given(st.from_regex(r"[a-z0-9.-]{1,20}(:[0-9]{2,5})?", fullmatch=True),
       st.from_regex(r"[a-z0-9_.-]{1,20}(/[a-z0-9_.-]{1,20}){0,2}", fullmatch=True),
       st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,40}", fullmatch=True))
def test_a_package_ref_gives_back_its_tag(registry: str, name: str, tag: str) -> None:
    assert package_tag(package_ref(registry, "platform", name, tag)) == tag


def test_a_re_pushed_tag_waits_for_the_new_artifact() -> None:
    received = float(calendar.timegm((2026, 11, 30, 6, 0, 0)))
    before = oci_source(stored="2026-11-30T05:59:59Z")
    after = oci_source(stored="2026-11-30T06:00:00Z")
    assert not has_pushed_artifact(before, "latest", received + 0.5, False)
    assert has_pushed_artifact(after, "latest", received + 0.5, False)
    assert has_pushed_artifact(before, "latest", received, True)  # it handled our request
    assert not has_pushed_artifact(after, "v2", received, True)


def _record(received: float, *targets: RecordTarget) -> DeliveryRecord:
    return DeliveryRecord("flux-system/registry", "",
                          "oci://gitea.example.com/platform/manifests/apps:latest",
                          received, MARK, targets)


def _lookup(*objects: FluxObject) -> Any:
    table = {o.key: o for o in objects}
    return table.get


def test_a_package_delivery_follows_its_consumers_at_the_artifact_s_commit() -> None:
    received = time.time() - 5
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = _record(received, RecordTarget(APPS, ROLE_TRACK))
    timeouts = Timeouts(60, 60)
    stale = oci_source(revision=OLD_REV, meta=metadata(f"main@sha1:{OLD}"),
                       stored="2026-01-01T00:00:00Z")
    fresh = oci_source(stored=stamp)
    ready_old = kustomization(lastAppliedRevision=OLD_REV, lastAttemptedRevision=OLD_REV,
                              lastAppliedOriginRevision=f"main@sha1:{OLD}")
    assert package_commit(record, stale) is None
    view = evaluate(record, _lookup(stale, ready_old), time.time(), timeouts)
    assert view.targets[0].state == RECONCILING and not view.targets[0].reason

    assert package_commit(record, fresh) == SHA
    started = evaluate(record, _lookup(fresh, ready_old), time.time(), timeouts).targets[0]
    assert started.state == RECONCILING and SHA in started.message

    ready = kustomization(lastAppliedRevision=NEW_REV, lastAttemptedRevision=NEW_REV,
                          lastAppliedOriginRevision=f"main@sha1:{SHA}")
    assert evaluate(record, _lookup(fresh, ready), time.time(), timeouts).targets[0].state == READY
    failed = kustomization("False", "HealthCheckFailed", lastAppliedRevision=OLD_REV,
                           lastAttemptedRevision=NEW_REV,
                           lastAppliedOriginRevision=f"main@sha1:{OLD}")
    assert evaluate(record, _lookup(fresh, failed), time.time(),
                    timeouts).targets[0].state == FAILED
    late = evaluate(record, _lookup(stale, ready_old), received + 61, timeouts).targets[0]
    assert late.state == TIMED_OUT


def test_a_source_annotated_by_the_delivery_has_it_once_it_handled_the_request() -> None:
    received = time.time() - 5
    record = _record(received, RecordTarget(OCI, ROLE_ANNOTATE), RecordTarget(APPS, ROLE_TRACK))
    requested = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(received + 1))
    source = oci_source(stored="2026-01-01T00:00:00Z",
                        annotations={"reconcile.fluxcd.io/requestedAt": requested})
    source.raw["status"]["lastHandledReconcileAt"] = requested
    assert not has_push(record, source)  # not our mark: someone else's request
    marks = delivery_marks.merge({}, [delivery_marks.Mark(MARK, received)], received, 60).value
    marked = oci_source(stored="2026-01-01T00:00:00Z", annotations={
        delivery_marks.DELIVERIES_ANNOTATION: marks,
        "reconcile.fluxcd.io/requestedAt": requested})
    marked.raw["status"]["lastHandledReconcileAt"] = requested
    assert has_push(record, marked)


# -- the service over HTTP -------------------------------------------------------------------


@pytest.fixture
def gitea() -> Iterator[tuple[FakeGitea, httpx.AsyncBaseTransport]]:
    fake = FakeGitea(token=GITEA_TOKEN)
    transport, _ = gitea_transport({"gitea.example.com": fake})
    yield fake, transport
    assert fake.problems == []


Served = tuple[FakeGitea, Bridge]  # the fake Gitea, and the bridge posting to it


@pytest.fixture
async def served(bridge_factory: BridgeFactory, tmp_path: Path,
                 gitea: tuple[FakeGitea, httpx.AsyncBaseTransport]
                 ) -> Served:
    """The fake Gitea, and the bridge over the OCI manifests posting to it: every service test's
    start."""
    fake, transport = gitea
    (tmp_path / "gitea").write_text(GITEA_TOKEN)
    settings = make_settings(
        gitea=[{"name": "eu", "url": "https://gitea.example.com",
                "token": {"file": str(tmp_path / "gitea")}}],
        insecure={"allow_unsigned_events": True},
        statuses={"resync_interval_seconds": 3600})
    bridge: Bridge = await bridge_factory(settings, MANIFESTS, transport=transport)
    return fake, bridge


async def _push_package(bridge: Bridge, version: str = "latest",
                        receiver: str = "registry") -> dict[str, Any]:
    doc = json.loads(PAYLOAD.read_text())
    doc["package"]["version"] = version
    return await send_package_event(bridge, receiver, TOKEN, json.dumps(doc).encode())


def _states(fake: FakeGitea, sha: str, context: str) -> list[str]:
    return [p[3]["state"] for p in fake.posts
            if p[2] == sha and p[3]["context"] == context]


@pytest.mark.anyio
async def test_package_push_pending_then_success_and_failure(served: Served) -> None:
    fake, bridge = served
    reply = await _push_package(bridge)
    assert reply["ref"] == "oci://gitea.example.com/platform/manifests/apps:latest"
    assert reply["commit"] == ""
    # The bridge annotated the source; source-controller pulls the new `latest`.
    await until(lambda: "reconcile.fluxcd.io/requestedAt" in (
        bridge.cluster.store.get(OCI) or oci_source()).annotations, what="source annotated")
    bridge.cluster.mark_artifact(OCI, NEW_REV, metadata(
        source="http://gitea-http.gitea.svc.cluster.local:3000/platform/fleet.git"))
    await until(lambda: _states(fake, SHA, APPS_CONTEXT) == ["pending"]
                and _states(fake, SHA, INFRA_CONTEXT) == ["pending"], what="pending")
    # kustomize-controller applies one, fails the other.
    bridge.cluster.mark_progressing(APPS, NEW_REV)
    bridge.cluster.mark_applied(APPS, NEW_REV, origin_revision=f"main@sha1:{SHA}")
    bridge.cluster.mark_failed(INFRA, NEW_REV, "HealthCheckFailed", "deployment not ready")
    await until(lambda: _states(fake, SHA, APPS_CONTEXT) == ["pending", "success"]
                and _states(fake, SHA, INFRA_CONTEXT) == ["pending", "failure"],
                what="success and failure")
    # The delivery a CI step follows says the same.
    delivery = await bridge.client.get(f"/deliveries/{reply['delivery']}",
                                       headers={"Authorization": f"Bearer {TOKEN}"})
    states = {t["name"]: t["state"] for t in delivery.json()["targets"]
              if t["kind"] == "Kustomization"}
    assert states == {"apps": "ready", "infra": "failed"}
    assert delivery.json()["outcome"] == "failed"
    # The artifact `latest` named before the push never got a pending from it.
    assert "pending" not in _states(fake, OLD, APPS_CONTEXT)


@pytest.mark.anyio
async def test_an_artifact_without_annotations_posts_nothing(served: Served) -> None:
    fake, bridge = served
    reply = await _push_package(bridge)
    bridge.cluster.mark_artifact(OCI, NEW_REV, {})  # pushed without --source/--revision
    bridge.cluster.mark_applied(APPS, NEW_REV)
    metrics = bridge.parts.metrics

    async def send(meta: dict[str, str]) -> None:
        body = json.dumps({
            "involvedObject": {"kind": "Kustomization", "namespace": "flux-system",
                               "name": "apps",
                               "apiVersion": "kustomize.toolkit.fluxcd.io/v1"},
            "severity": "info", "reason": "ReconciliationSucceeded", "message": "",
            "metadata": meta}).encode()
        sent = await bridge.client.post("/events", content=body,
                                        headers={"Content-Type": "application/json"})
        assert sent.json() == {"accepted": True, "statuses": 0}

    def counted(outcome: str) -> float:
        return sum(sample.value for family in metrics.registry.collect()
                   for sample in family.samples
                   if sample.name == "gfb_events_total" and sample.labels == {"outcome": outcome})

    await send({"revision": NEW_REV})
    assert counted("unmapped") == 1
    bridge.cluster.mark_artifact(OCI, NEW_REV, metadata(revision=f"latest@sha256:{NEW_DIGEST}"))
    await send({"revision": NEW_REV, "originRevision": f"latest@sha256:{NEW_DIGEST}"})
    assert counted("no_commit") == 1
    # The delivery still follows the artifact by its revision: the consumer is ready at it,
    # and nothing was posted for it on any commit.
    delivery = bridge.parts.deliveries.get(reply["delivery"])
    await until(lambda: delivery.view.get(APPS).state == READY, what="ready at the artifact")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    view = (await bridge.client.get(f"/deliveries/{reply['delivery']}", headers=auth)).json()
    assert {t["name"]: t["state"] for t in view["targets"]}["apps"] == "ready"
    await until(lambda: bridge.parts.statuses.queue_depth == 0, what="queue drained")
    assert [p for p in fake.posts if p[2] != OLD] == []


@pytest.mark.anyio
async def test_the_resync_repairs_a_missed_oci_status(served: Served) -> None:
    fake, bridge = served
    service = bridge.parts.statuses
    # The startup resync covers what the fixture says: success on the old commit.
    await until(lambda: fake.contexts("platform", "fleet", OLD).get(APPS_CONTEXT) == "success",
                what="startup resync")
    # The interval poll pulls a new artifact, no package event: the resync sees it started.
    bridge.cluster.mark_artifact(OCI, NEW_REV, metadata())
    bridge.cluster.mark_progressing(APPS, NEW_REV)
    await service.resync_once()
    await until(lambda: _states(fake, SHA, APPS_CONTEXT) == ["pending"], what="pending")
    # Its outcome's event is lost; the next resync posts it.
    bridge.cluster.mark_applied(APPS, NEW_REV, origin_revision=f"main@sha1:{SHA}")
    assert await service.resync_once() == 1
    await until(lambda: _states(fake, SHA, APPS_CONTEXT) == ["pending", "success"],
                what="success")
    await until(lambda: service.queue_depth == 0, what="queue drained")
    assert await service.resync_once() == 0


@pytest.mark.anyio
async def test_a_listed_consumer_is_annotated_once_the_artifact_is_there(served: Served) -> None:
    fake, bridge = served
    reply = await _push_package(bridge, receiver="registry-listed")
    assert [t["name"] for t in reply["targets"]] == ["apps", "apps"]
    store = bridge.cluster.store

    def requested(key: ObjectKey) -> bool:
        obj = store.get(key)
        return obj is not None and "reconcile.fluxcd.io/requestedAt" in obj.annotations

    await until(lambda: requested(OCI), what="source annotated")
    assert not requested(APPS)  # its source still holds the previous artifact
    bridge.cluster.mark_artifact(OCI, NEW_REV, metadata())
    await until(lambda: requested(APPS), what="consumer annotated")
    await until(lambda: _states(fake, SHA, APPS_CONTEXT) == ["pending"], what="pending")
    bridge.cluster.mark_applied(APPS, NEW_REV, origin_revision=f"main@sha1:{SHA}")
    await until(lambda: _states(fake, SHA, APPS_CONTEXT) == ["pending", "success"],
                what="success")


@pytest.mark.anyio
async def test_a_pending_overtaken_by_a_newer_artifact_is_ended(served: Served) -> None:
    fake, bridge = served
    await _push_package(bridge)
    bridge.cluster.mark_artifact(OCI, NEW_REV, metadata())
    await until(lambda: _states(fake, SHA, APPS_CONTEXT) == ["pending"], what="pending")
    # `latest` is pushed again (another commit) before kustomize-controller applied ours.
    newer = "2" * 40
    newer_rev = f"latest@sha256:{'c' * 64}"
    bridge.cluster.mark_artifact(OCI, newer_rev, metadata(f"main@sha1:{newer}"))
    bridge.cluster.mark_applied(APPS, newer_rev, origin_revision=f"main@sha1:{newer}")
    await until(lambda: _states(fake, newer, APPS_CONTEXT)[-1:] == ["success"],
                what="success on the newer commit")
    await until(lambda: _states(fake, SHA, APPS_CONTEXT) == ["pending", "skipped"],
                what="the overtaken pending ended")
    assert "Superseded" in fake.latest("platform", "fleet", SHA, APPS_CONTEXT)["description"]


@pytest.mark.anyio
async def test_an_event_posts_on_the_commit_its_origin_revision_names(served: Served) -> None:
    fake, bridge = served
    bridge.cluster.mark_artifact(OCI, NEW_REV, metadata())
    body = json.dumps({
        "involvedObject": {"kind": "Kustomization", "namespace": "flux-system", "name": "infra",
                           "apiVersion": "kustomize.toolkit.fluxcd.io/v1"},
        "severity": "error", "reason": "HealthCheckFailed", "message": "timeout waiting",
        "metadata": {"kustomize.toolkit.fluxcd.io/revision": NEW_REV,
                     "kustomize.toolkit.fluxcd.io/originRevision": f"main@sha1:{SHA}"},
        "reportingController": "kustomize-controller"}).encode()
    sent = await bridge.client.post("/events", content=body,
                                    headers={"Content-Type": "application/json"})
    assert sent.json() == {"accepted": True, "statuses": 1}
    await until(lambda: _states(fake, SHA, INFRA_CONTEXT) == ["failure"], what="failure")
    assert fake.latest("platform", "fleet", SHA, INFRA_CONTEXT)["description"] == (
        "Health check failed: timeout waiting")
