"""Pull-request previews with every component real: a pull request opened in Gitea -> its webhook
-> the bridge annotates flux-operator's ResourceSetInputProvider -> flux-operator lists the pull
request from Gitea -> its ResourceSet renders a GitRepository at the head commit and a
Kustomization -> both Ready -> the bridge's statuses on the head commit in Gitea.

The peers of the other whole-loop modules (etcd + kube-apiserver, Gitea, source-, kustomize-
and notification-controller, the bridge), plus flux-operator (`scripts/testbin.sh operator`)
run outside a cluster: the admin kubeconfig, leader election, metrics and web server off, and
FIPS mode on (it refuses to run without). Its CRDs come from its module; the Receiver CRD gets
ResourceSetInputProvider in its kinds, as flux-operator adds it when it installs Flux. The
bridge runs with the chart's ServiceAccount and RBAC, and the API server's audit log counts its
patches of the provider.

The provider polls every POLL_INTERVAL; the second test opens a pull request with the webhook
off, so the two tests print how long a preview takes with the bridge and by polling alone.

    python -m pytest tests/e2e/test_e2e_previews.py -q -x -s     (-s shows the timings)
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e import e2e_env as e2e
from tests.e2e.e2e_harness import (
    BridgeProcess,
    HarnessError,
    _EnvProcess,
    _http_ok,
    chart_service_account,
    child_env,
    e2e_peers,
)
from tests.e2e.e2e_harness import module_dir as component_dir
from tests.e2e.realk8s import FLUX_GROUPS, ControlPlane, audit_policy, free_port, wait_until

pytestmark = pytest.mark.e2e

ORG, REPO = "platform", "app"
CLUSTER = "eu-west"
NS = e2e.FLUX_NS
OPERATOR = "flux-operator"
OPERATOR_GROUP = "fluxcd.controlplane.io"
OPERATOR_API = f"{OPERATOR_GROUP}/v1"
PROVIDER = "app-prs"
# The provider's own polling interval (flux-operator's reconcileEvery annotation; its default
# is 10 minutes). One minute keeps the polling-only measurement short and the comparison fair.
POLL_INTERVAL = 60.0
PREVIEW_TIMEOUT = 120.0  # with the webhook: usually a few seconds
STATUS_TIMEOUT = 90.0
APP_FILE = "app/settings.yaml"


def preview(number: int) -> str:
    return f"app-pr-{number}"


@dataclass
class Previews(e2e.BridgeEnv):
    operator: _EnvProcess
    webhook_token: str
    bridge_user: str
    hook_id: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def diagnostics(self) -> list[str]:
        return [*super().diagnostics(), self.operator.tail(30)]

    def provider(self) -> dict[str, Any]:
        return self.plane.request("GET", _operator_path(PROVIDER, "resourcesetinputproviders"))

    def bridge_patches(self) -> int:
        """The bridge's patches of the provider, from the API server's audit log."""
        return self.plane.count_patches(self.bridge_user, OPERATOR_GROUP,
                                        "resourcesetinputproviders", NS, PROVIDER)

    def exported(self) -> list[dict[str, Any]]:
        return list((self.provider().get("status") or {}).get("exportedInputs") or [])

    def open_pull_request(self, branch: str, title: str) -> tuple[int, str]:
        """A branch with one commit off main and a pull request of it; (number, head sha)."""
        sha = self.gitea.commit_files(ORG, REPO, {APP_FILE: e2e.configmap_yaml(
            "settings", "previews", branch=branch)}, f"{branch}: change", new_branch=branch)
        pull = self.gitea.api("POST", f"/repos/{ORG}/{REPO}/pulls",
                              {"head": branch, "base": "main", "title": title})
        return int(pull["number"]), sha

    def ready_at(self, number: int, sha: str) -> dict[str, Any] | None:
        """The preview's Kustomization when it is Ready with the head commit applied."""
        found = self.plane.request("GET", f"{e2e.collection('Kustomization', NS)}/"
                                          f"{preview(number)}", ok=(200, 404))
        status = found.get("status") or {}
        applied = str(status.get("lastAppliedRevision") or "")
        ready = e2e.condition(found, "Ready").get("status") == "True"
        return found if ready and applied.endswith(sha) else None

    def time_to_preview(self, number: int, sha: str, opened: float, timeout: float) -> float:
        self.wait(f"preview of #{number} Ready at {sha[:12]}",
                  functools.partial(self.ready_at, number, sha), timeout)
        return time.monotonic() - opened


def _operator_path(name: str, plural: str) -> str:
    return f"/apis/{OPERATOR_API}/namespaces/{NS}/{plural}/{name}"


def _install_operator_crds(plane: ControlPlane) -> None:
    """flux-operator's CRDs from its module (all four: its manager maps each kind it caches at
    start), and ResourceSetInputProvider among the kinds a Receiver may list (flux-operator
    patches Flux's Receiver CRD so when it installs Flux)."""
    bases = component_dir(OPERATOR) / "config" / "crd" / "bases"
    docs = [d for path in sorted(bases.glob("fluxcd.controlplane.io_*.yaml"))
            for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    plane.install_crds(docs)
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/" \
           "receivers.notification.toolkit.fluxcd.io"
    crd = plane.request("GET", path)
    for version in crd["spec"]["versions"]:
        kind = (version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
                ["resources"]["items"]["properties"]["kind"])
        if "ResourceSetInputProvider" not in kind.get("enum", []):
            kind.setdefault("enum", []).append("ResourceSetInputProvider")
    plane.request("PUT", path, crd)


def _start_operator(bin_dir: Path, plane: ControlPlane, workdir: Path) -> _EnvProcess:
    health = free_port()
    workdir.mkdir()
    args = [str(bin_dir / OPERATOR), "--log-level=info", "--log-encoding=json",
            "--metrics-addr=0", f"--health-addr=127.0.0.1:{health}",
            "--enable-leader-election=false", "--web-server-port=0",
            f"--storage-path={workdir}", "--concurrent=4"]
    env = child_env(KUBECONFIG=str(plane.kubeconfig), RUNTIME_NAMESPACE=NS,
                    HOME=str(workdir), GODEBUG="fips140=on")
    proc = _EnvProcess(OPERATOR, args, workdir / f"{OPERATOR}.log", workdir, env)
    proc.start()

    def ready() -> bool:
        if proc.exited() is not None:
            raise HarnessError(f"{OPERATOR} exited with code {proc.exited()}\n{proc.tail(60)}")
        return _http_ok(f"http://127.0.0.1:{health}/readyz")

    wait_until(f"{OPERATOR} /readyz", ready, 120.0, interval=0.2,
               on_timeout=functools.partial(proc.tail, 60))
    return proc


@pytest.fixture(scope="module")
def previews(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Previews]:
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("previews")
    with e2e.stopping() as teardown:
        with e2e.timed(timings, "flux-operator binary"):
            bin_dir, _ = e2e_peers((OPERATOR,), gitea=False)
        plane, gitea, flux = e2e.start_peers(
            workdir, teardown, timings, NS, "previews",
            audit_policy=audit_policy(groups=(*FLUX_GROUPS, OPERATOR_GROUP)))
        with e2e.timed(timings, "chart RBAC (the bridge's ServiceAccount)"):
            # The bridge runs with exactly what the chart grants it.
            bridge_user, bridge_token = chart_service_account(plane, "previews", NS)
            kubeconfig = plane.write_kubeconfig(workdir / "bridge-kubeconfig.yaml",
                                                bridge_token, user=bridge_user)
        with e2e.timed(timings, "flux-operator (CRDs, start)"):
            _install_operator_crds(plane)
            operator = _start_operator(bin_dir, plane, workdir / "operator")
            teardown.append(operator.stop)
        gitea.create_org(ORG)
        gitea.create_repo(ORG, REPO, private=True)
        gitea.commit_files(ORG, REPO, {APP_FILE: e2e.configmap_yaml(
            "settings", "previews", branch="main")}, "app")
        tokens = {name: secrets.token_hex(16) for name in ("webhook", "events")}
        with e2e.timed(timings, "bridge"):
            bridge = BridgeProcess(e2e.bridge_config(CLUSTER, gitea, tokens["events"], workdir),
                                   kubeconfig, workdir)
            bridge.start()
            teardown.append(bridge.stop)
        env = Previews(plane, gitea, flux, bridge, operator, tokens["webhook"], bridge_user,
                       timings=timings)
        _make_previews(env, tokens)
        e2e.print_timings("previews environment up", timings)
        yield env
        e2e.print_timings("previews timings", timings)


def _make_previews(env: Previews, tokens: dict[str, str]) -> None:
    """The provider, the ResourceSet rendering a preview per pull request, the Receiver listing
    the provider, the Alert to the bridge and Gitea's webhook."""
    env.secret("gitea-auth", {"username": env.gitea.admin, "password": env.gitea.token})
    env.secret("webhook-token", {"token": tokens["webhook"]})
    e2e.alert_to_bridge(env.plane, NS, f"{env.bridge.url}/events", tokens["events"],
                        ["GitRepository", "Kustomization"])
    env.plane.request("POST", f"/apis/{OPERATOR_API}/namespaces/{NS}/resourcesetinputproviders", {
        "apiVersion": OPERATOR_API, "kind": "ResourceSetInputProvider",
        "metadata": {"name": PROVIDER, "namespace": NS, "annotations": {
            "fluxcd.controlplane.io/reconcileEvery": f"{POLL_INTERVAL:g}s"}},
        "spec": {"type": "GiteaPullRequest", "url": f"{env.gitea.url}/{ORG}/{REPO}",
                 "secretRef": {"name": "gitea-auth"}}})
    clone = env.gitea.clone_url(ORG, REPO)
    env.plane.request("POST", f"/apis/{OPERATOR_API}/namespaces/{NS}/resourcesets", {
        "apiVersion": OPERATOR_API, "kind": "ResourceSet",
        "metadata": {"name": "app-previews", "namespace": NS},
        "spec": {
            "inputsFrom": [{"apiVersion": OPERATOR_API, "kind": "ResourceSetInputProvider",
                            "name": PROVIDER}],
            "resources": [
                {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
                 "metadata": {"name": "app-pr-<< inputs.id >>", "namespace": NS},
                 "spec": {"interval": "1h", "url": clone, "secretRef": {"name": "gitea-auth"},
                          "ref": {"commit": "<< inputs.sha >>"}}},
                {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                 "metadata": {"name": "app-pr-<< inputs.id >>", "namespace": NS, "annotations": {
                     "event.toolkit.fluxcd.io/change_request": "<< inputs.id | quote >>",
                     "event.toolkit.fluxcd.io/commit": "<< inputs.sha | quote >>"}},
                 "spec": {"interval": "1h", "path": "./app", "prune": True, "timeout": "2m",
                          "namePrefix": "pr-<< inputs.id >>-",
                          "sourceRef": {"kind": "GitRepository",
                                        "name": "app-pr-<< inputs.id >>"}}},
            ]}})
    env.create("Receiver", "previews", {
        "type": "github", "secretRef": {"name": "webhook-token"},
        "resources": [{"apiVersion": OPERATOR_API, "kind": "ResourceSetInputProvider",
                       "name": PROVIDER}]})
    env.bridge.wait_receivers(1)
    env.wait("flux-operator to list no pull request yet", lambda: e2e.condition(
        env.provider(), "Ready").get("status") == "True", 120)
    hook = e2e.hook_path(tokens["webhook"], "previews", NS)
    env.hook_id = env.gitea.create_hook(
        ORG, REPO, f"{env.bridge.url}{hook}", tokens["webhook"],
        events=("pull_request", "pull_request_sync", "pull_request_label"))


# -- the tests -----------------------------------------------------------------------------------


def test_a_pull_request_opened_becomes_a_ready_preview_through_the_bridge(
        previews: Previews) -> None:
    before = previews.provider()["metadata"].get("annotations", {}).get(e2e.RECONCILE)
    opened = time.monotonic()
    number, sha = previews.open_pull_request("feature-1", "Feature one")
    # Gitea's webhook reaches the bridge, which annotates the provider (flux-operator's own
    # poll is a minute away).
    previews.wait("the provider annotated by the bridge", lambda: (
        previews.provider()["metadata"].get("annotations", {}).get(e2e.RECONCILE)
        not in (None, before)) or None, 30)
    assert previews.bridge_patches() == 1
    # The delivery a client can follow: ready once flux-operator handled the request.
    accepted = previews.wait("the bridge to accept the pull request", lambda: [
        r for r in previews.bridge.records("push accepted")
        if r.get("ref") == f"refs/pull/{number}/head"] or None, 30)
    settled = previews.follow(accepted[0]["id"], previews.webhook_token, 60)[-1]
    assert settled["outcome"] == "ready", settled
    listed = previews.wait("flux-operator to list the pull request", lambda: [
        i for i in previews.exported() if str(i.get("id")) == str(number)] or None, 60)
    assert listed[0]["sha"] == sha and listed[0]["branch"] == "feature-1", listed
    seconds = previews.time_to_preview(number, sha, opened, PREVIEW_TIMEOUT)
    previews.timings["PR opened -> preview Ready (bridge)"] = seconds
    print(f"  PR #{number} opened -> preview Ready with the bridge: {seconds:.1f}s "
          f"(provider polls every {POLL_INTERVAL:g}s)")
    source = previews.get("GitRepository", preview(number))
    assert source["spec"]["ref"] == {"commit": sha}
    # One pull request, one reconcile request: nothing else patched the provider since.
    assert previews.bridge_patches() == 1
    history = previews.wait_state(previews.gitea, ORG, REPO, sha, e2e.status_context(
        CLUSTER, "Kustomization", NS, preview(number)), "success", STATUS_TIMEOUT)
    print(f"  statuses on {sha[:12]}: {e2e.described(history)}")
    # kustomize-controller's Progressing event (objects created) first, then Ready.
    states = [s for s, _ in e2e.described(history)]
    assert states[-1] == "success" and "failure" not in states, history
    assert "pending" in states[:-1], history


def test_without_the_bridge_a_preview_waits_for_the_providers_poll(previews: Previews) -> None:
    previews.gitea.set_hook_active(ORG, REPO, previews.hook_id, False)
    patches = previews.bridge_patches()
    annotated = previews.provider()["metadata"].get("annotations", {}).get(e2e.RECONCILE)
    opened = time.monotonic()
    number, sha = previews.open_pull_request("feature-2", "Feature two")
    seconds = previews.time_to_preview(number, sha, opened, POLL_INTERVAL * 2 + PREVIEW_TIMEOUT)
    previews.timings["PR opened -> preview Ready (polling only)"] = seconds
    print(f"  PR #{number} opened -> preview Ready by polling alone: {seconds:.1f}s "
          f"(provider polls every {POLL_INTERVAL:g}s)")
    # Nothing requested this reconcile: the bridge was not told.
    assert previews.provider()["metadata"].get("annotations", {}).get(
        e2e.RECONCILE) == annotated
    assert previews.bridge_patches() == patches
