"""Every kind a Receiver may list is annotated: routed where the bridge understands the kind,
otherwise annotated on every request as Flux does, with the reason; sources first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from receiver import signatures as sig
from receiver.flux.objects import (
    ANNOTATE_ONLY_KINDS,
    API_VERSIONS,
    RECEIVER_DEFAULT_API_VERSIONS,
    RECEIVER_KINDS,
    RECONCILE_ANNOTATION,
    ObjectKey,
)
from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import parse_actions_body
from receiver.giturls import normalise_repo_url
from receiver.push.routing import plan_push
from tests.conftest import FIXTURES, FLEET, HMAC_TOKEN, Bridge

EXTRA: list[dict[str, Any]] = [
    {"apiVersion": API_VERSIONS[kind], "kind": kind,
     "metadata": {"name": "x", "namespace": "flux-system"}, "spec": {}}
    for kind in ANNOTATE_ONLY_KINDS
]
RESOURCES = [
    {"kind": "GitRepository", "name": "flux-system"},
    *({"apiVersion": API_VERSIONS[k], "kind": k, "name": "x"} for k in reversed(ANNOTATE_ONLY_KINDS)),
    {"apiVersion": API_VERSIONS["ImageRepository"], "kind": "ImageRepository", "name": "*",
     "matchLabels": {"team": "a"}},
]
RECEIVER = {"apiVersion": API_VERSIONS["Receiver"], "kind": "Receiver",
            "metadata": {"name": "hmac", "namespace": "flux-system"},
            "spec": {"type": "generic-hmac", "secretRef": {"name": "hmac-token"},
                     "resources": RESOURCES}}


def test_the_kinds_are_the_receiver_crds_enum() -> None:
    crd = yaml.safe_load((FIXTURES / "crds" / "notification.toolkit.fluxcd.io_receivers.yaml")
                         .read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    enum = schema["properties"]["spec"]["properties"]["resources"]["items"]["properties"][
        "kind"]["enum"]
    assert sorted(enum) == sorted(RECEIVER_KINDS)
    assert set(RECEIVER_KINDS) <= set(API_VERSIONS)
    # Where Flux defaults an entry's apiVersion, the bridge patches that same version.
    for kind, version in RECEIVER_DEFAULT_API_VERSIONS.items():
        assert API_VERSIONS[kind] == version


def _plan(push: Any) -> Any:
    store = ObjectStore(lambda url: normalise_repo_url(url))
    for doc in yaml.safe_load_all((FLEET / "sources.yaml").read_text()):
        store.upsert(doc)
    receiver = store.upsert(RECEIVER)
    return plan_push(receiver, push, store)


SOURCES_FIRST = ["Bucket", "HelmChart", "HelmRepository", "ImageRepository", "ArtifactGenerator",
                 "ExternalArtifact"]


def test_unrouted_kinds_are_annotated_on_a_push_sources_first_with_the_reason() -> None:
    push = parse_actions_body({"repository": "https://gitea.example.com/platform/fleet",
                               "ref": "main", "sha": "c" * 40})
    plan = _plan(push)
    assert [t.name for t in plan.targets] == ["flux-system"]
    kinds = [t.kind for t in plan.annotate_only]
    assert sorted(kinds) == sorted(ANNOTATE_ONLY_KINDS)
    assert set(kinds[:len(SOURCES_FIRST)]) == set(SOURCES_FIRST)
    assert kinds[len(SOURCES_FIRST):] == ["ImagePolicy", "ImageUpdateAutomation"]
    assert {t.kind: t.reason for t in plan.annotate_only}["Bucket"] == (
        "Bucket is not routed by repository, ref or path: annotated on every request, as Flux does")
    star = {t.kind: t.reason for t in plan.skipped if t.name == "*"}
    assert "does not list" in star["ImageRepository"]


def test_without_push_details_they_are_listed_objects_like_the_others() -> None:
    plan = _plan(None)
    assert all(t.reason == "listed in the receiver (no push details)" for t in plan.annotate_only)
    assert plan.as_dict()["annotate_only"][0]["kind"] == "ArtifactGenerator"


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    for item in FLEET.iterdir():
        if item.suffix == ".yaml":
            shutil.copy(item, tmp_path / item.name)
    docs = [d for d in yaml.safe_load_all((FLEET / "receivers.yaml").read_text()) if d]
    docs = [RECEIVER if d["kind"] == "Receiver" and d["metadata"]["name"] == "hmac" else d
            for d in docs]
    (tmp_path / "receivers.yaml").write_text(yaml.safe_dump_all(docs))
    (tmp_path / "others.yaml").write_text(yaml.safe_dump_all(EXTRA))
    return tmp_path


@pytest.mark.anyio
async def test_the_service_patches_every_listed_kind_with_flux_annotation(
    bridge_factory: Any, manifests: Path,
) -> None:
    bridge: Bridge = await bridge_factory(directory=manifests)
    body = b"deploy"
    path = "/hook/" + sig.hook_digest(HMAC_TOKEN, "hmac", "flux-system")
    r = await bridge.client.post(path, content=body, headers={
        "X-Signature": "sha256=" + sig.hmac_hex("sha256", HMAC_TOKEN, body)})
    assert r.status_code == 202, r.text
    reply = r.json()
    assert [t["kind"] for t in reply["targets"]] == ["GitRepository"]
    assert {e["kind"]: e["state"] for e in reply["annotate_only"]} == dict.fromkeys(
        ANNOTATE_ONLY_KINDS, "annotated")
    for kind in ANNOTATE_ONLY_KINDS:
        obj = bridge.cluster.store.get(ObjectKey(kind, "flux-system", "x"))
        assert obj is not None and RECONCILE_ANNOTATION in obj.annotations, kind
    # Only Flux's annotation: no delivery mark on objects nobody follows.
    patched = {k.kind: a for k, a in bridge.cluster.patches if k.kind in ANNOTATE_ONLY_KINDS}
    assert all(set(a) == {RECONCILE_ANNOTATION} for a in patched.values())
    json.dumps(reply)


@pytest.mark.anyio
async def test_a_missing_object_is_reported_failed_and_the_others_still_annotated(
    bridge_factory: Any, manifests: Path,
) -> None:
    (manifests / "others.yaml").write_text(yaml.safe_dump_all(EXTRA[1:]))
    bridge: Bridge = await bridge_factory(directory=manifests)
    path = "/hook/" + sig.hook_digest(HMAC_TOKEN, "hmac", "flux-system")
    r = await bridge.client.post(path, content=b"", headers={
        "X-Signature": "sha256=" + sig.hmac_hex("sha256", HMAC_TOKEN, b"")})
    assert r.status_code == 202, r.text
    states = {e["kind"]: e["state"] for e in r.json()["annotate_only"]}
    assert states.pop(EXTRA[0]["kind"]) == "failed"
    assert set(states.values()) == {"annotated"}
