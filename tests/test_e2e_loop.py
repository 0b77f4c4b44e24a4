"""The whole loop with every component real: Gitea push -> bridge -> Flux -> events -> bridge ->
Gitea commit status.

One environment serves the module: etcd + kube-apiserver (`tests.realk8s`), Gitea with SQLite,
source-, kustomize- and notification-controller, and the bridge as `gitea-flux-bridge serve`
(`tests.e2e_harness`), all on 127.0.0.1. Gitea holds `platform/fleet`, a small multi-region
fleet; the GitRepository clones it over HTTP with the admin's token; two Kustomizations apply
ConfigMaps from `clusters/eu-west/apps` and `clusters/eu-west/infra` (no Pods: there is no
kubelet). A github-type Receiver's hook URL on the bridge is the repository's Gitea webhook; a
generic-hmac Provider and an Alert send every GitRepository and Kustomization event to the
bridge's /events. Intervals are 1h, so only the bridge's annotations and new artifacts move
Flux.

The tests run in file order and build on each other's commits, as one story.

    python -m pytest tests/test_e2e_loop.py -q -x -s     (-s shows the timings)
"""

from __future__ import annotations

import functools
import os
import secrets
import subprocess
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
    rss_kib,
)
from tests.realk8s import ROOT, ControlPlane, ControlPlaneError, wait_until

pytestmark = pytest.mark.e2e

T = TypeVar("T")

ORG, REPO = "platform", "fleet"
CLUSTER = "eu-west"
NS = "flux-system"
APPS_NS, INFRA_NS = "eu-west-apps", "eu-west-infra"
APPS_PATH, INFRA_PATH = "clusters/eu-west/apps", "clusters/eu-west/infra"
APPS_FILE, INFRA_FILE = f"{APPS_PATH}/settings.yaml", f"{INFRA_PATH}/settings.yaml"
BROKEN_FILE = f"{INFRA_PATH}/broken.yaml"
NOTIFY = ROOT / ".gitea" / "actions" / "notify-flux" / "notify.sh"
RECONCILE = "reconcile.fluxcd.io/requestedAt"

SOURCE_API = "/apis/source.toolkit.fluxcd.io/v1"
KUSTOMIZE_API = "/apis/kustomize.toolkit.fluxcd.io/v1"
NOTIFICATION_API = "/apis/notification.toolkit.fluxcd.io"
PLURALS = {"GitRepository": f"{SOURCE_API}/namespaces/{NS}/gitrepositories",
           "Kustomization": f"{KUSTOMIZE_API}/namespaces/{NS}/kustomizations",
           "Receiver": f"{NOTIFICATION_API}/v1/namespaces/{NS}/receivers",
           "Provider": f"{NOTIFICATION_API}/v1beta3/namespaces/{NS}/providers",
           "Alert": f"{NOTIFICATION_API}/v1beta3/namespaces/{NS}/alerts"}
API_VERSIONS = {"GitRepository": "source.toolkit.fluxcd.io/v1",
                "Kustomization": "kustomize.toolkit.fluxcd.io/v1",
                "Receiver": "notification.toolkit.fluxcd.io/v1",
                "Provider": "notification.toolkit.fluxcd.io/v1beta3",
                "Alert": "notification.toolkit.fluxcd.io/v1beta3"}

DEPLOY_TIMEOUT = 120.0  # push -> Kustomization Ready at the commit (usually a few seconds)
STATUS_TIMEOUT = 90.0


def context(name: str) -> str:
    return f"flux/{CLUSTER}/kustomization/{NS}/{name}"


def configmap(name: str, namespace: str, **data: str) -> str:
    lines = "".join(f'  {k}: "{v}"\n' for k, v in data.items())
    return (f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n"
            f"  namespace: {namespace}\ndata:\n{lines}")


# -- the environment ---------------------------------------------------------------------------------


@dataclass
class Loop:
    plane: ControlPlane
    gitea: Gitea
    flux: FluxControllers
    bridge: BridgeProcess
    workdir: Path
    webhook_token: str
    actions_token: str
    hook_id: int = 0
    initial_sha: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)  # what a test pushed, for later ones

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

    def configmap_data(self, namespace: str, name: str) -> dict[str, str]:
        found = self.plane.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}",
                                   ok=(200, 404))
        return dict(found.get("data") or {})

    def deployed(self, name: str, sha: str) -> dict[str, Any] | None:
        """The Kustomization if it is Ready with `sha` applied, else None."""
        ks = self.get("Kustomization", name)
        status = ks.get("status") or {}
        ready = _condition(ks, "Ready")
        if status.get("lastAppliedRevision") == f"main@sha1:{sha}" and ready.get("status") == "True":
            return ks
        return None

    def failed(self, name: str, sha: str) -> dict[str, Any] | None:
        ks = self.get("Kustomization", name)
        status = ks.get("status") or {}
        ready = _condition(ks, "Ready")
        if status.get("lastAttemptedRevision") == f"main@sha1:{sha}" and ready.get("status") == "False":
            return ks
        return None

    def source_at(self, sha: str) -> dict[str, Any] | None:
        repo = self.get("GitRepository", "fleet")
        artifact = (repo.get("status") or {}).get("artifact") or {}
        return repo if artifact.get("revision") == f"main@sha1:{sha}" else None

    # -- Gitea ---------------------------------------------------------------------------------------

    def push(self, files: dict[str, str | None], message: str) -> str:
        started = time.monotonic()
        sha = self.gitea.commit_files(ORG, REPO, files, message)
        print(f"  pushed {sha[:12]} ({message}) in {time.monotonic() - started:.2f}s")
        return sha

    def statuses(self, sha: str, name: str) -> list[dict[str, Any]]:
        return [s for s in self.gitea.statuses(ORG, REPO, sha) if s.get("context") == context(name)]

    def wait_status(self, sha: str, name: str, state: str, timeout: float = STATUS_TIMEOUT
                    ) -> list[dict[str, Any]]:
        """Until the newest status of the Kustomization's context on `sha` is `state`; returns
        the context's whole history, oldest first."""
        def check() -> list[dict[str, Any]] | None:
            found = self.statuses(sha, name)
            return found if found and found[-1].get("status") == state else None

        return self.wait(f"{state} on {sha[:12]} for {context(name)}", check, timeout,
                         lambda: f"history: {_history(self.statuses(sha, name))}")

    # -- the bridge ----------------------------------------------------------------------------------

    def delivery(self, delivery_id: str, token: str) -> dict[str, Any]:
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            response = client.get(f"{self.bridge.url}/deliveries/{delivery_id}",
                                  headers={"Authorization": f"Bearer {token}"})
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
            result = wait_until(what, check, timeout, interval=0.25, on_timeout=diagnostics)
        except ControlPlaneError as exc:
            raise AssertionError(str(exc)) from None
        print(f"  {what}: {time.monotonic() - started:.1f}s")
        return result


def _condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def _history(statuses: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(str(s.get("status")), str(s.get("description"))) for s in statuses]


def _timed(timings: dict[str, float], name: str, started: float) -> None:
    timings[name] = time.monotonic() - started


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    module_started = time.monotonic()
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("e2e")
    started = time.monotonic()
    bin_dir, static_root = e2e_peers()
    assert static_root is not None
    _timed(timings, "binaries", started)

    teardown: list[Callable[[], None]] = []
    try:
        started = time.monotonic()
        plane = ControlPlane(bin_dir)
        plane.start()
        teardown.append(plane.stop)
        install_source_crds(plane)
        plane.ensure_namespace(NS, APPS_NS, INFRA_NS)
        _timed(timings, "control plane (etcd, kube-apiserver, CRDs)", started)

        started = time.monotonic()
        gitea = Gitea(bin_dir / "gitea", static_root, workdir=workdir / "gitea")
        gitea.workdir.mkdir()
        gitea.start()
        teardown.append(gitea.close)
        _timed(timings, "gitea (migrate, admin, web)", started)
        gitea.create_org(ORG)
        gitea.create_repo(ORG, REPO, private=True)

        started = time.monotonic()
        flux = FluxControllers(bin_dir, plane.kubeconfig, workdir=workdir / "flux")
        flux.workdir.mkdir()
        flux.start()
        teardown.append(flux.stop)
        _timed(timings, "flux controllers", started)

        tokens = {name: secrets.token_hex(16) for name in ("webhook", "actions", "events")}
        files = {"gitea-token": gitea.token, "events-token": tokens["events"]}
        for name, value in files.items():
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
            # Few attempts, so a status lost while Gitea is down is repaired by the resync
            # (every 5 s), not by a late retry.
            "statuses": {"resync_interval_seconds": 5, "max_attempts": 3,
                         "lease_duration_seconds": 15},
        }, plane.kubeconfig, workdir)
        bridge.start()
        teardown.append(bridge.stop)
        _timed(timings, "bridge", started)

        env = Loop(plane, gitea, flux, bridge, workdir, tokens["webhook"], tokens["actions"],
                   timings=timings)
        started = time.monotonic()
        env.initial_sha = _make_fleet(env, tokens)
        _timed(timings, "initial deploy (objects -> both Kustomizations Ready)", started)
        started = time.monotonic()
        for name in ("apps", "infra"):
            env.wait_status(env.initial_sha, name, "success")
        _timed(timings, "initial success statuses in Gitea", started)
        timings["environment total"] = time.monotonic() - module_started
        print("\n=== e2e environment up ===")
        for name, seconds in timings.items():
            print(f"  {name:<55} {seconds:6.1f}s")
        print(f"  component start: control plane {plane.timings}, gitea {gitea.timings}, "
              f"flux {flux.timings}, bridge {bridge.timings}")
        yield env
        print("\n=== e2e timings ===")
        for name, seconds in timings.items():
            print(f"  {name:<55} {seconds:6.1f}s")
        rss = {"bridge": rss_kib(bridge.pid)} | {n: rss_kib(flux.pid(n)) for n in flux.processes}
        print("  RSS (MiB): " + ", ".join(f"{k} {v / 1024:.0f}" for k, v in rss.items()))
        print(f"  module total {time.monotonic() - module_started:.1f}s")
    finally:
        for stop in reversed(teardown):
            try:
                stop()
            except Exception as exc:  # keep tearing down the rest
                print(f"teardown: {exc}")


def _make_fleet(env: Loop, tokens: dict[str, str]) -> str:
    """The repository's first layout, the Flux objects, the webhook; waits for the first deploy.
    Returns the commit deployed."""
    sha = env.push({
        APPS_FILE: configmap("apps-settings", APPS_NS, release="1"),
        INFRA_FILE: configmap("infra-settings", INFRA_NS, tier="base"),
        # Another region of the fleet: in the repository, not deployed by this cluster.
        "clusters/us-east/apps/settings.yaml": configmap("apps-settings", "us-east-apps",
                                                         release="1"),
    }, "fleet: eu-west and us-east")
    env.secret("gitea-auth", {"username": env.gitea.admin, "password": env.gitea.token})
    env.secret("webhook-token", {"token": tokens["webhook"]})
    env.secret("actions-token", {"token": tokens["actions"]})
    env.secret("bridge-events", {"token": tokens["events"]})
    env.create("Provider", "bridge", {"type": "generic-hmac", "address": f"{env.bridge.url}/events",
                                      "secretRef": {"name": "bridge-events"}})
    env.create("Alert", "bridge", {
        "providerRef": {"name": "bridge"}, "eventSeverity": "info",
        "eventSources": [{"kind": "GitRepository", "name": "*"},
                         {"kind": "Kustomization", "name": "*"}]})
    env.create("GitRepository", "fleet", {
        "interval": "1h", "timeout": "60s", "url": env.gitea.clone_url(ORG, REPO),
        "ref": {"branch": "main"}, "secretRef": {"name": "gitea-auth"}})
    for name, path in (("apps", APPS_PATH), ("infra", INFRA_PATH)):
        env.create("Kustomization", name, {
            "interval": "1h", "timeout": "2m", "path": f"./{path}", "prune": False,
            "sourceRef": {"kind": "GitRepository", "name": "fleet"}})
    resources = [
        {"apiVersion": API_VERSIONS["GitRepository"], "kind": "GitRepository", "name": "fleet"},
        {"apiVersion": API_VERSIONS["Kustomization"], "kind": "Kustomization", "name": "apps"},
        {"apiVersion": API_VERSIONS["Kustomization"], "kind": "Kustomization", "name": "infra"},
    ]
    env.create("Receiver", "gitea", {"type": "github", "events": ["push"],
                                     "secretRef": {"name": "webhook-token"},
                                     "resources": resources})
    env.create("Receiver", "actions", {"type": "generic", "secretRef": {"name": "actions-token"},
                                       "resources": resources})
    env.bridge.wait_receivers(2)
    for name in ("apps", "infra"):
        env.wait(f"first deploy of {name}", functools.partial(env.deployed, name, sha),
                 DEPLOY_TIMEOUT)
    hook = "/hook/" + sig.hook_digest(tokens["webhook"], "gitea", NS)
    env.hook_id = env.gitea.create_hook(ORG, REPO, f"{env.bridge.url}{hook}", tokens["webhook"])
    return sha


# -- the tests -----------------------------------------------------------------------------------------


def test_push_annotates_the_source_and_the_touched_kustomization_only(loop: Loop) -> None:
    before = loop.annotations("GitRepository", "fleet").get(RECONCILE)
    assert RECONCILE not in loop.annotations("Kustomization", "infra")
    annotated_before = loop.metric("gfb_targets_annotated_total", kind="Kustomization")
    started = time.monotonic()
    sha = loop.push({APPS_FILE: configmap("apps-settings", APPS_NS, release="2")},
                    "apps: release 2")
    loop.commits["apps-2"] = sha

    # Gitea's webhook reaches the bridge, which annotates the GitRepository at once.
    accepted = loop.wait("the bridge to accept Gitea's push", lambda: loop.bridge.accepted(sha) or None,
                         30)
    assert len(accepted) == 1, accepted
    delivery_id, mark = accepted[0]["id"], accepted[0]["mark"]
    loop.wait("the GitRepository annotated", lambda: _changed(
        loop.annotations("GitRepository", "fleet").get(RECONCILE), before), 30)
    # The bridge's mark, written in the same patch, names this delivery.
    marks = loop.annotations("GitRepository", "fleet").get(DELIVERIES_ANNOTATION, "")
    assert marks.startswith(mark + "@"), (marks, mark)
    loop.wait("source-controller to fetch the commit", lambda: loop.source_at(sha), 60)
    apps = loop.wait("kustomize-controller to apply it", lambda: loop.deployed("apps", sha),
                     DEPLOY_TIMEOUT)
    loop.timings["push -> apps Ready (webhook)"] = time.monotonic() - started
    assert apps["status"]["lastAppliedRevision"] == f"main@sha1:{sha}"
    assert loop.configmap_data(APPS_NS, "apps-settings") == {"release": "2"}

    delivery = loop.wait("the delivery to settle", lambda: _settled(
        loop.delivery(delivery_id, loop.webhook_token)), 60)
    assert delivery["commit"] == sha, delivery
    assert delivery["outcome"] == "ready", delivery
    annotated = {(t["kind"], t["name"]): t for t in delivery["targets"] if t["role"] == "annotate"}
    assert set(annotated) == {("GitRepository", "fleet"), ("Kustomization", "apps")}, delivery

    # The touched Kustomization: annotated by this delivery, unless kustomize-controller had
    # already started on the commit by itself (it follows its source's revision), in which case
    # the bridge records that and sends no redundant patch.
    apps_marks = loop.annotations("Kustomization", "apps").get(DELIVERIES_ANNOTATION, "")
    apps_value = loop.annotations("Kustomization", "apps").get(RECONCILE, "")
    detail = annotated[("Kustomization", "apps")].get("detail") or {}
    if apps_marks.startswith(mark + "@"):
        print("  apps: annotated by the bridge after the source had the commit")
        assert loop.metric("gfb_targets_annotated_total",
                           kind="Kustomization") == annotated_before + 1
    else:
        # No redundant patch: the bridge saw kustomize-controller start on the commit itself
        # (AlreadyStarted, since overwritten by the final Ready detail).
        assert loop.metric("gfb_targets_annotated_total",
                           kind="Kustomization") == annotated_before, (apps_value, delivery, detail)
        print("  apps: kustomize-controller started on the commit first (no bridge patch)")
    # The other Kustomization: never annotated (kustomize-controller itself still applies the
    # new revision to it, since it follows the source; that is Flux, not the bridge).
    assert RECONCILE not in loop.annotations("Kustomization", "infra")


def test_commit_statuses_pending_then_success_and_failure_with_flux_reason(loop: Loop) -> None:
    sha = loop.commits.get("apps-2") or loop.push(
        {APPS_FILE: configmap("apps-settings", APPS_NS, release="2b")}, "apps: release 2b")
    history = loop.wait_status(sha, "apps", "success")
    states = [s["status"] for s in history]
    print(f"  apps on {sha[:12]}: {_history(history)}")
    assert "pending" in states, history
    assert states.index("pending") < len(states) - 1, "pending came before the success"
    assert history[-1]["description"], history

    # A commit that breaks the build of infra: failure with Flux's reason.
    started = time.monotonic()
    broken = loop.push({BROKEN_FILE: "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: [x\n"},
                       "infra: broken manifest")
    infra = loop.wait("infra to fail at the broken commit", lambda: loop.failed("infra", broken),
                      DEPLOY_TIMEOUT)
    history = loop.wait_status(broken, "infra", "failure")
    loop.timings["push -> failure status (broken build)"] = time.monotonic() - started
    print(f"  infra on {broken[:12]}: {_history(history)}")
    reason = _condition(infra, "Ready")["reason"]
    assert reason == "BuildFailed", infra["status"]
    assert history[-1]["description"].startswith("Build failed"), history[-1]
    # apps was not touched by that push, but kustomize-controller applied the new revision to
    # it too: its status on that commit (from Flux's events) is success.
    loop.wait_status(broken, "apps", "success")

    # Repair, so the next tests start from a healthy fleet.
    fixed = loop.push({BROKEN_FILE: None}, "infra: remove the broken manifest")
    loop.wait("infra to recover", lambda: loop.deployed("infra", fixed), DEPLOY_TIMEOUT)
    loop.wait_status(fixed, "infra", "success")


def test_status_missed_while_gitea_is_down_is_repaired_by_the_resync(loop: Loop) -> None:
    failed_before = loop.metric("gfb_statuses_total", result="failed")
    # kustomize-controller is frozen while the push goes through, so the deploy completes only
    # once Gitea is down (it stays connected; SIGCONT resumes it).
    loop.flux.pause("kustomize-controller")
    try:
        sha = loop.push({APPS_FILE: configmap("apps-settings", APPS_NS, release="3")},
                        "apps: release 3")
        loop.wait("source-controller to fetch the commit", lambda: loop.source_at(sha), 60)
        loop.wait_status(sha, "apps", "pending", 30)
        stopped = time.monotonic()
        loop.gitea.stop()
        print(f"  gitea stopped in {time.monotonic() - stopped:.1f}s")
    finally:
        loop.flux.resume("kustomize-controller")
    loop.wait("apps to deploy while Gitea is down", lambda: loop.deployed("apps", sha),
              DEPLOY_TIMEOUT)
    # The bridge tried to post the outcome and gave up (max_attempts: 3): nothing is left
    # queued or waiting for a retry, so only a resync can bring the status now.
    loop.wait("the bridge to give up posting", lambda: loop.metric(
        "gfb_statuses_total", result="failed") > failed_before, 60)
    loop.wait("the status queue to drain", lambda: loop.metric("gfb_status_queue_depth") == 0, 60)
    accepted = loop.metric("gfb_hook_requests_total", outcome="accepted")
    events = loop.metric("gfb_events_total")
    down = time.monotonic() - stopped

    restarted, restarted_wall = time.monotonic(), time.time()
    loop.gitea.start()
    loop.timings["gitea restart"] = time.monotonic() - restarted
    history = loop.wait_status(sha, "apps", "success", 60)
    loop.timings["gitea back -> missing success (resync)"] = time.monotonic() - restarted
    print(f"  gitea down {down:.1f}s; apps on {sha[:12]}: {_history(history)}")
    # No push (and no webhook) brought it ...
    assert loop.metric("gfb_hook_requests_total", outcome="accepted") == accepted
    assert loop.gitea.api("GET", f"/repos/{ORG}/{REPO}/branches/main")["commit"]["id"] == sha
    # ... the resync did: after the bridge gave the success up, a round found it missing and
    # queued it again (while Gitea was still down, its retries then reach the restarted Gitea).
    given_up = [r for r in loop.bridge.records("commit status not posted")
                if r.get("commit") == sha and r.get("context") == context("apps")]
    assert given_up, "the bridge never gave up the success while Gitea was down"
    rounds = [r for r in loop.bridge.records("resync done") if r["unix"] >= given_up[0]["unix"]]
    assert any(r.get("statuses", 0) >= 1 for r in rounds), rounds
    late_events = loop.metric("gfb_events_total") - events
    print(f"  resync rounds after the give-up: "
          f"{[(round(r['unix'] - restarted_wall, 1), r.get('statuses')) for r in rounds]} "
          f"(s relative to the restart, statuses queued); Flux events since the queue drained: "
          f"{late_events:g}")


def test_notify_action_waits_for_the_real_outcome(loop: Loop) -> None:
    """The composite action's script drives the deploy alone (the webhook is off meanwhile)."""
    hook = "/hook/" + sig.hook_digest(loop.actions_token, "actions", NS)
    loop.gitea.set_hook_active(ORG, REPO, loop.hook_id, False)
    try:
        sha = loop.push({APPS_FILE: configmap("apps-settings", APPS_NS, release="4")},
                        "apps: release 4")
        started = time.monotonic()
        result = _notify(loop, hook, sha, [APPS_FILE], wait=180)
        loop.timings["notify.sh push -> exit (wait for Ready)"] = time.monotonic() - started
        print("  notify.sh stderr:\n    " + "\n    ".join(result.stderr.splitlines()[-12:]))
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
        assert "deployed: every target is Ready" in result.stderr
        # Ready at the commit when the script said so; kustomize-controller may be in a second
        # run for the bridge's annotation (it had started by itself on the new revision too).
        assert loop.configmap_data(APPS_NS, "apps-settings") == {"release": "4"}
        loop.wait("apps Ready at the commit", lambda: loop.deployed("apps", sha), 60)
        loop.wait_status(sha, "apps", "success")

        # A broken build: the script reports the failure (exit 1), not just "accepted".
        broken = loop.push({BROKEN_FILE: "kind: [\n"}, "infra: broken again")
        result = _notify(loop, hook, broken, [BROKEN_FILE], wait=180)
        print("  notify.sh stderr:\n    " + "\n    ".join(result.stderr.splitlines()[-8:]))
        assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
        assert "deployment failed" in result.stderr
        fixed = loop.push({BROKEN_FILE: None}, "infra: remove the broken manifest again")
        result = _notify(loop, hook, fixed, [BROKEN_FILE], wait=180)
        assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    finally:
        loop.gitea.set_hook_active(ORG, REPO, loop.hook_id, True)


def test_lead_time_histogram_has_observations(loop: Loop) -> None:
    # A push of its own, so the test holds in any order: its deploy adds an observation.
    def observations() -> float:
        return metric_value(loop.bridge.metrics(), "gfb_push_to_ready_seconds_count",
                            {"cluster": CLUSTER})

    before = observations()
    loop.push({APPS_FILE: configmap("apps-settings", APPS_NS,
                                    release=f"lead-{secrets.token_hex(3)}")}, "apps: lead time")
    loop.wait("the push's lead time to be observed", lambda: observations() > before or None,
              DEPLOY_TIMEOUT)
    loop.wait("an event from notification-controller", lambda: metric_value(
        loop.bridge.metrics(), "gfb_events_total", {"outcome": "accepted"}) > 0 or None, 60)
    loop.wait("a status posted", lambda: metric_value(
        loop.bridge.metrics(), "gfb_statuses_total", {"result": "posted"}) > 0 or None, 60)
    text = loop.bridge.metrics()
    count = metric_value(text, "gfb_push_to_ready_seconds_count", {"cluster": CLUSTER})
    total = metric_value(text, "gfb_push_to_ready_seconds_sum", {"cluster": CLUSTER})
    print(f"  gfb_push_to_ready_seconds: {count:g} observations, mean "
          f"{total / count if count else 0:.1f}s")
    assert count >= 1, text
    assert metric_value(text, "gfb_events_total", {"outcome": "accepted"}) > 0, \
        "notification-controller's generic-hmac Provider reached /events"
    assert metric_value(text, "gfb_statuses_total", {"result": "posted"}) > 0


# -- helpers -----------------------------------------------------------------------------------------


def _changed(value: str | None, before: str | None) -> str | None:
    return value if value and value != before else None


def _settled(delivery: dict[str, Any]) -> dict[str, Any] | None:
    return delivery if delivery.get("final") else None


def _notify(loop: Loop, hook: str, sha: str, paths: list[str], *, wait: int
            ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "FLUX_BRIDGE_"))}
    env.update({
        "FLUX_BRIDGE_URL": loop.bridge.url, "FLUX_BRIDGE_HOOK": hook,
        "FLUX_BRIDGE_TOKEN": loop.actions_token, "FLUX_BRIDGE_WAIT": str(wait),
        "FLUX_BRIDGE_REPOSITORY": f"{loop.gitea.url}/{ORG}/{REPO}",
        "FLUX_BRIDGE_REF": "refs/heads/main", "FLUX_BRIDGE_SHA": sha,
        "FLUX_BRIDGE_PATHS": "\n".join(paths), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
    })
    return subprocess.run(["bash", str(NOTIFY)], capture_output=True, text=True, env=env,
                          timeout=wait + 60, check=False)
