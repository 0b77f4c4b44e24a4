"""Issue 13, end to end with every component real: a Flux OCI artifact pushed to Gitea's own
package registry -> Gitea's `package` webhook -> bridge -> source-controller pulls it from Gitea
-> kustomize-controller applies it.

One environment serves the module: etcd + kube-apiserver (`tests.realk8s`), Gitea with SQLite
and its container registry on the same loopback port (`ROOT_URL` is that address, so the
registry's token realm is too), source-, kustomize- and notification-controller and the bridge
(`tests.e2e_harness`). Gitea holds `platform/fleet`, whose commits the artifacts are built from;
the tests push artifacts as `flux push artifact` does (`tests.oci_client`: Flux's media types,
`org.opencontainers.image.source` = the repository's clone URL and
`org.opencontainers.image.revision` = `main@sha1:<commit>`) to `platform/apps`.

The OCIRepository `apps` reads `oci://127.0.0.1:<gitea>/platform/apps` over plain HTTP
(`insecure: true`, anonymous pull: `platform` is a public organisation) and takes tags in
`SEMVER`; the Kustomization `apps` applies its ConfigMap. Intervals are 1h, so once the first
artifact is in, only the bridge's annotation makes the source look at the registry again. A
github-type Receiver with `events: [package]` lists both; its hook URL on the bridge is
`platform`'s organisation webhook for `package` events (Gitea sends those to the package owner's
webhooks, not to a repository's). A generic-hmac Provider and an Alert send the OCIRepository's
and Kustomization's events to the bridge's /events.

Each test pushes versions of its own (a counter), so they pass in any order and alone.

    python -m pytest tests/test_e2e_oci.py -q -s     (-s shows the timings)
"""

from __future__ import annotations

import functools
import itertools
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from receiver import signatures as sig
from receiver.delivery_marks import DELIVERIES_ANNOTATION
from tests.e2e_harness import (
    BridgeProcess,
    FluxControllers,
    Gitea,
    e2e_peers,
    install_source_crds,
    metric_value,
)
from tests.oci_client import REVISION_ANNOTATION, SOURCE_ANNOTATION, OCIClient, Pushed
from tests.realk8s import ControlPlane, ControlPlaneError, wait_until

pytestmark = pytest.mark.e2e

T = TypeVar("T")

ORG, REPO, IMAGE = "platform", "fleet", "apps"
CLUSTER = "eu-west"
NS, APPS_NS = "flux-system", "apps"
SEMVER = ">=1.0.0 <2.0.0"
RECONCILE = "reconcile.fluxcd.io/requestedAt"

SOURCE_API = "/apis/source.toolkit.fluxcd.io/v1"
NOTIFICATION_API = "/apis/notification.toolkit.fluxcd.io"
PLURALS = {"OCIRepository": f"{SOURCE_API}/namespaces/{NS}/ocirepositories",
           "Kustomization": f"/apis/kustomize.toolkit.fluxcd.io/v1/namespaces/{NS}/kustomizations",
           "Receiver": f"{NOTIFICATION_API}/v1/namespaces/{NS}/receivers",
           "Provider": f"{NOTIFICATION_API}/v1beta3/namespaces/{NS}/providers",
           "Alert": f"{NOTIFICATION_API}/v1beta3/namespaces/{NS}/alerts"}
API_VERSIONS = {"OCIRepository": "source.toolkit.fluxcd.io/v1",
                "Kustomization": "kustomize.toolkit.fluxcd.io/v1",
                "Receiver": "notification.toolkit.fluxcd.io/v1",
                "Provider": "notification.toolkit.fluxcd.io/v1beta3",
                "Alert": "notification.toolkit.fluxcd.io/v1beta3"}

DEPLOY_TIMEOUT = 90.0  # package push -> Kustomization Ready at it (usually a few seconds)
HOOK_TIMEOUT = 30.0


def configmap(release: str) -> str:
    return (f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: apps-settings\n"
            f"  namespace: {APPS_NS}\ndata:\n  release: \"{release}\"\n")


# -- the environment ---------------------------------------------------------------------------------


@dataclass
class Env:
    plane: ControlPlane
    gitea: Gitea
    flux: FluxControllers
    bridge: BridgeProcess
    registry: OCIClient
    webhook_token: str
    timings: dict[str, float] = field(default_factory=dict)
    minor: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    # -- Kubernetes ----------------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return self.plane.request("GET", f"{PLURALS[kind]}/{name}")

    def create(self, kind: str, name: str, spec: dict[str, Any]) -> None:
        self.plane.request("POST", PLURALS[kind], {
            "apiVersion": API_VERSIONS[kind], "kind": kind,
            "metadata": {"name": name, "namespace": NS}, "spec": spec})

    def secret(self, name: str, data: dict[str, str]) -> None:
        self.plane.request("POST", f"/api/v1/namespaces/{NS}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "stringData": data})

    def annotations(self, kind: str, name: str) -> dict[str, str]:
        return dict(self.get(kind, name)["metadata"].get("annotations") or {})

    def artifact(self) -> dict[str, Any]:
        return dict((self.get("OCIRepository", IMAGE).get("status") or {}).get("artifact") or {})

    def configmap_data(self) -> dict[str, str]:
        found = self.plane.request(
            "GET", f"/api/v1/namespaces/{APPS_NS}/configmaps/apps-settings", ok=(200, 404))
        return dict(found.get("data") or {})

    def deployed(self, pushed: Pushed) -> dict[str, Any] | None:
        """The Kustomization if it is Ready with this artifact applied, else None."""
        ks = self.get("Kustomization", IMAGE)
        status = ks.get("status") or {}
        if (status.get("lastAppliedRevision") == revision(pushed)
                and _condition(ks, "Ready").get("status") == "True"):
            return ks
        return None

    # -- Gitea and its registry ----------------------------------------------------------------------

    def commit(self, release: str) -> str:
        """A commit in platform/fleet: the ConfigMap the next artifact is built from."""
        return self.gitea.commit_files(ORG, REPO, {"apps/settings.yaml": configmap(release)},
                                       f"apps: release {release}")

    def push_artifact(self, tag: str, sha: str, release: str) -> Pushed:
        """`flux push artifact oci://<gitea>/platform/apps:<tag> --path=apps
        --source=<clone url> --revision=main@sha1:<sha>`."""
        started = time.monotonic()
        pushed = self.registry.push_flux_artifact(
            f"{ORG}/{IMAGE}", tag, {"settings.yaml": configmap(release)},
            source=self.gitea.clone_url(ORG, REPO), revision=f"main@sha1:{sha}")
        print(f"  pushed {IMAGE}:{tag} ({pushed.digest[:19]}, commit {sha[:12]}) in "
              f"{time.monotonic() - started:.2f}s")
        return pushed

    # -- the bridge ----------------------------------------------------------------------------------

    def package_deliveries(self) -> list[dict[str, Any]]:
        """The bridge's "push accepted" records of the package Receiver (only Gitea's package
        events reach it), oldest first."""
        return [r for r in self.bridge.records("push accepted")
                if r.get("receiver") == f"{NS}/gitea-packages"]

    def delivery(self, delivery_id: str) -> dict[str, Any]:
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            response = client.get(f"{self.bridge.url}/deliveries/{delivery_id}",
                                  headers={"Authorization": f"Bearer {self.webhook_token}"})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.bridge.metrics(), name, labels)

    # -- waiting -------------------------------------------------------------------------------------

    def wait(self, what: str, check: Callable[[], T | None], timeout: float,
             extra: Callable[[], str] | None = None) -> T:
        def diagnostics() -> str:
            parts = [extra()] if extra is not None else []
            parts += [self.bridge.tail(30), self.flux.logs(15), self.gitea.tail(15)]
            return "\n".join(parts)

        started = time.monotonic()
        try:
            result = wait_until(what, check, timeout, interval=0.2, on_timeout=diagnostics)
        except ControlPlaneError as exc:
            raise AssertionError(str(exc)) from None
        print(f"  {what}: {time.monotonic() - started:.1f}s")
        return result

    def next_delivery(self, seen: int) -> dict[str, Any]:
        """The package delivery after the first `seen` ones, once the bridge has logged it."""
        return self.wait("the package webhook to reach the bridge", lambda: (
            found[seen] if len(found := self.package_deliveries()) > seen else None),
            HOOK_TIMEOUT)


def revision(pushed: Pushed) -> str:
    """source-controller's `status.artifact.revision` for a tag: `<tag>@sha256:<hex>`."""
    return f"{pushed.tag}@{pushed.digest}"


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def _timed(timings: dict[str, float], name: str, started: float) -> None:
    timings[name] = time.monotonic() - started


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    module_started = time.monotonic()
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("e2e-oci")
    bin_dir, static_root = e2e_peers()
    assert static_root is not None

    teardown: list[Callable[[], None]] = []
    try:
        started = time.monotonic()
        plane = ControlPlane(bin_dir)
        plane.start()
        teardown.append(plane.stop)
        install_source_crds(plane)
        plane.ensure_namespace(NS, APPS_NS)
        _timed(timings, "control plane (etcd, kube-apiserver, CRDs)", started)

        started = time.monotonic()
        gitea = Gitea(bin_dir / "gitea", static_root, workdir=workdir / "gitea")
        gitea.workdir.mkdir()
        gitea.start()
        teardown.append(gitea.close)
        gitea.create_org(ORG)
        gitea.create_repo(ORG, REPO, private=True)
        _timed(timings, "gitea (migrate, admin, web, repository)", started)

        started = time.monotonic()
        flux = FluxControllers(bin_dir, plane.kubeconfig, workdir=workdir / "flux")
        flux.workdir.mkdir()
        flux.start()
        teardown.append(flux.stop)
        _timed(timings, "flux controllers", started)

        tokens = {name: secrets.token_hex(16) for name in ("webhook", "events")}
        for name, value in {"gitea-token": gitea.token, "events-token": tokens["events"]}.items():
            (workdir / name).write_text(value)
            (workdir / name).chmod(0o600)
        started = time.monotonic()
        bridge = BridgeProcess({
            "cluster_name": CLUSTER,
            "log_level": "info",
            "reconcile": {"source_timeout_seconds": 120, "consumer_timeout_seconds": 240,
                          "coalesce_window_seconds": 0.2},
            "gitea": [{"name": "e2e", "url": gitea.url,
                       "token": {"file": str(workdir / "gitea-token")}}],
            "events": {"hmac_token": {"file": str(workdir / "events-token")}},
        }, plane.kubeconfig, workdir)
        bridge.start()
        teardown.append(bridge.stop)
        _timed(timings, "bridge", started)

        registry = OCIClient(gitea.url, gitea.admin, gitea.token)
        env = Env(plane, gitea, flux, bridge, registry, tokens["webhook"], timings)
        started = time.monotonic()
        _first_deploy(env, tokens, workdir)
        _timed(timings, "first artifact deployed (objects -> Kustomization Ready)", started)
        timings["environment total"] = time.monotonic() - module_started
        print("\n=== e2e OCI environment up ===")
        for name, seconds in timings.items():
            print(f"  {name:<58} {seconds:6.1f}s")
        yield env
        print("\n=== e2e OCI timings ===")
        for name, seconds in timings.items():
            print(f"  {name:<58} {seconds:6.1f}s")
        print(f"  module total {time.monotonic() - module_started:.1f}s")
    finally:
        for stop in reversed(teardown):
            try:
                stop()
            except Exception as exc:  # keep tearing down the rest
                print(f"teardown: {exc}")


def _first_deploy(env: Env, tokens: dict[str, str], workdir: Path) -> None:
    """The first artifact (1.0.0), the Flux objects, the Receiver and the organisation webhook;
    waits until the Kustomization applied the artifact."""
    sha = env.commit("1.0.0")
    first = env.push_artifact("1.0.0", sha, "1.0.0")
    env.secret("webhook-token", {"token": tokens["webhook"]})
    env.secret("bridge-events", {"token": tokens["events"]})
    env.create("Provider", "bridge", {"type": "generic-hmac", "address": f"{env.bridge.url}/events",
                                      "secretRef": {"name": "bridge-events"}})
    env.create("Alert", "bridge", {
        "providerRef": {"name": "bridge"}, "eventSeverity": "info",
        "eventSources": [{"kind": "OCIRepository", "name": "*"},
                         {"kind": "Kustomization", "name": "*"}]})
    env.create("OCIRepository", IMAGE, {
        "interval": "1h", "timeout": "60s", "insecure": True,
        "url": f"oci://127.0.0.1:{env.gitea.port}/{ORG}/{IMAGE}", "ref": {"semver": SEMVER}})
    env.create("Kustomization", IMAGE, {
        "interval": "1h", "timeout": "2m", "path": "./", "prune": False,
        "sourceRef": {"kind": "OCIRepository", "name": IMAGE}})
    env.create("Receiver", "gitea-packages", {
        "type": "github", "events": ["package"], "secretRef": {"name": "webhook-token"},
        "resources": [
            {"apiVersion": API_VERSIONS["OCIRepository"], "kind": "OCIRepository", "name": IMAGE},
            {"apiVersion": API_VERSIONS["Kustomization"], "kind": "Kustomization", "name": IMAGE},
        ]})
    env.bridge.wait_receivers(1)
    env.wait("first deploy of the artifact", functools.partial(env.deployed, first),
             DEPLOY_TIMEOUT)
    hook = "/hook/" + sig.hook_digest(tokens["webhook"], "gitea-packages", NS)
    env.gitea.create_org_hook(ORG, f"{env.bridge.url}{hook}", tokens["webhook"])


# -- the tests -----------------------------------------------------------------------------------------


def test_package_push_reconciles_the_oci_source_and_deploys_it(env: Env) -> None:
    version = f"1.{next(env.minor)}.0"
    sha = env.commit(version)
    before = env.annotations("OCIRepository", IMAGE).get(RECONCILE)
    seen = len(env.package_deliveries())
    accepted_before = env.metric("gfb_hook_requests_total", outcome="accepted")
    started = time.monotonic()
    pushed = env.push_artifact(version, sha, version)

    # 1. Gitea's package webhook reached the bridge, which planned the source and its consumer.
    record = env.next_delivery(seen)
    assert record["targets"] == 2, record
    assert env.metric("gfb_hook_requests_total", outcome="accepted") == accepted_before + 1

    # 2. The bridge annotated the OCIRepository; source-controller pulled the artifact from
    # Gitea's registry, with the manifest's annotations as its metadata.
    env.wait("the OCIRepository annotated by the bridge", lambda: (
        value if (value := env.annotations("OCIRepository", IMAGE).get(RECONCILE)) != before
        else None), HOOK_TIMEOUT)
    # The bridge's mark, written in the same patch, names this delivery.
    marks = env.annotations("OCIRepository", IMAGE).get(DELIVERIES_ANNOTATION, "")
    assert marks.startswith(record["mark"] + "@"), (marks, record)
    artifact = env.wait("source-controller to pull the artifact", lambda: (
        found if (found := env.artifact()).get("revision") == revision(pushed) else None),
        DEPLOY_TIMEOUT, lambda: f"artifact: {env.artifact()}")
    metadata = artifact.get("metadata") or {}
    assert metadata.get(SOURCE_ANNOTATION) == env.gitea.clone_url(ORG, REPO), artifact
    assert metadata.get(REVISION_ANNOTATION) == f"main@sha1:{sha}", artifact

    # 3. kustomize-controller applied it: the ConfigMap has the pushed content, and the
    # Kustomization names the Git commit the artifact was built from.
    ks = env.wait("kustomize-controller to apply it", lambda: env.deployed(pushed),
                  DEPLOY_TIMEOUT)
    env.timings["package push -> Kustomization Ready (webhook)"] = time.monotonic() - started
    assert ks["status"].get("lastAppliedOriginRevision") == f"main@sha1:{sha}", ks["status"]
    assert env.configmap_data() == {"release": version}

    # The delivery the bridge followed: both objects annotated, settled Ready.
    delivery = env.wait("the delivery to settle", lambda: (
        found if (found := env.delivery(record["id"])).get("final") else None), 60)
    assert delivery["outcome"] == "ready", delivery
    annotated = {(t["kind"], t["name"]) for t in delivery["targets"] if t["role"] == "annotate"}
    assert annotated == {("OCIRepository", IMAGE), ("Kustomization", IMAGE)}, delivery


def test_package_push_the_ref_does_not_select_annotates_nothing(env: Env) -> None:
    # 2.x is outside the OCIRepository's semver range: the registry has it, Flux would not
    # take it, so the bridge reconciles nothing.
    version = f"2.{next(env.minor)}.0"
    sha = env.commit(version)
    source_before = env.annotations("OCIRepository", IMAGE).get(RECONCILE)
    kustomization_before = env.annotations("Kustomization", IMAGE).get(RECONCILE)
    artifact_before = env.artifact().get("revision")
    annotated_before = env.metric("gfb_targets_annotated_total")
    seen = len(env.package_deliveries())
    pushed = env.push_artifact(version, sha, version)

    record = env.next_delivery(seen)
    assert record["targets"] == 0 and record["tracked"] == 0, record
    delivery = env.delivery(record["id"])
    assert delivery["targets"] == [], delivery
    assert env.metric("gfb_targets_annotated_total") == annotated_before
    assert env.annotations("OCIRepository", IMAGE).get(RECONCILE) == source_before
    assert env.annotations("Kustomization", IMAGE).get(RECONCILE) == kustomization_before
    assert env.artifact().get("revision") == artifact_before != revision(pushed)
