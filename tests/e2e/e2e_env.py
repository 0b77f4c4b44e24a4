"""What the whole-loop test modules do with the peers of `tests.e2e.e2e_harness`, written once.

The harness starts processes; this module is what every `test_e2e_*` module then does with them,
so that a new whole-loop module reuses it instead of copying another module:

- bring the peers up, timed and torn down in reverse (`stopping`, `timed`, `start_peers`, or
  `start_plane` / `start_flux` alone), and configure a bridge (`bridge_config`);
- make the Flux objects (`create_object`, `create_secret`, `git_repository`, `kustomization`,
  `receiver`, `alert_to_bridge`) and read them back (`get_object`, `condition`, `applied_at`,
  `failed_at`, `artifact_at`);
- push to Gitea and read a commit's status history (`push`, `context_history`, `described`,
  `shown`);
- wait on a condition, printing the time it took, with the peers' log tails when it does not
  come (`Waiting`), and the env base classes (`InNamespace`, `BridgeEnv`, which also reads a
  delivery and follows its `?wait=` stream as a CI gate does).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import httpx

from receiver import signatures as sig
from tests.e2e.e2e_harness import (
    E2E_BINARIES,
    FLUX_BINARIES,
    HELM_CONTROLLER,
    BridgeProcess,
    FluxControllers,
    Gitea,
    e2e_peers,
    install_helm_crds,
    install_source_crds,
    metric_value,
)
from tests.e2e.realk8s import ControlPlane, ControlPlaneError, wait_until

T = TypeVar("T")

FLUX_NS = "flux-system"
RECONCILE = "reconcile.fluxcd.io/requestedAt"
WAIT_INTERVAL = 0.2  # how often `Waiting.wait` looks again

# kind -> (apiVersion, plural): the Flux kinds the modules create and read.
FLUX_KINDS = {
    "GitRepository": ("source.toolkit.fluxcd.io/v1", "gitrepositories"),
    "OCIRepository": ("source.toolkit.fluxcd.io/v1", "ocirepositories"),
    "Kustomization": ("kustomize.toolkit.fluxcd.io/v1", "kustomizations"),
    "Receiver": ("notification.toolkit.fluxcd.io/v1", "receivers"),
    "Provider": ("notification.toolkit.fluxcd.io/v1beta3", "providers"),
    "Alert": ("notification.toolkit.fluxcd.io/v1beta3", "alerts"),
    "HelmRepository": ("source.toolkit.fluxcd.io/v1", "helmrepositories"),
    "HelmChart": ("source.toolkit.fluxcd.io/v1", "helmcharts"),
    "HelmRelease": ("helm.toolkit.fluxcd.io/v2", "helmreleases"),
}


# -- bringing the peers up -----------------------------------------------------------------------


@contextlib.contextmanager
def stopping() -> Iterator[list[Callable[[], None]]]:
    """A module fixture's teardown list, run last first when it ends; a failing stop is printed
    and the rest still run."""
    teardown: list[Callable[[], None]] = []
    try:
        yield teardown
    finally:
        for stop in reversed(teardown):
            try:
                stop()
            except Exception as exc:  # keep tearing down the rest
                print(f"teardown: {exc}")


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Records how long the block took as `timings[name]`, for a module's timing table."""
    started = time.monotonic()
    yield
    timings[name] = time.monotonic() - started


def print_timings(title: str, timings: Mapping[str, float]) -> None:
    """A module's timing table, one line per phase (run with -s to see it)."""
    print(f"\n=== {title} ===")
    width = max((len(name) for name in timings), default=0)
    for name, seconds in timings.items():
        print(f"  {name:<{width}} {seconds:6.1f}s")


def start_plane(bin_dir: Path, teardown: list[Callable[[], None]], *namespaces: str,
                audit_policy: Mapping[str, Any] | None = None) -> ControlPlane:
    """etcd + kube-apiserver with every Flux source CRD and `namespaces`, stopped at teardown."""
    plane = ControlPlane(bin_dir, audit_policy=audit_policy)
    plane.start()
    teardown.append(plane.stop)
    install_source_crds(plane)
    plane.ensure_namespace(*namespaces)
    return plane


def start_gitea(bin_dir: Path, static_root: Path, workdir: Path,
                teardown: list[Callable[[], None]]) -> Gitea:
    """Gitea in `workdir`, closed (and its data removed) at teardown."""
    gitea = Gitea(bin_dir / "gitea", static_root, workdir=workdir)
    gitea.workdir.mkdir()
    gitea.start()
    teardown.append(gitea.close)
    return gitea


def start_flux(bin_dir: Path, plane: ControlPlane, workdir: Path,
               teardown: list[Callable[[], None]],
               names: Sequence[str] = FLUX_BINARIES) -> FluxControllers:
    """The Flux controllers `names` against `plane`, stopped at teardown (with helm-controller,
    its HelmRelease CRD first)."""
    if HELM_CONTROLLER in names:
        install_helm_crds(plane)
    flux = FluxControllers(bin_dir, plane.kubeconfig, workdir=workdir)
    flux.workdir.mkdir()
    flux.start(names)
    teardown.append(flux.stop)
    return flux


def start_peers(workdir: Path, teardown: list[Callable[[], None]], timings: dict[str, float],
                *namespaces: str, audit_policy: Mapping[str, Any] | None = None,
                flux_names: Sequence[str] = FLUX_BINARIES
                ) -> tuple[ControlPlane, Gitea, FluxControllers]:
    """The peers every whole-loop module runs, each timed into `timings` and stopped at
    teardown: etcd + kube-apiserver with the CRDs and `namespaces`, Gitea, the Flux
    controllers `flux_names`."""
    with timed(timings, "binaries"):
        extra = [n for n in flux_names if n not in E2E_BINARIES]
        bin_dir, static_root = e2e_peers((*E2E_BINARIES, *extra))
    assert static_root is not None
    with timed(timings, "control plane (etcd, kube-apiserver, CRDs)"):
        plane = start_plane(bin_dir, teardown, *namespaces, audit_policy=audit_policy)
    with timed(timings, "gitea (migrate, admin, web)"):
        gitea = start_gitea(bin_dir, static_root, workdir / "gitea", teardown)
    with timed(timings, "flux controllers"):
        flux = start_flux(bin_dir, plane, workdir / "flux", teardown, flux_names)
    return plane, gitea, flux


def bridge_config(cluster: str, gitea: Gitea, events_token: str, home: Path, *,
                  source_timeout: int = 120, consumer_timeout: int = 240,
                  **extra: Any) -> dict[str, Any]:
    """A bridge's configuration for one Gitea, with the Gitea token and the events HMAC key in
    files under `home` (0600, as the chart mounts them); `extra` adds top-level keys."""
    for name, value in (("gitea-token", gitea.token), ("events-token", events_token)):
        (home / name).write_text(value)
        (home / name).chmod(0o600)
    return {
        "cluster_name": cluster,
        "log_level": "info",
        "reconcile": {"source_timeout_seconds": source_timeout,
                      "consumer_timeout_seconds": consumer_timeout,
                      "coalesce_window_seconds": 0.2},
        "gitea": [{"name": "e2e", "url": gitea.url, "token": {"file": str(home / "gitea-token")}}],
        "events": {"hmac_token": {"file": str(home / "events-token")}},
        **extra,
    }


def hook_path(token: str, receiver_name: str, namespace: str) -> str:
    """The Receiver's `/hook/<digest>` path, as notification-controller and the bridge serve it."""
    return "/hook/" + sig.hook_digest(token, receiver_name, namespace)


# -- Flux objects --------------------------------------------------------------------------------


def collection(kind: str, namespace: str) -> str:
    """The API path of `kind`'s objects in `namespace`."""
    return f"/apis/{FLUX_KINDS[kind][0]}/namespaces/{namespace}/{FLUX_KINDS[kind][1]}"


def get_object(plane: ControlPlane, kind: str, namespace: str, name: str) -> dict[str, Any]:
    """One Flux object, as the API server has it now."""
    return plane.request("GET", f"{collection(kind, namespace)}/{name}")


def create_object(plane: ControlPlane, kind: str, namespace: str, name: str,
                  spec: Mapping[str, Any]) -> None:
    """Create a Flux object of `kind` with `spec`."""
    plane.request("POST", collection(kind, namespace), {
        "apiVersion": FLUX_KINDS[kind][0], "kind": kind,
        "metadata": {"name": name, "namespace": namespace}, "spec": dict(spec)})


def create_secret(plane: ControlPlane, namespace: str, name: str, data: Mapping[str, str],
                  type_: str | None = None) -> None:
    """A Secret from `stringData` (Opaque unless `type_`)."""
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                            "stringData": dict(data)}
    if type_ is not None:
        body["type"] = type_
    plane.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body)


def git_repository(plane: ControlPlane, namespace: str, name: str, url: str, *,
                   branch: str = "main", timeout: str = "60s",
                   auth: str | None = "gitea-auth") -> None:
    """A GitRepository on one branch, looked at hourly (so only annotations move it); `auth`
    names the Secret with Gitea's credentials."""
    spec: dict[str, Any] = {"interval": "1h", "timeout": timeout, "url": url,
                            "ref": {"branch": branch}}
    if auth is not None:
        spec["secretRef"] = {"name": auth}
    create_object(plane, "GitRepository", namespace, name, spec)


def kustomization(plane: ControlPlane, namespace: str, name: str, path: str, *,
                  source: tuple[str, str], timeout: str | None = "2m") -> None:
    """A Kustomization of `path` in its source (kind, name), hourly, without pruning."""
    spec: dict[str, Any] = {"interval": "1h", "path": path, "prune": False,
                            "sourceRef": {"kind": source[0], "name": source[1]}}
    if timeout is not None:
        spec["timeout"] = timeout
    create_object(plane, "Kustomization", namespace, name, spec)


def receiver(plane: ControlPlane, namespace: str, name: str, type_: str, secret: str,
             resources: Iterable[tuple[str, str]], *, events: Sequence[str] | None = None,
             resource_filter: str = "") -> None:
    """A Receiver of `type_` listing `resources` (kind, name) in its own namespace."""
    spec: dict[str, Any] = {
        "type": type_, "secretRef": {"name": secret},
        "resources": [{"apiVersion": FLUX_KINDS[kind][0], "kind": kind, "name": obj}
                      for kind, obj in resources]}
    if events is not None:
        spec["events"] = list(events)
    if resource_filter:
        spec["resourceFilter"] = resource_filter
    create_object(plane, "Receiver", namespace, name, spec)


def alert_to_bridge(plane: ControlPlane, namespace: str, address: str, token: str,
                    sources: Sequence[str]) -> None:
    """Secret `bridge-events`, a generic-hmac Provider and an Alert (both `bridge`) sending every
    event of the `sources` kinds in `namespace` to `address` (a bridge's /events)."""
    create_secret(plane, namespace, "bridge-events", {"token": token})
    create_object(plane, "Provider", namespace, "bridge", {
        "type": "generic-hmac", "address": address, "secretRef": {"name": "bridge-events"}})
    create_object(plane, "Alert", namespace, "bridge", {
        "providerRef": {"name": "bridge"}, "eventSeverity": "info",
        "eventSources": [{"kind": kind, "name": "*"} for kind in sources]})


def condition(obj: Mapping[str, Any], type_: str) -> dict[str, Any]:
    """The object's status condition `type_`, or {}."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def applied_at(ks: dict[str, Any], revision: str) -> dict[str, Any] | None:
    """The Kustomization if it is Ready with `revision` applied, else None."""
    return _ready_at(ks, "lastAppliedRevision", revision, "True")


def failed_at(ks: dict[str, Any], revision: str) -> dict[str, Any] | None:
    """The Kustomization if it is not Ready after attempting `revision`, else None."""
    return _ready_at(ks, "lastAttemptedRevision", revision, "False")


def _ready_at(ks: dict[str, Any], field: str, revision: str, ready: str
              ) -> dict[str, Any] | None:
    status = ks.get("status") or {}
    if status.get(field) == revision and condition(ks, "Ready").get("status") == ready:
        return ks
    return None


def artifact_at(source: dict[str, Any], revision: str) -> dict[str, Any] | None:
    """The source if its artifact is `revision`, else None."""
    artifact = (source.get("status") or {}).get("artifact") or {}
    return source if artifact.get("revision") == revision else None


def status_context(cluster: str, kind: str, namespace: str, name: str) -> str:
    """The commit status context the bridge posts for a Flux object (the default template)."""
    return f"flux/{cluster}/{kind.lower()}/{namespace}/{name}"


def configmap_yaml(name: str, namespace: str, **data: str) -> str:
    """A ConfigMap manifest: what the modules' Kustomizations apply (there is no kubelet)."""
    lines = "".join(f'  {k}: "{v}"\n' for k, v in data.items())
    return (f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n"
            f"  namespace: {namespace}\ndata:\n{lines}")


# -- Gitea ---------------------------------------------------------------------------------------


def push(gitea: Gitea, owner: str, repo: str, files: Mapping[str, str | None], message: str
         ) -> str:
    """One commit of `files` (None deletes) on main; its sha. Prints what it took, for -s."""
    started = time.monotonic()
    sha = gitea.commit_files(owner, repo, files, message)
    print(f"  pushed {sha[:12]} ({message}) in {time.monotonic() - started:.2f}s")
    return sha


# -- Gitea's statuses ----------------------------------------------------------------------------


def context_history(gitea: Gitea, owner: str, repo: str, sha: str, ctx: str
                    ) -> list[dict[str, Any]]:
    """Every status of `ctx` on `sha` (Gitea keeps them all), oldest first."""
    return [s for s in gitea.statuses(owner, repo, sha) if s.get("context") == ctx]


def described(statuses: Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(state, description) of each status: a history as the tests print and report it."""
    return [(str(s.get("status")), str(s.get("description"))) for s in statuses]


def shown(statuses: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    """(context, state, description) of each status: a commit's statuses as a failure shows them."""
    return [(str(s.get("context")), str(s.get("status")), str(s.get("description")))
            for s in statuses]


# -- waiting -------------------------------------------------------------------------------------


class Waiting:
    """`wait` as every whole-loop env waits: on a condition, printing how long it took, and with
    the peers' log tails (`diagnostics`) in the failure when it does not come."""

    def diagnostics(self) -> list[str]:
        """The log tails a timed-out wait shows."""
        return []

    def wait(self, what: str, check: Callable[[], T | None], timeout: float,
             extra: Callable[[], str] | None = None) -> T:
        """Until `check` returns something (not None/False); that. `extra` adds to a timeout."""
        def on_timeout() -> str:
            parts = [extra()] if extra is not None else []
            return "\n".join(parts + self.diagnostics())

        started = time.monotonic()
        try:
            result = wait_until(what, check, timeout, interval=WAIT_INTERVAL,
                                on_timeout=on_timeout)
        except ControlPlaneError as exc:
            raise AssertionError(str(exc)) from None
        print(f"  {what}: {time.monotonic() - started:.1f}s")
        return result

    def wait_state(self, gitea: Gitea, owner: str, repo: str, sha: str, ctx: str, state: str,
                   timeout: float, description: str | None = None) -> list[dict[str, Any]]:
        """Until the newest status of `ctx` on `sha` is `state` (with `description`, when
        given); returns the context's whole history, oldest first."""
        def check() -> list[dict[str, Any]] | None:
            found = context_history(gitea, owner, repo, sha, ctx)
            if not found or found[-1].get("status") != state:
                return None
            return found if description in (None, found[-1].get("description")) else None

        return self.wait(f"{state} on {sha[:12]} for {ctx}", check, timeout,
                         lambda: f"statuses: {shown(gitea.statuses(owner, repo, sha))}")


class InNamespace:
    """The Flux objects of one namespace (`namespace`), for an env with a `plane`: the verbs
    every module's setup and checks use."""

    plane: ControlPlane
    namespace: ClassVar[str] = FLUX_NS

    def get(self, kind: str, name: str) -> dict[str, Any]:
        """The object `kind`/`name` of the env's namespace."""
        return get_object(self.plane, kind, self.namespace, name)

    def create(self, kind: str, name: str, spec: Mapping[str, Any]) -> None:
        """Create `kind`/`name` with `spec` in the env's namespace."""
        create_object(self.plane, kind, self.namespace, name, spec)

    def secret(self, name: str, data: Mapping[str, str], type_: str | None = None) -> None:
        """A Secret in the env's namespace (Opaque unless `type_`)."""
        create_secret(self.plane, self.namespace, name, data, type_)

    def annotations(self, kind: str, name: str) -> dict[str, str]:
        """The object's annotations now (the reconcile request, the bridge's marks)."""
        return dict(self.get(kind, name)["metadata"].get("annotations") or {})


@dataclass
class BridgeEnv(InNamespace, Waiting):
    """One bridge with the peers, and Flux objects in one namespace: the base of a module's env."""

    plane: ControlPlane
    gitea: Gitea
    flux: FluxControllers
    bridge: BridgeProcess

    def diagnostics(self) -> list[str]:
        """The bridge's, the Flux controllers' and Gitea's log tails."""
        return [self.bridge.tail(30), self.flux.logs(15), self.gitea.tail(15)]

    def delivery(self, delivery_id: str, token: str) -> dict[str, Any]:
        """GET /deliveries/<id> with a Receiver's token; must answer 200."""
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            response = client.get(f"{self.bridge.url}/deliveries/{delivery_id}",
                                  headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def follow(self, delivery_id: str, token: str, wait: float,
               at: BridgeProcess | None = None) -> list[dict[str, Any]]:
        """`GET /deliveries/<id>?wait=` as a CI gate reads it (from `at`, another replica, or
        the env's bridge): every line of the stream, the last one the settled delivery (a
        timeout marker fails here)."""
        with httpx.Client(trust_env=False, timeout=wait + 30.0) as client:
            response = client.get(f"{(at or self.bridge).url}/deliveries/{delivery_id}",
                                  params={"wait": f"{wait:g}"},
                                  headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
        assert lines and not lines[-1].get("timeout"), \
            f"{delivery_id} not settled within {wait:g}s: {lines[-2:]}\n" + "\n".join(
                self.diagnostics())
        return lines

    def metric(self, name: str, **labels: str) -> float:
        """The bridge's metric `name` now, summed over the samples with `labels`."""
        return metric_value(self.bridge.metrics(), name, labels)
