"""The bridge against a real kube-apiserver (+ etcd) with the real Flux CRDs and RBAC on.

The chart is rendered with the real `helm`; its ServiceAccount and RBAC are applied to the API
server, and the bridge's Kubernetes backend runs **as that ServiceAccount** (a TokenRequest
token). Admin calls play the user and source-controller. Every rendered object of the chart also
goes through a server-side dry run.

One control plane serves the whole module (`tests.e2e.realk8s.control_plane`). Namespaces are never
deleted (without kube-controller-manager they would stay Terminating): each test uses its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import kubernetes
import pytest
import yaml
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError

from receiver import signatures as sig
from receiver.config import Settings
from receiver.config_load import load_settings
from receiver.delivery.marks import DELIVERIES_ANNOTATION
from receiver.flux.cluster import ClusterError
from receiver.flux.kube import KubeCluster
from receiver.flux.objects import RECONCILE_ANNOTATION, ObjectKey
from receiver.flux.store import ObjectStore
from receiver.retry import Backoff
from receiver.web.app import create_app, url_normaliser
from tests import gitea_payloads as gp
from tests.conftest import until
from tests.e2e.realk8s import ROOT, ControlPlane, control_plane, load_yaml_dir  # noqa: F401

pytestmark = pytest.mark.realk8s

T = TypeVar("T")
ApiException = kubernetes.client.ApiException

CHART = ROOT / "charts" / "gitea-flux-bridge"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
# A minimal ImageRepository CRD (the fixture CRDs leave the image kinds out, as many installs do).
OPTIONAL_CRDS = ROOT / "tests" / "fixtures" / "optional-crds"
RELEASE_NS = "gfb-system"
# Two installs side by side, as two releases in one namespace: cluster-wide (default values) and
# namespaced. Each has its own ServiceAccount, so neither borrows the other's permissions.
CLUSTER_RELEASE = "rel"
SCOPED_RELEASE = "scoped"
WATCHED = ("team-a", "team-b")
OUTSIDE = "team-c"
CHART_LEASE = CLUSTER_RELEASE + "-gitea-flux-bridge-resync"  # the chart default: <fullname>-resync
SCOPED_LEASE = "gfb-scoped-resync"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")

MERGE_PATCH = "application/merge-patch+json"
FLUX = {
    "GitRepository": ("source.toolkit.fluxcd.io", "v1", "gitrepositories"),
    "Kustomization": ("kustomize.toolkit.fluxcd.io", "v1", "kustomizations"),
    "Receiver": ("notification.toolkit.fluxcd.io", "v1", "receivers"),
}
RECEIVER_TOKEN = "realk8s-receiver-token"
REPO = "platform/fleet"
REPO_URL = "https://gitea.example.com/platform/fleet.git"

# Prometheus Operator's CRDs are not ours to copy: permissive stand-ins, so the dry run of the
# full values covers the chart's ServiceMonitor and PrometheusRule too.
def _operator_crd(kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural,
                      "singular": kind.lower()},
            "versions": [{
                "name": "v1", "served": True, "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }],
        },
    }


OPERATOR_CRDS = {"ServiceMonitor": _operator_crd("ServiceMonitor", "servicemonitors"),
                 "PrometheusRule": _operator_crd("PrometheusRule", "prometheusrules")}


# -- helpers -----------------------------------------------------------------------------------------


def helm_template(cp: ControlPlane, release: str, *args: str) -> list[dict[str, Any]]:
    """`helm template` with the real helm (from the testbin cache) in RELEASE_NS."""
    command = [str(cp.bin_dir / "helm"), "template", release, str(CHART),
               "--namespace", RELEASE_NS, "--set", "clusterName=realk8s", *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120,
                            check=False)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return [d for d in yaml.safe_load_all(result.stdout) if isinstance(d, dict)]


def status_of(call: Callable[[], Any]) -> int:
    """The HTTP status an API call ends with (200 when it succeeds)."""
    try:
        call()
    except ApiException as exc:
        return int(exc.status)
    return 200


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def eventually(what: str, check: Callable[[], T | None], timeout: float = 20.0, *,
                     api: bool = False) -> T:
    """`until`, worded for this module: `api=True` when `check` calls the API server."""
    result: T = await until(check, timeout, what, in_thread=api)
    return result


@dataclass
class Install:
    """A release's ServiceAccount and RBAC, applied to the API server."""

    release: str
    service_account: str
    token: str
    objects: list[dict[str, Any]]


@dataclass
class Admin:
    """The admin's clients: typed, custom objects and dynamic."""

    plane: ControlPlane
    api: Any
    core: Any
    custom: Any
    dynamic: Any

    def create(self, doc: dict[str, Any], namespace: str | None = None) -> Any:
        resource = self.dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        if resource.namespaced:
            namespace = namespace or doc["metadata"].get("namespace") or RELEASE_NS
        return resource.create(body=doc, namespace=namespace if resource.namespaced else None)

    def create_flux(self, kind: str, namespace: str, name: str, spec: dict[str, Any],
                    labels: dict[str, str] | None = None) -> dict[str, Any]:
        group, version, plural = FLUX[kind]
        body = {"apiVersion": f"{group}/{version}", "kind": kind,
                "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
                "spec": spec}
        created: dict[str, Any] = self.custom.create_namespaced_custom_object(
            group, version, namespace, plural, body)
        return created

    def get_flux(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        group, version, plural = FLUX[kind]
        found: dict[str, Any] = self.custom.get_namespaced_custom_object(
            group, version, namespace, plural, name)
        return found

    def annotations(self, kind: str, namespace: str, name: str) -> dict[str, str]:
        meta = self.get_flux(kind, namespace, name)["metadata"]
        return dict(meta.get("annotations") or {})

    def create_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.plane.request("POST", f"/api/v1/namespaces/{namespace}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "stringData": data})

    def report_artifact(self, namespace: str, name: str, sha: str) -> None:
        """Play source-controller: the GitRepository now has `main@sha1:<sha>`, Ready."""
        group, version, plural = FLUX["GitRepository"]
        generation = self.get_flux("GitRepository", namespace, name)["metadata"]["generation"]
        revision = f"main@sha1:{sha}"
        stamp = now()
        body = {"status": {
            "observedGeneration": generation,
            "artifact": {
                "revision": revision, "digest": "sha256:" + "0" * 64, "lastUpdateTime": stamp,
                "path": f"gitrepository/{namespace}/{name}/{sha}.tar.gz",
                "url": f"http://source-controller.flux-system.svc.cluster.local./"
                       f"gitrepository/{namespace}/{name}/{sha}.tar.gz"},
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "Succeeded",
                "message": f"stored artifact for revision '{revision}'",
                "lastTransitionTime": stamp, "observedGeneration": generation}],
        }}
        self.custom.patch_namespaced_custom_object_status(
            group, version, namespace, plural, name, body, _content_type=MERGE_PATCH)


def make_fleet(admin: Admin, namespace: str) -> str:
    """A Receiver (type github) with its Secret, a GitRepository and two Kustomizations on
    different paths, all listed in the Receiver. Returns the hook path. Idempotent."""
    hook = "/hook/" + sig.hook_digest(RECEIVER_TOKEN, "gitea", namespace)
    with contextlib.suppress(ApiException):
        admin.get_flux("Receiver", namespace, "gitea")
        return hook  # made already (by another test)
    admin.plane.ensure_namespace(namespace)
    admin.create_secret(namespace, "webhook-token", {"token": RECEIVER_TOKEN})
    admin.create_flux("GitRepository", namespace, "fleet", {
        "interval": "10m", "url": REPO_URL, "ref": {"branch": "main"}})
    for name in ("apps", "infra"):
        admin.create_flux("Kustomization", namespace, name, {
            "interval": "10m", "path": f"./clusters/realk8s/{name}", "prune": True,
            "sourceRef": {"kind": "GitRepository", "name": "fleet"}})
    admin.create_flux("Receiver", namespace, "gitea", {
        "type": "github", "events": ["push"], "secretRef": {"name": "webhook-token"},
        "resources": [
            {"kind": "GitRepository", "name": "fleet"},
            {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
             "name": "apps"},
            {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
             "name": "infra"},
        ]})
    return hook


def gitea_push(*paths: str, message: str) -> tuple[bytes, str]:
    """A Gitea push to main of platform/fleet changing `paths`: (signed body, commit sha)."""
    doc = gp.push(REPO, "refs/heads/main", [gp.commit(REPO, message, modified=list(paths))])
    return gp.gitea_bytes(doc), str(doc["after"])


def gitea_headers(body: bytes) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Gitea-Event": "push", "X-Gitea-Event-Type": "push", "X-GitHub-Event": "push",
        "X-Gitea-Delivery": f"realk8s-{time.monotonic_ns()}",
        "X-Gitea-Signature": sig.hmac_hex("sha256", RECEIVER_TOKEN, body),
    }


# -- the bridge, as a ServiceAccount ---------------------------------------------------------------


@dataclass
class Bridge:
    app: Any
    client: httpx.AsyncClient
    cluster: KubeCluster
    settings: Settings

    async def wait_ready(self, timeout: float = 30.0, *, indexed: bool = True
                         ) -> dict[str, Any]:
        """/readyz answers 200 and, with `indexed`, every cached Receiver has been indexed
        (its Secret read). `test_ready_means_every_receiver_answers` checks that the first
        200 already means the latter; the other tests do not lean on it."""
        deadline = time.monotonic() + timeout
        while True:
            response = await self.client.get("/readyz")
            if response.status_code == 200:
                body: dict[str, Any] = response.json()
                cached = len(self.cluster.store.list("Receiver"))
                if not indexed or body["receivers"] >= cached:
                    return body
            if time.monotonic() >= deadline:
                raise AssertionError(f"/readyz still {response.status_code} after {timeout:g}s: "
                                     f"{response.text}; errors {self.cluster.sync_errors}")
            await asyncio.sleep(0.1)

    async def push(self, hook: str, body: bytes) -> dict[str, Any]:
        response = await self.client.post(hook, content=body, headers=gitea_headers(body))
        assert response.status_code == 202, response.text
        reply: dict[str, Any] = response.json()
        return reply

    async def delivery(self, delivery_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/deliveries/{delivery_id}",
                                         headers={"Authorization": f"Bearer {RECEIVER_TOKEN}"})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@contextlib.asynccontextmanager
async def run_bridge(cp: ControlPlane, token: str, namespaces: tuple[str, ...] = (), *,
                     lease_name: str = CHART_LEASE, kubeconfig: Path | None = None,
                     **cluster_options: Any) -> AsyncIterator[Bridge]:
    """The service with `KubeCluster`, authenticated with `token`, driven in-process over HTTP.

    With `kubeconfig`, the cluster is built the way `serve` builds it (`from_environment`).
    """
    settings = load_settings(environ={}, overrides={
        "cluster_name": "realk8s",
        "namespaces": list(namespaces),
        "reconcile": {"coalesce_window_seconds": 0.05,
                      "source_timeout_seconds": 60, "consumer_timeout_seconds": 120},
        # A short Lease, so a bridge that stopped hands it on quickly.
        "statuses": {"lease_name": lease_name, "lease_duration_seconds": 10},
    })
    store = ObjectStore(url_normaliser(settings))
    options: dict[str, Any] = {
        "secret_ttl_seconds": settings.secret_cache_seconds,
        "lease_namespace": RELEASE_NS,
        # Reconnect fast after the API server restart; the watch timeout stays realistic.
        "backoff": Backoff(initial=0.2, maximum=2.0),
        "watch_timeout_seconds": 120,
        **cluster_options,
    }
    if kubeconfig is not None:
        with _kubeconfig_env(kubeconfig):
            cluster = KubeCluster.from_environment(store, namespaces, **options)
    else:
        cluster = KubeCluster(store, cp.api_client(token), namespaces, **options)
    app = create_app(settings, cluster)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bridge.test") as client:
        yield Bridge(app, client, cluster, settings)


@contextlib.contextmanager
def _kubeconfig_env(path: Path) -> Iterator[None]:
    """KUBECONFIG=path for `from_environment`. The client reads KUBECONFIG once, at import,
    into KUBE_CONFIG_DEFAULT_LOCATION: set both, as a process started with it would have."""
    module = kubernetes.config.kube_config
    # Inside a pod (CI on Kubernetes) from_environment would take the in-cluster config first.
    names = ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")
    saved = {name: os.environ.pop(name, None) for name in names}
    saved_default = module.KUBE_CONFIG_DEFAULT_LOCATION
    os.environ["KUBECONFIG"] = module.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
    try:
        yield
    finally:
        os.environ.pop("KUBECONFIG", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})
        module.KUBE_CONFIG_DEFAULT_LOCATION = saved_default


# -- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin(control_plane: ControlPlane) -> Admin:  # noqa: F811 - the imported fixture
    api = control_plane.api_client()
    dynamic = DynamicClient(  # type: ignore[no-untyped-call]
        api, cache_file=str(control_plane.workdir / "discovery.json"))
    return Admin(control_plane, api, kubernetes.client.CoreV1Api(api),
                 kubernetes.client.CustomObjectsApi(api), dynamic)


def install(admin: Admin, release: str, *helm_args: str) -> Install:
    """Render the chart, apply its ServiceAccount and RBAC, get the SA a token."""
    docs = helm_template(admin.plane, release, *helm_args)
    rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
    namespaces = {RELEASE_NS} | {d["metadata"]["namespace"] for d in rbac
                                 if d["metadata"].get("namespace")}
    admin.plane.ensure_namespace(*sorted(namespaces))
    for doc in rbac:
        admin.create(doc)
    (sa,) = [d["metadata"]["name"] for d in rbac if d["kind"] == "ServiceAccount"]
    return Install(release, sa, admin.plane.service_account_token(RELEASE_NS, sa), rbac)


@pytest.fixture(scope="module")
def cluster_wide(admin: Admin) -> Install:
    installed = install(admin, CLUSTER_RELEASE)
    assert {d["kind"] for d in installed.objects} == set(RBAC_KINDS)
    return installed


@pytest.fixture(scope="module")
def scoped(admin: Admin) -> Install:
    installed = install(admin, SCOPED_RELEASE,
                        "--set", "watchNamespaces={" + ",".join(WATCHED) + "}",
                        "--set", f"config.statuses.lease_name={SCOPED_LEASE}")
    assert "ClusterRole" not in {d["kind"] for d in installed.objects}
    admin.plane.ensure_namespace(OUTSIDE)
    return installed


@pytest.fixture
def sa_kubeconfig(control_plane: ControlPlane, cluster_wide: Install,  # noqa: F811
                  tmp_path: Path) -> Path:
    """A kubeconfig for the chart's ServiceAccount, as `serve` would be given outside a pod."""
    path = tmp_path / "sa-kubeconfig.yaml"
    control_plane.write_kubeconfig(path, cluster_wide.token,
                                   user=f"system:serviceaccount:{RELEASE_NS}:"
                                        f"{cluster_wide.service_account}")
    return path


# -- the chart: server-side dry run of every object --------------------------------------------------


@pytest.mark.parametrize("variant", ["default", "full"])
def test_every_chart_object_passes_a_server_side_dry_run(admin: Admin, variant: str) -> None:
    args = ("-f", str(FULL_VALUES)) if variant == "full" else ()
    docs = helm_template(admin.plane, "dry", *args)
    needed = [crd for kind, crd in OPERATOR_CRDS.items() if any(d["kind"] == kind for d in docs)]
    if needed:
        admin.plane.install_crds(needed)
    admin.plane.ensure_namespace(RELEASE_NS, *{d["metadata"]["namespace"] for d in docs
                                                if d["metadata"].get("namespace")})
    # A fresh discovery, so resources installed just now are known.
    dynamic = DynamicClient(  # type: ignore[no-untyped-call]
        admin.api, cache_file=str(admin.plane.workdir / f"dry-{variant}.json"))
    seen = []
    for doc in docs:
        resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        namespace = (doc["metadata"].get("namespace") or RELEASE_NS) if resource.namespaced \
            else None
        name = doc["metadata"]["name"]
        try:
            answer = resource.create(body=doc, namespace=namespace, dry_run="All",
                                     query_params=[("fieldValidation", "Strict")])
        except kubernetes.client.ApiException as exc:
            raise AssertionError(f"dry run of {doc['kind']} {namespace}/{name} refused: "
                                 f"{exc.status} {exc.body}") from None
        assert answer.metadata.name == name
        assert answer.metadata.uid, "the server admitted and defaulted the object"
        with pytest.raises(NotFoundError):  # dry run: nothing was stored
            resource.get(name=name, namespace=namespace)
        seen.append(doc["kind"])
    expected = {"ConfigMap", "Deployment", "Service", "ServiceAccount", "NetworkPolicy",
                "PodDisruptionBudget", "Role", "RoleBinding"}
    if variant == "full":
        expected |= {"HorizontalPodAutoscaler", "Ingress", "ServiceMonitor", "PrometheusRule",
                     # extraObjects: the Flux notification objects shipped with the release
                     "Provider", "Alert", "Receiver"}
    else:
        expected |= {"ClusterRole", "ClusterRoleBinding"}
    assert set(seen) == expected
    assert len(seen) == len(docs)


# -- cluster-wide install (default values) ----------------------------------------------------------


@pytest.mark.anyio
async def test_cluster_wide_caches_sync_and_the_lease_is_acquired(
        control_plane: ControlPlane, admin: Admin, cluster_wide: Install,  # noqa: F811
        sa_kubeconfig: Path) -> None:
    async with run_bridge(control_plane, cluster_wide.token, kubeconfig=sa_kubeconfig) as bridge:
        ready = await bridge.wait_ready()
        assert ready["status"] == "ready"
        assert bridge.cluster.sync_errors == {}
        holder = bridge.app.state.parts.statuses.holder

        def lease_holder() -> str | None:
            lease = admin.custom.get_namespaced_custom_object(
                "coordination.k8s.io", "v1", RELEASE_NS, "leases", CHART_LEASE)
            value = lease["spec"].get("holderIdentity")
            return value if value == holder else None

        # The resync loop takes the chart's Lease in the release namespace by itself.
        await eventually("the bridge to hold its Lease", lambda: _ignore_404(lease_holder),
                         api=True)
        # Renewing works (the Role grants get+update on that name) ...
        assert await bridge.cluster.try_acquire_lease(CHART_LEASE, holder, 10)
        # ... another holder is refused while it is held ...
        assert not await bridge.cluster.try_acquire_lease(CHART_LEASE, "someone-else", 10)
        # ... and the Role is limited to that one Lease.
        with pytest.raises(ClusterError) as refused:
            await bridge.cluster.try_acquire_lease("another-lease", holder, 10)
        assert refused.value.status == 403


def _ignore_404(fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


@pytest.mark.anyio
async def test_signed_push_annotates_exactly_the_expected_objects(
        control_plane: ControlPlane, admin: Admin, cluster_wide: Install,  # noqa: F811
        sa_kubeconfig: Path) -> None:
    namespace = "push"
    hook = await asyncio.to_thread(make_fleet, admin, namespace)
    async with run_bridge(control_plane, cluster_wide.token, kubeconfig=sa_kubeconfig) as bridge:
        await bridge.wait_ready()
        body, sha = gitea_push("clusters/realk8s/apps/podinfo.yaml", message="bump podinfo")
        reply = await bridge.push(hook, body)
        assert reply["receiver"] == f"{namespace}/gitea"
        targets = {(t["kind"], t["name"]): t for t in reply["targets"]}
        assert set(targets) == {("GitRepository", "fleet"), ("Kustomization", "apps")}
        assert targets[("GitRepository", "fleet")]["state"] == "annotated"

        # Read back from the API server: the source carries the request, the consumers not yet.
        source = await asyncio.to_thread(admin.annotations, "GitRepository", namespace, "fleet")
        assert RECONCILE_ANNOTATION in source
        for name in ("apps", "infra"):
            found = await asyncio.to_thread(admin.annotations, "Kustomization", namespace, name)
            assert RECONCILE_ANNOTATION not in found, name

        # source-controller (played by the admin) reports the pushed commit: the consumer under
        # the changed path is annotated next.
        await asyncio.to_thread(admin.report_artifact, namespace, "fleet", sha)
        apps = await eventually(
            "Kustomization apps to be annotated",
            lambda: admin.annotations("Kustomization", namespace, "apps").get(
                RECONCILE_ANNOTATION), api=True)
        # The API server has the patch; the bridge's cache holds it a moment later (the patch's
        # answer or the watch event): only then does the delivery say so.
        apps_key = ObjectKey("Kustomization", namespace, "apps")
        await eventually("the bridge's cache to hold its patch", lambda: (
            (cached := bridge.cluster.store.get(apps_key)) is not None
            and cached.annotations.get(RECONCILE_ANNOTATION) == apps))
        delivery = await bridge.delivery(reply["delivery"])
        states = {(t["kind"], t["name"]): t["state"] for t in delivery["targets"]}
        assert states[("Kustomization", "apps")] in ("annotated", "reconciling"), states
        assert ("Kustomization", "infra") not in states

        # Nothing left to send: a wrong or a second patch would have gone out by now.
        await eventually("no patch in flight",
                         lambda: bridge.app.state.parts.reconciler.patches.idle)
        assert RECONCILE_ANNOTATION not in await asyncio.to_thread(
            admin.annotations, "Kustomization", namespace, "infra")
        # One push, one reconcile request per object: a second patch would make Flux reconcile
        # the Kustomization twice.
        registry = bridge.app.state.parts.metrics.registry
        patches = {kind: registry.get_sample_value("gfb_targets_annotated_total", {"kind": kind})
                   for kind in ("GitRepository", "Kustomization")}
        assert patches == {"GitRepository": 1.0, "Kustomization": 1.0}, patches
        assert admin.annotations("Kustomization", namespace, "apps")[RECONCILE_ANNOTATION] == apps
        # Only the annotation changed: the patch is a merge patch of metadata.annotations.
        assert admin.get_flux("GitRepository", namespace, "fleet")["spec"]["url"] == REPO_URL


@pytest.mark.anyio
async def test_image_kinds_without_crds_are_not_installed_then_picked_up(
        control_plane: ControlPlane, admin: Admin, cluster_wide: Install) -> None:  # noqa: F811
    """The fixture CRDs have no image-reflector-controller kinds, as many Flux installs: the
    bridge is ready and says so; a CRD installed later is cached without a restart."""
    namespace = "images"
    await asyncio.to_thread(admin.plane.ensure_namespace, namespace)
    async with run_bridge(control_plane, cluster_wide.token, absent_recheck_seconds=0.5
                          ) as bridge:
        ready = await bridge.wait_ready()
        # tests/fixtures/crds has no HelmRepository / HelmChart CRD either, nor flux-operator's
        # (optional kinds too).
        helm = ["HelmChart", "HelmRepository"]
        operator = ["ResourceSetInputProvider"]
        assert ready["kinds_not_installed"] == [*helm, "ImagePolicy", "ImageRepository",
                                                *operator]
        assert bridge.cluster.sync_errors == {}
        await asyncio.to_thread(control_plane.install_crds, load_yaml_dir(OPTIONAL_CRDS))
        await asyncio.to_thread(
            admin.custom.create_namespaced_custom_object, "image.toolkit.fluxcd.io", "v1",
            namespace, "imagerepositories", {
                "apiVersion": "image.toolkit.fluxcd.io/v1", "kind": "ImageRepository",
                "metadata": {"name": "app", "namespace": namespace},
                "spec": {"image": "gitea.example.com/platform/app", "interval": "5m"}})
        await eventually("the ImageRepository to be cached", lambda: bridge.cluster.store.get(
            ObjectKey("ImageRepository", namespace, "app")))
        ready = (await bridge.client.get("/readyz")).json()
        assert ready["kinds_not_installed"] == [*helm, "ImagePolicy", *operator]
        assert bridge.cluster.store.image_repositories_for_url(
            "gitea.example.com/platform/app")[0].name == "app"


@pytest.mark.anyio
async def test_ready_means_every_receiver_answers(
        control_plane: ControlPlane, admin: Admin, cluster_wide: Install) -> None:  # noqa: F811
    """The first /readyz 200 is when a pod starts getting pushes: by then every Receiver in the
    cache must be resolvable, or Gitea (which does not retry) gets 404 for a valid hook."""
    namespace, count = "many-receivers", 30

    def make_receivers() -> None:
        make_fleet(admin, namespace)
        for i in range(count):  # each its own Secret, as separate teams would have
            admin.create_secret(namespace, f"token-{i:02d}", {"token": RECEIVER_TOKEN})
            admin.create_flux("Receiver", namespace, f"r{i:02d}", {
                "type": "github", "secretRef": {"name": f"token-{i:02d}"},
                "resources": [{"kind": "GitRepository", "name": "fleet"}]})

    await asyncio.to_thread(make_receivers)
    last = "/hook/" + sig.hook_digest(RECEIVER_TOKEN, f"r{count - 1:02d}", namespace)
    async with run_bridge(control_plane, cluster_wide.token) as bridge:
        await bridge.wait_ready(indexed=False)
        body, _ = gitea_push("clusters/realk8s/apps/x.yaml", message="right after ready")
        response = await bridge.client.post(last, content=body, headers=gitea_headers(body))
        assert response.status_code == 202, (
            f"a push right after the first /readyz 200 got {response.status_code} "
            f"{response.text}: readiness came before the Receivers were indexed")


def test_cluster_wide_rbac_refuses_what_it_must(admin: Admin, cluster_wide: Install) -> None:
    namespace = "rbac-cluster"
    make_fleet(admin, namespace)
    admin.plane.request("POST", f"/api/v1/namespaces/{namespace}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
        "data": {"a": "1"}})
    sa = admin.plane.api_client(cluster_wide.token)
    core = kubernetes.client.CoreV1Api(sa)
    custom = kubernetes.client.CustomObjectsApi(sa)
    group, version, plural = FLUX["GitRepository"]
    patch = {"metadata": {"annotations": {"example.com/x": "y"}}}

    # What it needs is allowed ...
    assert status_of(lambda: core.read_namespaced_secret("webhook-token", namespace)) == 200
    assert status_of(lambda: custom.patch_namespaced_custom_object(
        group, version, namespace, plural, "fleet", patch, _content_type=MERGE_PATCH)) == 200
    assert status_of(lambda: custom.list_cluster_custom_object(*FLUX["Receiver"])) == 200
    # ... and nothing more.
    refused = {
        "list Secrets": lambda: core.list_namespaced_secret(namespace),
        "list Secrets everywhere": lambda: core.list_secret_for_all_namespaces(),
        "patch a ConfigMap": lambda: core.patch_namespaced_config_map(
            "settings", namespace, patch, _content_type=MERGE_PATCH),
        "delete a GitRepository": lambda: custom.delete_namespaced_custom_object(
            group, version, namespace, plural, "fleet"),
        "create a GitRepository": lambda: custom.create_namespaced_custom_object(
            group, version, namespace, plural, {
                "apiVersion": f"{group}/{version}", "kind": "GitRepository",
                "metadata": {"name": "evil"}, "spec": {"interval": "1m", "url": REPO_URL}}),
        "write a GitRepository's status": lambda: custom.patch_namespaced_custom_object_status(
            group, version, namespace, plural, "fleet", {"status": {}},
            _content_type=MERGE_PATCH),
        "patch a Receiver": lambda: custom.patch_namespaced_custom_object(
            *FLUX["Receiver"][:2], namespace, FLUX["Receiver"][2], "gitea", patch,
            _content_type=MERGE_PATCH),
    }
    answers = {what: status_of(call) for what, call in refused.items()}
    assert answers == dict.fromkeys(refused, 403)
    assert admin.annotations("GitRepository", namespace, "fleet")["example.com/x"] == "y"


# -- namespaced install (watchNamespaces) -------------------------------------------------------------


@pytest.mark.anyio
async def test_namespaced_install_syncs_its_namespaces_only(
        control_plane: ControlPlane, admin: Admin, scoped: Install) -> None:  # noqa: F811
    for namespace in WATCHED:
        await asyncio.to_thread(make_fleet, admin, namespace)
    async with run_bridge(control_plane, scoped.token, WATCHED,
                          lease_name=SCOPED_LEASE) as bridge:
        # Both Receivers get indexed (their Secrets are read with `get`, by name).
        assert (await bridge.wait_ready())["receivers"] == len(WATCHED)
        assert bridge.cluster.sync_errors == {}
        keys = {obj.key for obj in bridge.cluster.store.list("Kustomization", None)}
        assert keys == {ObjectKey("Kustomization", ns, n) for ns in WATCHED
                        for n in ("apps", "infra")}
        holder = bridge.app.state.parts.statuses.holder
        await eventually("the namespaced bridge to hold its Lease", lambda: _ignore_404(
            lambda: admin.custom.get_namespaced_custom_object(
                "coordination.k8s.io", "v1", RELEASE_NS, "leases", SCOPED_LEASE
            )["spec"].get("holderIdentity") == holder), api=True)
    # The same ServiceAccount cannot watch the whole cluster: its Roles are namespaced.
    async with run_bridge(control_plane, scoped.token, lease_name=SCOPED_LEASE) as bridge:
        errors = await eventually("cluster-wide lists to fail",
                                  lambda: bridge.cluster.sync_errors, timeout=10)
        assert all("403" in message for message in errors.values()), errors
        assert (await bridge.client.get("/readyz")).status_code == 503


def test_namespaced_rbac_refuses_writes_outside_watched_namespaces(
        admin: Admin, scoped: Install) -> None:
    for namespace in (*WATCHED, OUTSIDE):
        make_fleet(admin, namespace)
    custom = kubernetes.client.CustomObjectsApi(admin.plane.api_client(scoped.token))
    core = kubernetes.client.CoreV1Api(admin.plane.api_client(scoped.token))
    group, version, plural = FLUX["Kustomization"]
    patch = {"metadata": {"annotations": {"example.com/x": "y"}}}

    def patch_in(namespace: str) -> int:
        return status_of(lambda: custom.patch_namespaced_custom_object(
            group, version, namespace, plural, "apps", patch, _content_type=MERGE_PATCH))

    assert patch_in(WATCHED[0]) == 200
    assert patch_in(OUTSIDE) == 403
    assert status_of(lambda: custom.list_namespaced_custom_object(
        group, version, OUTSIDE, plural)) == 403
    assert status_of(lambda: core.read_namespaced_secret("webhook-token", WATCHED[1])) == 200
    assert status_of(lambda: core.read_namespaced_secret("webhook-token", OUTSIDE)) == 403
    assert status_of(lambda: core.list_namespaced_secret(WATCHED[0])) == 403
    assert RECONCILE_ANNOTATION not in admin.annotations("Kustomization", OUTSIDE, "apps")
    assert "example.com/x" not in admin.annotations("Kustomization", OUTSIDE, "apps")


# -- an API server restart (last: it disturbs every connection) --------------------------------------


@pytest.mark.anyio
async def test_watches_survive_an_apiserver_restart(
        control_plane: ControlPlane, admin: Admin, cluster_wide: Install) -> None:  # noqa: F811
    namespace = "restart"
    hook = await asyncio.to_thread(make_fleet, admin, namespace)
    async with run_bridge(control_plane, cluster_wide.token) as bridge:
        await bridge.wait_ready()
        store = bridge.cluster.store
        first = await bridge.push(hook, gitea_push("clusters/realk8s/apps/a.yaml",
                                                   message="before the restart")[0])
        before = (await asyncio.to_thread(admin.annotations, "GitRepository", namespace,
                                          "fleet"))[RECONCILE_ANNOTATION]

        downtime = await asyncio.to_thread(control_plane.restart_apiserver)
        assert downtime < 60

        # A new object and a change to an existing one reach the bridge's cache by its watches.
        await asyncio.to_thread(admin.create_flux, "GitRepository", namespace, "after-restart",
                                {"interval": "5m", "url": REPO_URL, "ref": {"branch": "dev"}})
        group, version, plural = FLUX["Kustomization"]
        await asyncio.to_thread(
            admin.custom.patch_namespaced_custom_object, group, version, namespace, plural,
            "infra", {"metadata": {"labels": {"tier": "restarted"}}},
            _content_type=MERGE_PATCH)
        await eventually("the new GitRepository in the cache", lambda: store.get(
            ObjectKey("GitRepository", namespace, "after-restart")), timeout=30)

        def relabelled() -> bool:
            infra = store.get(ObjectKey("Kustomization", namespace, "infra"))
            return infra is not None and infra.labels.get("tier") == "restarted"

        await eventually("the label change in the cache", relabelled, timeout=30)
        await eventually("every watch to be back", lambda: not bridge.cluster.sync_errors,
                         timeout=30)

        # And a push after the restart still annotates (a new request value).
        second = await bridge.push(hook, gitea_push("clusters/realk8s/apps/b.yaml",
                                                    message="after the restart")[0])
        assert second["delivery"] != first["delivery"]
        assert {t["name"] for t in second["targets"]} == {"fleet", "apps"}
        after = (await asyncio.to_thread(admin.annotations, "GitRepository", namespace,
                                         "fleet"))[RECONCILE_ANNOTATION]
        assert after != before



@pytest.mark.anyio
async def test_two_replicas_one_request_one_annotation(
        control_plane: ControlPlane, admin: Admin, cluster_wide: Install,  # noqa: F811
        sa_kubeconfig: Path) -> None:
    """Two bridges, each with its own watch cache, against one API server: a Gitea delivery
    sent to both at once, then again to each, annotates the source once. The loser of the race
    finds the winner's mark when its conditional patch is refused (409) and it reads again."""
    namespace = "replicas"
    hook = await asyncio.to_thread(make_fleet, admin, namespace)
    async with run_bridge(control_plane, cluster_wide.token, kubeconfig=sa_kubeconfig) as a, \
            run_bridge(control_plane, cluster_wide.token, kubeconfig=sa_kubeconfig) as b:
        await a.wait_ready()
        await b.wait_ready()
        body, sha = gitea_push("clusters/realk8s/apps/podinfo.yaml", message="race")
        headers = gitea_headers(body)
        first = await asyncio.gather(*(bridge.client.post(hook, content=body, headers=headers)
                                       for bridge in (a, b)))
        assert {r.status_code for r in first} <= {200, 202}
        accepted = [r.json() for r in first if r.status_code == 202]
        assert accepted
        # Both caches see the mark; then the same delivery again to each replica.
        for bridge in (a, b):
            await eventually("the mark in this replica's cache", lambda bridge=bridge: any(
                DELIVERIES_ANNOTATION in (o.annotations or {})
                for o in bridge.cluster.store.list("GitRepository") if o.namespace == namespace))
        again = [await bridge.client.post(hook, content=body, headers=headers) for bridge in (a, b)]
        assert [r.status_code for r in again] == [200, 200]
        assert all(r.json()["status"] == "duplicate" for r in again)

        source = await asyncio.to_thread(admin.annotations, "GitRepository", namespace, "fleet")
        assert len(source[DELIVERIES_ANNOTATION].split()) == 1
        sent = sum(bridge.app.state.parts.metrics.registry.get_sample_value(
            "gfb_targets_annotated_total", {"kind": "GitRepository"}) or 0 for bridge in (a, b))
        assert sent == 1

        # Either replica answers for the delivery, with the same targets and states.
        delivery_id = accepted[0]["delivery"]
        seen = [await bridge.delivery(delivery_id) for bridge in (a, b)]
        assert seen[0]["targets"] == seen[1]["targets"]
        assert seen[0]["commit"] == sha
