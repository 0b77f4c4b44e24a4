"""Gitea `package` events to Helm charts: HelmRepositories (`oci` over Gitea's container
registry, or Gitea's HTTP Helm repository), their HelmCharts by chart name and version range,
then the HelmReleases installing from those charts; the store's indexes; the service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from receiver.delivery.state import awaited_source
from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import (
    INPUT_PROVIDER_KIND,
    OPTIONAL_KINDS,
    RECONCILE_ANNOTATION,
    ObjectKey,
    helm_chart_of,
)
from receiver.flux.store import ObjectStore
from receiver.gitea.package_payloads import parse_gitea_package
from receiver.push.package_routing import PACKAGE_FED_KINDS, plan_package
from receiver.web.app import url_normaliser
from tests.conftest import (
    FIXTURES,
    Bridge,
    BridgeFactory,
    make_settings,
    send_package_event,
    settled_delivery,
    until,
)

PAYLOAD = FIXTURES / "payloads" / "gitea-package-container.json"
TOKEN = "registry-secret-token"
ALIASES = {"gitea-http.gitea.svc.cluster.local:3000": "gitea.example.com"}
SOURCE_API = "source.toolkit.fluxcd.io/v1"
HELM_API = "helm.toolkit.fluxcd.io/v2"
NS = "flux-system"
# The HelmChart helm-controller generates for HelmRelease flux-system/web.
GENERATED = "flux-system-web"


def _repo(name: str = "charts", url: str = "oci://gitea.example.com/platform",
          repo_type: str | None = "oci", **spec: Any) -> dict[str, Any]:
    doc_spec: dict[str, Any] = {"url": url, "interval": "5m", **spec}
    if repo_type is not None:
        doc_spec["type"] = repo_type
    return {"apiVersion": SOURCE_API, "kind": "HelmRepository",
            "metadata": {"name": name, "namespace": NS}, "spec": doc_spec}


def _chart(name: str = GENERATED, chart: str = "web", version: str | None = None,
           held: str = "", repo: str = "charts", **spec: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": SOURCE_API, "kind": "HelmChart", "metadata": {"name": name, "namespace": NS},
        "spec": {"chart": chart, "sourceRef": {"kind": "HelmRepository", "name": repo},
                 "interval": "5m", **spec}}
    if version is not None:
        doc["spec"]["version"] = version
    if held:
        doc["status"] = {"artifact": {"revision": held}}
    return doc


def _release(name: str = "web", namespace: str = NS, **spec: Any) -> dict[str, Any]:
    spec = spec or {"chart": {"spec": {"chart": "web", "version": "*",
                                       "sourceRef": {"kind": "HelmRepository", "name": "charts",
                                                     "namespace": NS}}}}
    return {"apiVersion": HELM_API, "kind": "HelmRelease",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"interval": "5m", **spec}}


def _receiver(*resources: tuple[str, str]) -> dict[str, Any]:
    listed = resources or (("HelmRepository", "charts"), ("HelmChart", GENERATED),
                           ("HelmRelease", "web"))
    entries = [{"apiVersion": HELM_API, "kind": k, "name": n} if k == "HelmRelease" else
               {"kind": k, "name": n} for k, n in listed]
    return {"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
            "metadata": {"name": "registry", "namespace": NS},
            "spec": {"type": "github", "events": ["package"],
                     "secretRef": {"name": "registry-token"}, "resources": entries}}


def _event(name: str = "web", version: str = "1.4.0", *, action: str = "created",
           package_type: str = "container", owner: str = "platform") -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(PAYLOAD.read_text())
    doc["action"] = action
    doc["package"].update(name=name, version=version, type=package_type)
    doc["package"]["owner"]["login"] = owner
    return doc


def _store(*objects: dict[str, Any]) -> ObjectStore:
    store = ObjectStore(url_normaliser(make_settings(host_aliases=ALIASES)))
    MemoryCluster(store).load(objects)
    return store


def _plan(event: dict[str, Any], *objects: dict[str, Any],
          receiver: dict[str, Any] | None = None) -> dict[str, Any]:
    store = _store(receiver or _receiver(), *objects)
    found = store.get(ObjectKey("Receiver", NS, "registry"))
    assert found is not None
    return plan_package(found, parse_gitea_package(event), store).as_dict(store)


def _names(plan: dict[str, Any], part: str = "targets") -> list[str]:
    return [f"{t['kind']}/{t['name']}" for t in plan.get(part, [])]


def _reasons(plan: dict[str, Any], part: str = "skipped") -> dict[str, str]:
    return {f"{t['kind']}/{t['name']}": t["reason"] for t in plan.get(part, [])}


ALL = ["HelmRepository/charts", f"HelmChart/{GENERATED}", "HelmRelease/web"]


# -- which HelmChart a HelmRelease installs from ----------------------------------------------


def test_every_cached_optional_kind_says_which_package_types_feed_it() -> None:
    # ResourceSetInputProviders are cached for Git events, never fed by a package.
    assert set(PACKAGE_FED_KINDS) == set(OPTIONAL_KINDS) - {INPUT_PROVIDER_KIND}


def test_a_helm_release_installs_from_the_generated_chart_or_its_chart_ref() -> None:
    store = _store()
    generated = store.upsert(_release())
    assert helm_chart_of(generated) == ObjectKey("HelmChart", NS, GENERATED)
    # Generated in the namespace of the HelmRepository it names, still named after the release.
    elsewhere = store.upsert(_release("api", "apps", chart={"spec": {
        "chart": "api", "sourceRef": {"kind": "HelmRepository", "name": "charts",
                                      "namespace": NS}}}))
    assert helm_chart_of(elsewhere) == ObjectKey("HelmChart", NS, "apps-api")
    local = store.upsert(_release("db", "apps", chart={"spec": {
        "chart": "db", "sourceRef": {"kind": "HelmRepository", "name": "charts"}}}))
    assert helm_chart_of(local) == ObjectKey("HelmChart", "apps", "apps-db")
    ref = store.upsert(_release("ref", chartRef={"kind": "HelmChart", "name": "shared"}))
    assert helm_chart_of(ref) == ObjectKey("HelmChart", NS, "shared")
    oci = store.upsert(_release("oci", chartRef={"kind": "OCIRepository", "name": "x"}))
    assert helm_chart_of(oci) is None


def test_the_store_indexes_helm_kinds_and_forgets_them() -> None:
    store = _store(_repo(url="oci://gitea-http.gitea.svc.cluster.local:3000/Platform/"),
                   _chart(), _release())
    repo_key = ObjectKey("HelmRepository", NS, "charts")
    chart_key = ObjectKey("HelmChart", NS, GENERATED)
    assert [r.name for r in store.helm_repositories_for_url("gitea.example.com/platform")] == [
        "charts"]
    assert [c.name for c in store.helm_charts_for(repo_key, "WEB")] == [GENERATED]
    assert store.helm_charts_for(repo_key, "other") == []
    assert [r.name for r in store.helm_releases_for(chart_key)] == ["web"]
    store.upsert(_chart(chart="moved"))
    assert store.helm_charts_for(repo_key, "web") == []
    store.upsert(_repo(url="oci://gitea.example.com/elsewhere"))
    assert store.helm_repositories_for_url("gitea.example.com/platform") == []
    for key in (repo_key, chart_key, ObjectKey("HelmRelease", NS, "web")):
        store.delete(key)
    assert store.helm_repositories_for_url("gitea.example.com/elsewhere") == []
    assert store.helm_charts_for(repo_key, "moved") == []
    assert store.helm_releases_for(chart_key) == []


# -- a container push of a chart (Helm over OCI) ----------------------------------------------


def test_a_chart_push_reconciles_repository_chart_then_release() -> None:
    plan = _plan(_event(), _repo(), _chart(version=">=1.0.0 <2.0.0", held="1.3.0"), _release())
    assert _names(plan) == ALL
    assert _reasons(plan, "targets") == {
        "HelmRepository/charts": "registry oci://gitea.example.com/platform: "
                                 f"HelmChart/{NS}/{GENERATED} (chart web) takes 1.4.0",
        f"HelmChart/{GENERATED}": f"chart web from HelmRepository/{NS}/charts: chart version "
                                  ">=1.0.0 <2.0.0 (above the current 1.3.0) takes 1.4.0",
        "HelmRelease/web": f"its source HelmChart/{NS}/{GENERATED} takes 1.4.0",
    }
    # Routed, not annotated blindly; a HelmRelease names no commit to follow.
    assert "annotate_only" not in plan and plan["tracked"] == []
    assert plan["skipped"] == []


def test_the_host_alias_and_case_apply_to_the_repository_url() -> None:
    aliased = _repo(url="oci://gitea-http.gitea.svc.cluster.local:3000/Platform/")
    assert _names(_plan(_event(), aliased, _chart(chart="Web"), _release())) == ALL


def test_another_owner_feeds_nothing() -> None:
    plan = _plan(_event(owner="team"), _repo(), _chart(), _release())
    assert plan["targets"] == []
    assert _reasons(plan) == {
        "HelmRepository/charts": "its URL and HelmCharts do not name "
                                 "oci://gitea.example.com/team/web",
        f"HelmChart/{GENERATED}": "its chart web is not fed by the package",
        "HelmRelease/web": "its source is not fed by the package",
    }


def test_a_nested_package_name_is_split_between_url_and_chart() -> None:
    nested = _repo(url="oci://gitea.example.com/platform/charts")
    assert _names(_plan(_event(name="charts/web"), nested, _chart(), _release())) == ALL
    # Or the whole name is the chart, under the owner's URL.
    assert _names(_plan(_event(name="charts/web"), _repo(), _chart(chart="charts/web"),
                        _release())) == ALL


def test_a_range_that_excludes_the_version_feeds_nothing_and_says_why() -> None:
    plan = _plan(_event(version="2.0.0"), _repo(), _chart(version="~1.4"), _release())
    assert plan["targets"] == []
    assert _reasons(plan) == {
        "HelmRepository/charts": "registry oci://gitea.example.com/platform, but no HelmChart "
                                 "of chart web from it takes 2.0.0",
        f"HelmChart/{GENERATED}": "chart version ~1.4 does not take 2.0.0",
        "HelmRelease/web": f"chart version ~1.4 does not take 2.0.0 (its source "
                           f"HelmChart/{NS}/{GENERATED})",
    }


def test_a_version_below_the_one_the_chart_holds_is_not_taken() -> None:
    plan = _plan(_event(version="1.4.1"), _repo(), _chart(version="1.x", held="1.5.0"),
                 _release())
    assert plan["targets"] == []
    assert _reasons(plan)[f"HelmChart/{GENERATED}"] == (
        "chart version 1.x (checking out 1.5.0, above the pushed 1.4.1) does not take 1.4.1")
    # The default range `*` takes any release version, none below what it holds.
    assert _names(_plan(_event(version="1.5.1"), _repo(), _chart(held="1.5.0"),
                        _release())) == ALL


def test_an_underscore_in_the_tag_is_semver_build_metadata() -> None:
    plan = _plan(_event(version="1.5.0_build.7"), _repo(),
                 _chart(version=">=1.5.0", held="1.5.0+build.6"), _release())
    assert _names(plan) == ALL
    assert "above the current 1.5.0+build.6" in _reasons(plan, "targets")[
        f"HelmChart/{GENERATED}"]


def test_a_digest_push_moves_no_chart_version() -> None:
    plan = _plan(_event(version="sha256:" + "3" * 64), _repo(), _chart(), _release())
    assert plan["targets"] == []
    assert _reasons(plan)["HelmRepository/charts"] == "pushed by digest, which moves no tag"


def test_an_http_helm_repository_is_not_fed_by_a_container_push() -> None:
    # Same host and path as the OCI registry URL would be, but read over HTTP.
    http = _repo(url="https://gitea.example.com/platform", repo_type=None)
    plan = _plan(_event(), http, _chart(), _release())
    assert plan["targets"] == []
    assert _reasons(plan)["HelmRepository/charts"] == (
        "a HelmRepository of type default does not read container packages")


def test_a_deleted_version_reconciles_nothing() -> None:
    plan = _plan(_event(action="deleted"), _repo(), _chart(), _release())
    assert plan["targets"] == [] and "deleted versions are not reconciled" in plan["note"]
    assert set(_names(plan, "skipped")) == set(ALL)


def test_suspended_objects_are_skipped_with_the_reason() -> None:
    plan = _plan(_event(), _repo(suspend=True), _chart(), _release())
    assert plan["targets"] == []
    assert _reasons(plan) == {
        "HelmRepository/charts": "suspended",
        f"HelmChart/{GENERATED}": f"its HelmRepository/{NS}/charts is suspended",
        "HelmRelease/web": f"its source HelmChart/{NS}/{GENERATED} is suspended",
    }
    plan = _plan(_event(), _repo(), _chart(suspend=True), _release())
    assert plan["targets"] == [] and _reasons(plan)[f"HelmChart/{GENERATED}"] == "suspended"
    release = _release()
    release["spec"]["suspend"] = True
    plan = _plan(_event(), _repo(), _chart(), release)
    assert _names(plan) == ALL[:2] and _reasons(plan) == {"HelmRelease/web": "suspended"}


def test_a_chart_ref_helm_chart_feeds_its_release() -> None:
    shared = _chart(name="shared")
    release = _release(chartRef={"kind": "HelmChart", "name": "shared"})
    plan = _plan(_event(), _repo(), shared, release,
                 receiver=_receiver(("HelmRepository", "charts"), ("HelmChart", "shared"),
                                    ("HelmRelease", "web")))
    assert _names(plan) == ["HelmRepository/charts", "HelmChart/shared", "HelmRelease/web"]
    assert _reasons(plan, "targets")["HelmRelease/web"] == (
        f"its source HelmChart/{NS}/shared takes 1.4.0")


def test_an_unlisted_chart_still_leads_to_its_listed_release() -> None:
    # The Receiver bounds what is annotated: the generated HelmChart is not listed here.
    plan = _plan(_event(), _repo(), _chart(), _release(),
                 receiver=_receiver(("HelmRepository", "charts"), ("HelmRelease", "web")))
    assert _names(plan) == ["HelmRepository/charts", "HelmRelease/web"]


def test_a_kind_rbac_keeps_out_of_the_cache_is_not_annotated_for_a_package() -> None:
    plan = _plan(_event(), _release())
    assert plan["targets"] == [] and "annotate_only" not in plan
    assert _reasons(plan)["HelmRepository/charts"] == (
        "HelmRepository is not in the cache (not found, or RBAC does not let the bridge list "
        "it): not annotated for a package")


# -- a helm push (Gitea's HTTP Helm repository) ------------------------------------------------

HTTP_REPO = "https://gitea.example.com/api/packages/platform/helm"


def test_a_helm_push_feeds_the_owner_s_http_helm_repository() -> None:
    http = _repo(url="http://gitea-http.gitea.svc.cluster.local:3000/api/packages/Platform/helm",
                 repo_type="default")
    plan = _plan(_event(package_type="helm"), http, _chart(version="^1.0.0"), _release())
    assert _names(plan) == ALL
    assert _reasons(plan, "targets")["HelmRepository/charts"].startswith(f"registry {HTTP_REPO}: ")


def test_a_helm_push_does_not_feed_an_oci_or_another_http_repository() -> None:
    plan = _plan(_event(package_type="helm"), _repo(), _chart(), _release())
    assert plan["targets"] == []
    assert _reasons(plan)["HelmRepository/charts"] == (
        "a HelmRepository of type oci does not read helm packages")
    other = _repo(url="https://gitea.example.com/api/packages/team/helm", repo_type=None)
    plan = _plan(_event(package_type="helm"), other, _chart(), _release())
    assert _reasons(plan)["HelmRepository/charts"] == f"its URL is not {HTTP_REPO}"


# -- the service ------------------------------------------------------------------------------


def test_a_helm_release_waits_for_its_chart_when_the_delivery_annotates_it() -> None:
    release = _store().upsert(_release())
    chart, repo = ObjectKey("HelmChart", NS, GENERATED), ObjectKey("HelmRepository", NS, "charts")
    assert awaited_source(release, {chart, repo}.__contains__) == chart
    assert awaited_source(release, {repo}.__contains__) == repo


class _Service:
    """The bridge with a Receiver listing the HelmRepository, HelmChart and HelmRelease."""

    def __init__(self, bridge: Bridge, delivery: str) -> None:
        self.bridge, self.delivery = bridge, delivery

    @classmethod
    async def push(cls, bridge_factory: BridgeFactory, tmp_path: Path) -> tuple[_Service, Any]:
        secret = {"apiVersion": "v1", "kind": "Secret",
                  "metadata": {"name": "registry-token", "namespace": NS},
                  "stringData": {"token": TOKEN}}
        docs = [_receiver(), secret,
                _repo(url="oci://gitea-http.gitea.svc.cluster.local:3000/platform"),
                _chart(version=">=1.0.0"), _release()]
        (tmp_path / "helm.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs))
        bridge = await bridge_factory(make_settings(host_aliases=ALIASES), tmp_path)
        doc = await send_package_event(bridge, "registry", TOKEN, json.dumps(_event()).encode())
        return cls(bridge, doc["delivery"]), doc

    def patched(self) -> list[str]:
        return [f"{k.kind}/{k.name}" for k, a in self.bridge.cluster.patches
                if RECONCILE_ANNOTATION in a]

    def handled(self, kind: str, name: str, ready: bool = True, released: str = "") -> None:
        """The controller handles our request: Ready (or not), `lastHandledReconcileAt` set;
        a HelmRelease with the chart version it `released`."""
        obj = self.bridge.cluster.store.get(ObjectKey(kind, NS, name))
        assert obj is not None and RECONCILE_ANNOTATION in obj.annotations, (kind, name)
        raw = json.loads(json.dumps(obj.raw))
        raw["status"] = {**raw.get("status", {}), "conditions": [
            {"type": "Ready", "status": "True" if ready else "False",
             "reason": "Succeeded" if ready else "ArtifactFailed", "message": "done"}],
            "lastHandledReconcileAt": obj.annotations[RECONCILE_ANNOTATION]}
        if released:
            raw["status"]["history"] = [{"chartName": "web", "chartVersion": released,
                                         "status": "deployed"}]
            raw["status"]["lastAttemptedRevision"] = released
        self.bridge.cluster.apply(raw)

    async def states(self) -> dict[str, tuple[str, str]]:
        view = await self.bridge.client.get(f"/deliveries/{self.delivery}",
                                            headers={"Authorization": f"Bearer {TOKEN}"})
        return {t["kind"]: (t["state"], t.get("detail", {}).get("reason", ""))
                for t in view.json()["targets"]}

    async def settled(self) -> dict[str, tuple[str, str]]:
        """Each target's (state, reason) once the delivery settles."""
        view = await settled_delivery(self.bridge, self.delivery, TOKEN)
        return {t["kind"]: (t["state"], t.get("detail", {}).get("reason", ""))
                for t in view["targets"]}


@pytest.mark.anyio
async def test_a_signed_chart_push_annotates_repository_then_chart_then_release(
    bridge_factory: BridgeFactory, tmp_path: Path,
) -> None:
    service, doc = await _Service.push(bridge_factory, tmp_path)
    assert _names(doc) == ALL and "annotate_only" not in doc
    # `--with-source` order: the HelmRepository and HelmChart first; the HelmRelease once the
    # HelmChart it installs from has handled the request (what it waits for: its HelmRepository
    # is still busy here).
    await until(lambda: service.patched() == ALL[:2],
                what="HelmRepository, then HelmChart annotated")
    assert (await service.states())["HelmRelease"][0] == "queued"
    service.handled("HelmChart", GENERATED)
    await until(lambda: service.patched() == ALL,
                what="the HelmRelease annotated after its HelmChart")
    # Handling the request at the old chart version is not the push deployed.
    service.handled("HelmRelease", "web", released="1.3.0")
    assert (await service.states())["HelmRelease"][0] != "ready"
    # A HelmRepository of type oci is never reconciled: it is ready as it is.
    service.handled("HelmRelease", "web", released="1.4.0")  # the pushed version
    states = await service.settled()
    assert {kind: state for kind, (state, _) in states.items()} == dict.fromkeys(
        ("HelmRepository", "HelmChart", "HelmRelease"), "ready")


@pytest.mark.anyio
async def test_a_release_whose_chart_fails_is_not_annotated_and_fails_with_it(
    bridge_factory: BridgeFactory, tmp_path: Path,
) -> None:
    service, _ = await _Service.push(bridge_factory, tmp_path)
    await until(lambda: service.patched() == ALL[:2], what="HelmRepository and HelmChart")
    service.handled("HelmChart", GENERATED, ready=False)
    states = await service.settled()
    assert states["HelmRelease"] == ("failed", "SourceFailed")
    assert service.patched() == ALL[:2]
