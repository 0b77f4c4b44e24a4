"""Gitea `package` events: the payload model, the OCI URL key, the tag strategies of each
kind, the plan, and the same answer from the service and `plan`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.cli import EXIT_OK, main
from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import RECONCILE_ANNOTATION, ObjectKey
from receiver.flux.store import ObjectStore
from receiver.gitea.package_payloads import PackagePush, parse_gitea_package
from receiver.gitea.payloads import PayloadError
from receiver.giturls import normalise_oci_url, registry_host
from receiver.push.package_routing import chart_version_match, oci_ref_match, plan_package
from receiver.push.selector import GITEA_PACKAGE, select_payload
from receiver.web.app import url_normaliser
from tests.conftest import (
    FIXTURES,
    BridgeFactory,
    make_settings,
    send_package_event,
    settled_delivery,
    until,
)

PACKAGES = FIXTURES / "packages"
PAYLOAD = FIXTURES / "payloads" / "gitea-package-container.json"
TOKEN = "registry-secret-token"
ALIASES = {"gitea-http.gitea.svc.cluster.local:3000": "gitea.example.com"}


def _doc(**package: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(PAYLOAD.read_text())
    action = package.pop("action", None)
    if action is not None:
        doc["action"] = action
    doc["package"].update(package)
    return doc


def _store() -> ObjectStore:
    store = ObjectStore(url_normaliser(make_settings(host_aliases=ALIASES)))
    MemoryCluster.from_directory(store, PACKAGES)
    return store


def _plan(doc: dict[str, Any]) -> dict[str, Any]:
    store = _store()
    receiver = store.get(ObjectKey("Receiver", "flux-system", "registry"))
    assert receiver is not None
    return plan_package(receiver, parse_gitea_package(doc), store).as_dict(store)


def _names(targets: list[dict[str, str]]) -> list[str]:
    return [f"{t['kind']}/{t['name']}" for t in targets]


# -- the payload ----------------------------------------------------------------------------


def test_a_container_push_is_read_from_gitea_s_package_payload() -> None:
    package = parse_gitea_package(json.loads(PAYLOAD.read_text()))
    assert package == PackagePush("created", "container", "platform", "manifests/apps",
                                  "v1.4.0", "https://gitea.example.com")
    assert select_payload("github", PAYLOAD.read_bytes()).shape == GITEA_PACKAGE


def test_the_instance_falls_back_to_the_owner_s_or_sender_s_profile_url() -> None:
    doc = _doc(html_url="")
    assert parse_gitea_package(doc).instance == "https://gitea.example.com"
    doc["package"]["owner"]["html_url"] = ""
    doc["sender"]["html_url"] = "http://localhost:3000/sub/ci-bot"
    assert parse_gitea_package(doc).instance == "http://localhost:3000/sub"
    assert registry_host("http://localhost:3000/sub") == "localhost:3000"


@pytest.mark.parametrize(("change", "message"), [
    ({"action": "published"}, "action must be created or deleted"),
    ({"name": ""}, "no package.name"),
    ({"version": 7}, "no package.version"),
    ({"owner": None}, "no package.owner.login"),
])
def test_a_package_event_without_what_routing_needs_is_refused(
    change: dict[str, Any], message: str,
) -> None:
    with pytest.raises(PayloadError, match=message):
        parse_gitea_package(_doc(**change))


def test_a_package_event_naming_no_instance_is_refused() -> None:
    doc = _doc(html_url="")
    doc["package"]["owner"]["html_url"] = ""
    doc["sender"] = None
    with pytest.raises(PayloadError, match="names no Gitea instance"):
        parse_gitea_package(doc)


# -- the OCI URL key ------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "key"), [
    ("oci://Gitea.Example.com/Platform/App/", "gitea.example.com/platform/app"),
    ("oci://gitea.example.com:443/platform/team/app", "gitea.example.com/platform/team/app"),
    ("oci://localhost:3000/o/app", "localhost:3000/o/app"),
    ("oci://gitea-http.gitea.svc.cluster.local:3000/o/app", "gitea.example.com/o/app"),
    ("https://gitea.example.com/o/app", None),
    ("oci://gitea.example.com", None),
    ("oci://bad host/o/app", None),
])
def test_oci_urls_normalise_host_case_aliases_and_trailing_slash(url: str,
                                                                  key: str | None) -> None:
    assert normalise_oci_url(url, ALIASES) == key


_SEGMENT = st.from_regex(r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,8}", fullmatch=True)


@given(st.lists(_SEGMENT, min_size=1, max_size=4), st.booleans())
def test_an_oci_key_ignores_case_and_a_trailing_slash(segments: list[str], slash: bool) -> None:
    url = "oci://Gitea.Example.com/" + "/".join(segments)
    key = normalise_oci_url(url + ("/" if slash else ""))
    assert key == normalise_oci_url(url.lower())
    assert key is not None and normalise_oci_url("oci://" + key) == key


# -- tag strategies -------------------------------------------------------------------------

CURRENT = "v1.3.0@sha256:" + "1" * 64


@pytest.mark.parametrize(("ref", "version", "revision", "taken"), [
    (None, "latest", "", True),  # no ref: tag latest
    (None, "v1.4.0", "", False),
    ({"tag": "v1.4.0"}, "v1.4.0", "", True),
    ({"tag": "V1.4.0"}, "v1.4.0", "", True),  # Gitea lower-cases tags
    ({"tag": "v1.4.0"}, "v1.4.1", "", False),
    ({"semver": ">=1.0.0"}, "v1.4.0", CURRENT, True),
    ({"semver": ">=1.0.0"}, "v1.2.9", CURRENT, False),  # below what it pulled
    ({"semver": ">=1.0.0"}, "v1.2.9", "", True),
    ({"semver": "~1.3"}, "v1.4.0", CURRENT, False),
    ({"semver": ">=1.0.0", "semverFilter": "-rc"}, "v1.4.0", "", False),
    ({"semver": ">=1.0.0-0", "semverFilter": "-rc"}, "v1.4.0-rc.1", "", True),
    ({"semver": "1.x"}, "1.2.0_build.5", "", True),  # Helm's `_` stands for `+`
    ({"semver": "not a range"}, "v1.4.0", "", False),
    ({"digest": "sha256:" + "2" * 64, "tag": "v1.4.0"}, "v1.4.0", "", False),
    ({"tag": "latest"}, "sha256:" + "3" * 64, "", False),  # pushed by digest
    ({"semver": "*"}, "sha256:" + "3" * 64, "", False),
])
def test_each_oci_tag_strategy(ref: Any, version: str, revision: str, taken: bool) -> None:
    assert oci_ref_match(ref, version, revision)[0] is taken


@given(st.from_regex(r"v?[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True),
       st.from_regex(r"v?[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}", fullmatch=True))
def test_a_tag_ref_takes_exactly_its_own_tag(tag: str, version: str) -> None:
    assert oci_ref_match({"tag": tag}, version)[0] is (tag == version)
    assert oci_ref_match({"digest": "sha256:" + "0" * 64, "tag": tag}, tag)[0] is False


@pytest.mark.parametrize(("version_range", "version", "taken"), [
    ("", "1.0.0", True), ("*", "1.0.0-rc.1", False), (">=1.4.0 <2.0.0", "1.4.0", True),
    (">=1.4.0 <2.0.0", "2.0.0", False), ("garbage", "1.0.0", False),
])
def test_chart_version_ranges(version_range: str, version: str, taken: bool) -> None:
    assert chart_version_match(version_range, version)[0] is taken


# -- the plan -------------------------------------------------------------------------------


def test_a_container_push_reconciles_the_sources_it_feeds_then_their_consumers() -> None:
    plan = _plan(_doc())
    assert _names(plan["targets"]) == ["OCIRepository/apps-semver", "HelmRepository/charts",
                                       "ImageRepository/apps", "HelmRelease/podinfo",
                                       "Kustomization/apps"]
    assert "registry oci://gitea.example.com/platform/manifests/apps" in (
        plan["targets"][0]["reason"])
    # The ImageRepository's image names the registry through the host alias.
    assert plan["targets"][2]["reason"] == (
        "image gitea.example.com/platform/manifests/apps: ImagePolicy/flux-system/apps "
        "(semver >=1.0.0 (above the current v1.3.0)) takes v1.4.0")
    # A HelmRelease from a Helm repository has no commit to be ready at: annotated, not followed.
    assert _names(plan["tracked"]) == ["Kustomization/apps"]
    # The HelmRepository is cached and routed through the HelmChart generated for podinfo.
    assert "annotate_only" not in plan
    skipped = {f"{t['kind']}/{t['name']}": t["reason"] for t in plan["skipped"]}
    assert skipped == {
        "OCIRepository/apps-pinned": "pinned to digest sha256:" + "2" * 64
                                     + " does not take v1.4.0",
        "OCIRepository/apps-tag": "tag latest does not take v1.4.0",
        "OCIRepository/other-image":
            "its URL is not oci://gitea.example.com/platform/manifests/apps",
    }


def test_a_tag_below_the_pulled_one_feeds_only_the_tag_source() -> None:
    plan = _plan(_doc(version="latest"))
    assert _names(plan["targets"]) == ["OCIRepository/apps-tag"]
    reasons = {t["name"]: t["reason"] for t in plan["skipped"]}
    assert reasons["podinfo"].startswith("chart version >=1.4.0 <2.0.0 does not take")
    assert reasons["apps-semver"] == "semver >=1.0.0 does not take latest"


def test_a_deleted_version_reconciles_nothing_and_says_why() -> None:
    plan = _plan(_doc(action="deleted"))
    assert plan["targets"] == [] and plan["tracked"] == [] and "annotate_only" not in plan
    note = "container package platform/manifests/apps:v1.4.0 deleted: deleted versions are " \
           "not reconciled"
    assert plan["note"] == note
    assert len(plan["skipped"]) == 8 and all(t["reason"] == note for t in plan["skipped"])


def test_a_package_type_no_source_reads_reconciles_nothing() -> None:
    plan = _plan(_doc(type="npm"))
    assert plan["targets"] == [] and plan["note"].endswith("no Flux source reads npm packages")


def test_a_helm_package_feeds_the_helm_kinds_only() -> None:
    plan = _plan(_doc(type="helm", name="manifests/apps", version="1.5.0"))
    # Gitea's `helm` type is its HTTP Helm repository: not the OCI HelmRepository here.
    assert plan["targets"] == [] and "annotate_only" not in plan
    reasons = {t["name"]: t["reason"] for t in plan["skipped"]}
    assert reasons["charts"] == "a HelmRepository of type oci does not read helm packages"
    assert reasons["apps"] == "a ImageRepository does not read helm packages" or (
        "its source is not fed" in reasons["apps"])


# -- the service and `plan` ----------------------------------------------------------------


@pytest.mark.anyio
async def test_a_signed_package_event_is_routed_over_http(bridge_factory: BridgeFactory) -> None:
    bridge = await bridge_factory(make_settings(host_aliases=ALIASES), PACKAGES)
    doc = await send_package_event(bridge, "registry", TOKEN, PAYLOAD.read_bytes())
    assert _names(doc["targets"]) == ["OCIRepository/apps-semver", "HelmRepository/charts",
                                      "ImageRepository/apps", "HelmRelease/podinfo",
                                      "Kustomization/apps"]
    assert {t["name"] for t in doc["skipped"]} == {"apps-pinned", "apps-tag", "other-image"}
    image = next(t for t in doc["targets"] if t["kind"] == "ImageRepository")
    assert image["state"] == "annotated" and image["reason"].startswith(
        "image gitea.example.com/platform/manifests/apps: ImagePolicy/flux-system/apps")
    annotated = bridge.cluster.store.get(ObjectKey("ImageRepository", "flux-system", "apps"))
    assert annotated is not None and RECONCILE_ANNOTATION in annotated.annotations


def test_plan_explains_a_package_event(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"host_aliases": ALIASES}))
    deleted = tmp_path / "deleted.json"
    deleted.write_text(json.dumps(_doc(action="deleted")))
    assert main(["plan", "--config", str(config), "--manifests", str(PACKAGES),
                 "--payload", str(PAYLOAD)]) == EXIT_OK
    planned = json.loads(capsys.readouterr().out)
    assert _names(planned["targets"]) == ["OCIRepository/apps-semver", "HelmRepository/charts",
                                          "ImageRepository/apps", "HelmRelease/podinfo",
                                          "Kustomization/apps"]
    assert "ImagePolicy/flux-system/apps" in planned["targets"][2]["reason"]
    assert main(["plan", "--config", str(config), "--manifests", str(PACKAGES),
                 "--payload", str(deleted)]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["targets"] == []


# -- ImageRepositories and their ImagePolicies ------------------------------------------------

IMAGE = "gitea.example.com/platform/app"
IMAGE_API = "image.toolkit.fluxcd.io/v1"


def _image_repo(name: str = "app", image: str = IMAGE, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": IMAGE_API, "kind": "ImageRepository",
            "metadata": {"name": name, "namespace": "flux-system"},
            "spec": {"image": image, "interval": "5m", **spec}}


def _image_policy(policy: dict[str, Any], latest: str = "", name: str = "app",
                  namespace: str = "flux-system", repo: dict[str, str] | None = None,
                  **spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": IMAGE_API, "kind": "ImagePolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"imageRepositoryRef": repo or {"name": "app"}, "policy": policy, **spec}}
    if latest:
        doc["status"] = {"latestRef": {"name": IMAGE, "tag": latest}}
    return doc


def _image_plan(version: str, *objects: dict[str, Any], action: str = "created",
                package_type: str = "container") -> dict[str, Any]:
    """Plan a push of platform/app:<version> for a Receiver listing ImageRepository `app` and
    ImagePolicy `app` (and the OCIRepository `other`, so a Git-routed kind is listed too)."""
    store = ObjectStore(url_normaliser(make_settings(host_aliases=ALIASES)))
    receiver = {"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
                "metadata": {"name": "images", "namespace": "flux-system"},
                "spec": {"type": "github", "secretRef": {"name": "t"}, "resources": [
                    {"kind": "ImageRepository", "name": "app"},
                    {"apiVersion": IMAGE_API, "kind": "ImagePolicy", "name": "app"}]}}
    MemoryCluster(store).load([receiver, *objects])
    found = store.get(ObjectKey("Receiver", "flux-system", "images"))
    assert found is not None
    doc = _doc(name="app", version=version, action=action, type=package_type)
    return plan_package(found, parse_gitea_package(doc), store).as_dict(store)


def _reasons(plan: dict[str, Any], part: str = "skipped") -> dict[str, str]:
    return {f"{t['kind']}/{t['namespace']}/{t['name']}": t["reason"] for t in plan.get(part, [])}


SEMVER_1 = {"semver": {"range": ">=1.0.0"}}


def test_an_image_repository_is_routed_when_its_policy_takes_the_tag() -> None:
    plan = _image_plan("v1.4.0", _image_repo(), _image_policy(SEMVER_1, "v1.3.0"))
    assert _names(plan["targets"]) == ["ImageRepository/app", "ImagePolicy/app"]
    assert _reasons(plan, "targets") == {
        "ImageRepository/flux-system/app": f"image {IMAGE}: ImagePolicy/flux-system/app "
                                           "(semver >=1.0.0 (above the current v1.3.0)) takes "
                                           "v1.4.0",
        "ImagePolicy/flux-system/app": "its ImageRepository/flux-system/app scans v1.4.0, and "
                                       "it takes it: semver >=1.0.0 (above the current v1.3.0)",
    }
    # Routed, not annotated blindly; and not followed for commit statuses.
    assert "annotate_only" not in plan and plan["tracked"] == []


def test_a_tag_below_what_the_policy_holds_reconciles_nothing_and_says_why() -> None:
    plan = _image_plan("v1.2.0", _image_repo(), _image_policy(SEMVER_1, "v1.3.0"))
    assert plan["targets"] == []
    assert _reasons(plan) == {
        "ImageRepository/flux-system/app": f"image {IMAGE}, but no ImagePolicy that references "
                                           "it takes v1.2.0",
        "ImagePolicy/flux-system/app": "does not take v1.2.0: semver >=1.0.0 (holding v1.3.0, "
                                       "above the pushed v1.2.0)",
    }


@pytest.mark.parametrize(("policy", "latest", "version", "taken"), [
    ({"alphabetical": {}}, "2024-01-02", "2024-01-03", True),
    ({"alphabetical": {"order": "asc"}}, "2024-01-02", "2024-01-01", False),
    ({"alphabetical": {"order": "desc"}}, "b", "a", True),
    ({"numerical": {}}, "9", "10", True),
    ({"numerical": {"order": "asc"}}, "10", "9", False),
    ({"numerical": {"order": "desc"}}, "10", "9", True),
    ({"numerical": {}}, "", "latest", False),
    (SEMVER_1, "", "v1.0.0", True),
    (SEMVER_1, "", "v0.9.0", False),
])
def test_each_policy_kind(policy: dict[str, Any], latest: str, version: str,
                          taken: bool) -> None:
    plan = _image_plan(version, _image_repo(), _image_policy(policy, latest))
    assert (_names(plan["targets"]) == ["ImageRepository/app", "ImagePolicy/app"]) is taken


def test_filter_tags_and_extract_rank_the_extracted_value() -> None:
    policy = _image_policy({"numerical": {}}, "main-0a1b-1600", filterTags={
        "pattern": r"^main-[a-f0-9]+-(?P<ts>[0-9]+)$", "extract": "$ts"})
    assert _names(_image_plan("main-9f8e-1700", _image_repo(), policy)["targets"]) == [
        "ImageRepository/app", "ImagePolicy/app"]
    plan = _image_plan("feature-9f8e-1800", _image_repo(), policy)
    assert plan["targets"] == []
    assert _reasons(plan)["ImagePolicy/flux-system/app"] == (
        "does not take feature-9f8e-1800: filterTags pattern '^main-[a-f0-9]+-(?P<ts>[0-9]+)$' "
        "does not match feature-9f8e-1800")


def test_a_pattern_go_refuses_is_assumed_to_take_the_tag() -> None:
    policy = _image_policy({"alphabetical": {}}, filterTags={"pattern": r"^(?=\d)\d+$"})
    plan = _image_plan("123", _image_repo(), policy)
    assert _names(plan["targets"]) == ["ImageRepository/app", "ImagePolicy/app"]
    reason = plan["targets"][1]["reason"]
    assert "is not a valid Go regexp" in reason and "assumed to take 123" in reason


def test_a_posix_class_is_read_as_go_reads_it() -> None:
    policy = _image_policy({"alphabetical": {}}, filterTags={"pattern": r"^[[:digit:]]+$"})
    assert _names(_image_plan("123", _image_repo(), policy)["targets"]) == [
        "ImageRepository/app", "ImagePolicy/app"]
    assert _image_plan("v123", _image_repo(), policy)["targets"] == []


def test_the_exclusion_list_drops_the_tag_from_the_scan() -> None:
    policy = _image_policy({"alphabetical": {}})
    plan = _image_plan("dev-1", _image_repo(exclusionList=["^dev-"]), policy)
    assert plan["targets"] == []
    assert _reasons(plan)["ImageRepository/flux-system/app"] == (
        "its exclusionList pattern '^dev-' drops dev-1 from the scan")
    # Unset, the CRD's default leaves out cosign signatures.
    plan = _image_plan("sha256-abc.sig", _image_repo(), policy)
    assert "'^.*\\\\.sig$' drops sha256-abc.sig" in _reasons(plan)[
        "ImageRepository/flux-system/app"]


def test_an_image_repository_no_policy_references_is_skipped() -> None:
    plan = _image_plan("v1.0.0", _image_repo())
    assert plan["targets"] == []
    skipped = _reasons(plan)
    assert skipped["ImageRepository/flux-system/app"] == (
        f"image {IMAGE}, but no ImagePolicy references it: nothing would read the scan")
    assert skipped["ImagePolicy/flux-system/app"] == (
        "ImagePolicy is not in the cache (not found, or its CRD is not installed): not "
        "annotated for a package")


def test_a_deleted_version_reconciles_no_image_repository() -> None:
    plan = _image_plan("v1.4.0", _image_repo(), _image_policy(SEMVER_1), action="deleted")
    assert plan["targets"] == [] and "deleted versions are not reconciled" in plan["note"]
    assert {t["kind"] for t in plan["skipped"]} == {"ImageRepository", "ImagePolicy"}


def test_host_aliases_apply_to_the_image() -> None:
    aliased = _image_repo(image="gitea-http.gitea.svc.cluster.local:3000/Platform/App")
    plan = _image_plan("v1.4.0", aliased, _image_policy(SEMVER_1))
    assert _names(plan["targets"]) == ["ImageRepository/app", "ImagePolicy/app"]
    plan = _image_plan("v1.4.0", _image_repo(image="gitea.example.com/platform/other"),
                       _image_policy(SEMVER_1))
    assert plan["targets"] == []
    assert _reasons(plan)["ImageRepository/flux-system/app"] == f"its image is not {IMAGE}"


def test_suspended_digest_pushes_and_other_package_types() -> None:
    policy = _image_policy(SEMVER_1)
    assert _reasons(_image_plan("v1.4.0", _image_repo(suspend=True), policy))[
        "ImageRepository/flux-system/app"] == "suspended"
    plan = _image_plan("v1.4.0", _image_repo(), _image_policy(SEMVER_1, suspend=True))
    assert plan["targets"] == [] and _reasons(plan)["ImagePolicy/flux-system/app"] == "suspended"
    assert _reasons(_image_plan("sha256:" + "3" * 64, _image_repo(), policy))[
        "ImageRepository/flux-system/app"] == "pushed by digest, which moves no tag"
    plan = _image_plan("1.4.0", _image_repo(), policy, package_type="helm")
    assert _reasons(plan)["ImageRepository/flux-system/app"] == (
        "a ImageRepository does not read helm packages")


def test_any_policy_that_takes_it_routes_the_repository_and_each_is_explained() -> None:
    other_ns = _image_policy({"numerical": {}}, "5", name="ops", namespace="ops",
                             repo={"name": "app", "namespace": "flux-system"})
    plan = _image_plan("v1.4.0", _image_repo(), _image_policy(SEMVER_1, "v2.0.0"), other_ns)
    # Only the listed ImagePolicy would be annotated, and it does not take the tag.
    assert plan["targets"] == []
    plan = _image_plan("7", _image_repo(), _image_policy(SEMVER_1, "v2.0.0"), other_ns)
    assert _names(plan["targets"]) == ["ImageRepository/app"]
    assert plan["targets"][0]["reason"] == (
        f"image {IMAGE}: ImagePolicy/ops/ops (numerical asc (at or past the current 5)) takes 7")
    assert _reasons(plan)["ImagePolicy/flux-system/app"].startswith("does not take 7:")
    both = _image_plan("v2.1.0", _image_repo(), _image_policy(SEMVER_1, "v2.0.0"),
                       _image_policy({"alphabetical": {}}, "v1", name="ops", namespace="ops",
                                     repo={"name": "app", "namespace": "flux-system"}))
    assert _names(both["targets"]) == ["ImageRepository/app", "ImagePolicy/app"]
    assert both["targets"][0]["reason"].endswith(") and 1 more take v2.1.0")


def test_the_store_indexes_images_and_policies_and_forgets_them() -> None:
    store = ObjectStore(url_normaliser(make_settings(host_aliases=ALIASES)))
    repo = store.upsert(_image_repo())
    store.upsert(_image_policy(SEMVER_1))
    key = "gitea.example.com/platform/app"
    assert store.image_repositories_for_url(key) == [repo]
    assert [p.name for p in store.image_policies_for(repo.key)] == ["app"]
    store.upsert(_image_repo(image="gitea.example.com/platform/moved"))
    assert store.image_repositories_for_url(key) == []
    store.upsert(_image_policy(SEMVER_1, repo={"name": "elsewhere"}))
    assert store.image_policies_for(repo.key) == []
    store.delete(repo.key)
    assert store.image_repositories_for_url("gitea.example.com/platform/moved") == []


@pytest.mark.anyio
async def test_an_image_delivery_is_followed_until_the_reflector_handled_it(
    bridge_factory: BridgeFactory, tmp_path: Path,
) -> None:
    receiver = {"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
                "metadata": {"name": "images", "namespace": "flux-system"},
                "spec": {"type": "github", "events": ["package"],
                         "secretRef": {"name": "registry-token"}, "resources": [
                             {"kind": "ImageRepository", "name": "app"},
                             {"apiVersion": IMAGE_API, "kind": "ImagePolicy", "name": "app"}]}}
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": "registry-token", "namespace": "flux-system"},
              "stringData": {"token": TOKEN}}
    docs = [receiver, secret, _image_repo(), _image_policy(SEMVER_1, "v1.3.0")]
    (tmp_path / "images.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs))
    bridge = await bridge_factory(make_settings(host_aliases=ALIASES), tmp_path)
    doc = await send_package_event(bridge, "images", TOKEN,
                                   json.dumps(_doc(name="app", version="v1.4.0")).encode())
    assert _names(doc["targets"]) == ["ImageRepository/app", "ImagePolicy/app"]
    assert doc["tracked"] == [] and "annotate_only" not in doc

    def annotated(kind: str) -> Any:
        obj = bridge.cluster.store.get(ObjectKey(kind, "flux-system", "app"))
        return obj if obj is not None and RECONCILE_ANNOTATION in obj.annotations else None

    # image-reflector-controller handles the request: scanned, and the policy re-evaluated.
    for kind in ("ImageRepository", "ImagePolicy"):
        obj = await until(lambda k=kind: annotated(k), what=f"{kind} annotated")
        raw = json.loads(json.dumps(obj.raw))
        raw["status"] = {**raw.get("status", {}), "conditions": [
            {"type": "Ready", "status": "True", "reason": "Succeeded", "message": "done"}],
            "lastHandledReconcileAt": obj.annotations[RECONCILE_ANNOTATION]}
        bridge.cluster.apply(raw)

    view = await settled_delivery(bridge, doc["delivery"], TOKEN)
    assert {t["kind"]: t["state"] for t in view["targets"]} == {
        "ImageRepository": "ready", "ImagePolicy": "ready"}, view


@pytest.mark.anyio
async def test_a_receiver_without_spec_events_routes_a_package_event(
    bridge_factory: BridgeFactory, tmp_path: Path,
) -> None:
    # An empty spec.events takes every event, as Flux's does; the bridge routes a package
    # precisely instead of answering `ignored`.
    receiver = {"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
                "metadata": {"name": "images", "namespace": "flux-system"},
                "spec": {"type": "github", "secretRef": {"name": "registry-token"},
                         "resources": [{"kind": "ImageRepository", "name": "app"},
                                       {"apiVersion": IMAGE_API, "kind": "ImagePolicy",
                                        "name": "app"}]}}
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": "registry-token", "namespace": "flux-system"},
              "stringData": {"token": TOKEN}}
    docs = [receiver, secret, _image_repo(), _image_policy(SEMVER_1, "v1.3.0")]
    (tmp_path / "images.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs))
    bridge = await bridge_factory(make_settings(host_aliases=ALIASES), tmp_path)
    doc = await send_package_event(bridge, "images", TOKEN,
                                   json.dumps(_doc(name="app", version="v1.4.0")).encode())
    assert _names(doc["targets"]) == ["ImageRepository/app", "ImagePolicy/app"]
    for kind in ("ImageRepository", "ImagePolicy"):
        await until(lambda k=kind: _requested(bridge, k), what=f"{kind} annotated")
    # A version no policy takes annotates nothing.
    patches = len(bridge.cluster.patches)
    doc = await send_package_event(bridge, "images", TOKEN,
                                   json.dumps(_doc(name="app", version="v0.1.0")).encode())
    assert doc["targets"] == []
    assert len(bridge.cluster.patches) == patches


def _requested(bridge: Any, kind: str) -> bool:
    obj = bridge.cluster.store.get(ObjectKey(kind, "flux-system", "app"))
    return obj is not None and RECONCILE_ANNOTATION in obj.annotations
