"""Many replicas, one truth (issue 9), end to end: several bridge processes behind a round-robin
proxy, with a real kube-apiserver, real Flux controllers and a real Gitea.

One environment serves the module (`replicas` fixture): etcd + kube-apiserver with an audit log
of every patch/update of Flux objects (`tests.e2e.realk8s`), Gitea with SQLite, source-, kustomize-
and notification-controller (`tests.e2e.e2e_harness`), REPLICAS `gitea-flux-bridge serve` processes
with one configuration, running as the chart's ServiceAccount (RBAC rendered by the real helm),
and nginx in front of them as a Service without affinity would be (`tests.e2e.proxy_harness`:
round robin, no retry on another upstream, unbuffered streams). notification-controller's
Provider and the CI steps go through the proxy; a test that must reach one replica goes to it
directly.

Gitea holds `platform/fleet`. Three corners of it keep the tests apart, so that they pass in any
order and each can count what it caused:
- branch `main`: GitRepository `fleet` + Kustomization `apps` (Receiver `actions`, generic):
  the notify-flux action's deploys, and the object Flux events are written for;
- branch `replay`: GitRepository `replay` + Kustomization `replay` (Receivers `replay-actions`,
  generic, and `replay-gitea`, Gitea webhooks): replays, counted in the audit log;
- branch `rollout`: GitRepository `rollout` (Receiver `rollout`, generic): the push stream of
  the rolling restart.
Commit statuses from the tests' own events go to commits on branches of their own, which Flux
never deploys, so only those events decide what Gitea shows for them.

The tests: the harness itself (round robin, one resync leader); Flux events for one commit
sent to alternating replicas; the notify-flux action through the proxy, alone and with a kill -9
of the replica that took its push; a replayed timestamped push and a repeated X-Gitea-Delivery
sent to the other replica (annotations and the audit log's PATCH count unchanged); a rolling
restart under a steady stream of signed pushes (lost pushes: 0), and one with a job waiting.
Every test prints a table of what it sent where and what was answered (run with -s to see it).

    python -m pytest tests/e2e/test_e2e_replicas.py -q -s
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import secrets
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver import signatures as sig
from tests import gitea_payloads
from tests.e2e import e2e_env as e2e
from tests.e2e.e2e_harness import (
    BridgeProcess,
    FluxControllers,
    Gitea,
    chart_service_account,
)
from tests.e2e.proxy_harness import RoundRobinProxy, nginx_binary, table, upstream_port
from tests.e2e.realk8s import ROOT, ControlPlane, ControlPlaneError, audit_policy, wait_until

pytestmark = pytest.mark.e2e

REPLICAS = 2
ORG, REPO = "platform", "fleet"
CLUSTER = "eu-west"
NS = e2e.FLUX_NS
RELEASE = "gfb"  # the chart release whose ServiceAccount and RBAC the replicas run with
LEASE = "gfb-replicas-resync"
APPS_NS, REPLAY_NS = "eu-west-apps", "eu-west-replay"
APPS_PATH, REPLAY_PATH = "clusters/eu-west/apps", "clusters/eu-west/replay"
APPS_FILE, REPLAY_FILE = f"{APPS_PATH}/settings.yaml", f"{REPLAY_PATH}/settings.yaml"
NOTIFY = ROOT / ".gitea" / "actions" / "notify-flux" / "notify.sh"
BRIDGE_ANNOTATION_PREFIX = "gitea-flux-bridge.io/"  # the bridge's own annotations

# Receiver -> (Flux type, branch, the objects it lists)
RECEIVERS = {
    "actions": ("generic", "main", [("GitRepository", "fleet"), ("Kustomization", "apps")]),
    "replay-actions": ("generic", "replay",
                       [("GitRepository", "replay"), ("Kustomization", "replay")]),
    "replay-gitea": ("github", "replay",
                     [("GitRepository", "replay"), ("Kustomization", "replay")]),
    "rollout": ("generic", "rollout", [("GitRepository", "rollout")]),
}

DEPLOY_TIMEOUT = 120.0
STATUS_TIMEOUT = 20.0  # an event accepted -> its status in Gitea (normally well under 1 s)
SETTLE_TIMEOUT = 120.0
PUSH_RATE = 5.0  # pushes per second during the rolling restart
MAX_PUSHES = 600  # the stream's hard bound (two minutes at PUSH_RATE)
PUSH_ATTEMPTS = 5  # a sender's tries for one push; only 503 is retried
LAG_PUSHES = 5  # pushes the proxy still sends to a replica after its SIGTERM (endpoint lag)


def context(name: str) -> str:
    return e2e.status_context(CLUSTER, "Kustomization", NS, name)


configmap = e2e.configmap_yaml


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- the environment -------------------------------------------------------------------------------


@dataclass
class Replicas(e2e.InNamespace, e2e.Waiting):
    plane: ControlPlane
    gitea: Gitea
    flux: FluxControllers
    proxy: RoundRobinProxy
    workdir: Path
    kubeconfig: Path
    bridge_user: str
    bridge_config: dict[str, Any]
    tokens: dict[str, str]  # receiver name -> token; "events" -> the Provider's HMAC key
    replicas: list[BridgeProcess] = field(default_factory=list)
    retired: list[BridgeProcess] = field(default_factory=list)  # stopped or being stopped
    names: dict[int, str] = field(default_factory=dict)  # port -> r1, r2, ...
    heads: dict[str, str] = field(default_factory=dict)  # branch -> the commit Flux deployed
    timings: dict[str, float] = field(default_factory=dict)
    _serial: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    # -- replicas --------------------------------------------------------------------------------

    def spawn(self, min_receivers: int = len(RECEIVERS)) -> BridgeProcess:
        """A new replica on a new port (not yet behind the proxy: see `publish`)."""
        name = f"r{next(self._serial)}"
        workdir = self.workdir / "replicas" / name
        workdir.mkdir(parents=True)
        bridge = BridgeProcess(self.bridge_config, self.kubeconfig, workdir)
        self.names[bridge.port] = name
        started = time.monotonic()
        bridge.start(min_receivers)
        print(f"  replica {name} on :{bridge.port} ready in {time.monotonic() - started:.1f}s")
        return bridge

    def publish(self) -> None:
        """The proxy's upstreams := the current replicas (a Service's endpoints update)."""
        self.proxy.set_upstreams(b.port for b in self.replicas)

    def retire(self, bridge: BridgeProcess) -> None:
        self.replicas.remove(bridge)
        self.retired.append(bridge)

    def name(self, port: int | None) -> str:
        return self.names.get(port, "-") if port is not None else "-"

    def by_port(self, port: int | None) -> BridgeProcess | None:
        return next((b for b in self.replicas if b.port == port), None)

    # -- Kubernetes ------------------------------------------------------------------------------

    def annotations(self, kind: str, name: str) -> dict[str, str]:
        """The reconcile request and the bridge's own annotations of an object."""
        found = super().annotations(kind, name)
        return {k: v for k, v in found.items()
                if k == e2e.RECONCILE or k.startswith(BRIDGE_ANNOTATION_PREFIX)}

    def patches(self, kind: str, name: str) -> int:
        """PATCH requests the replicas' ServiceAccount made on the object (audit log)."""
        api_version, plural = e2e.FLUX_KINDS[kind]
        return self.plane.count_patches(self.bridge_user, api_version.split("/")[0], plural,
                                        NS, name)

    def ready_at(self, kind: str, name: str, sha: str) -> dict[str, Any] | None:
        obj = self.get(kind, name)
        status = obj.get("status") or {}
        ready = e2e.condition(obj, "Ready")
        revision = ((status.get("artifact") or {}).get("revision") if kind == "GitRepository"
                    else status.get("lastAppliedRevision"))
        if str(revision or "").endswith(f"sha1:{sha}") and ready.get("status") == "True":
            return obj
        return None

    # -- Gitea -----------------------------------------------------------------------------------

    def repository_url(self) -> str:
        return f"{self.gitea.url}/{ORG}/{REPO}"

    def latest_status(self, sha: str, ctx: str) -> dict[str, Any] | None:
        found = e2e.context_history(self.gitea, ORG, REPO, sha, ctx)
        return found[-1] if found else None

    # -- HTTP ------------------------------------------------------------------------------------

    def hook(self, receiver: str) -> str:
        return e2e.hook_path(self.tokens[receiver], receiver, NS)

    def delivery(self, base_url: str, delivery_id: str, receiver: str) -> tuple[int, dict[str, Any]]:
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            response = client.get(f"{base_url}/deliveries/{delivery_id}",
                                  headers={"Authorization": f"Bearer {self.tokens[receiver]}"})
        try:
            body = response.json()
        except ValueError:
            body = {"raw": response.text[:200]}
        return response.status_code, body if isinstance(body, dict) else {"body": body}

    def diagnostics(self) -> list[str]:
        return [*(b.tail(20) for b in self.replicas), self.flux.logs(10), self.proxy.tail(10)]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    nginx = nginx_binary()
    if nginx is None:
        pytest.fail("nginx is not installed (the round-robin proxy in front of the replicas; "
                    "Debian: apt-get install nginx)")
    module_started = time.monotonic()
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("replicas")

    with e2e.stopping() as teardown:
        plane, gitea, flux = e2e.start_peers(workdir, teardown, timings, NS, APPS_NS, REPLAY_NS,
                                             audit_policy=audit_policy())
        with e2e.timed(timings, "chart RBAC (the replicas' ServiceAccount)"):
            bridge_user, bridge_token = chart_service_account(
                plane, RELEASE, NS, "--set", f"config.statuses.lease_name={LEASE}")
            kubeconfig = plane.write_kubeconfig(workdir / "bridge-kubeconfig.yaml", bridge_token,
                                                user=bridge_user)
        gitea.create_org(ORG)
        gitea.create_repo(ORG, REPO, private=True)

        tokens = {name: secrets.token_hex(16) for name in (*RECEIVERS, "events")}
        config = e2e.bridge_config(CLUSTER, gitea, tokens["events"], workdir, statuses={
            "resync_interval_seconds": 5, "max_attempts": 3, "lease_duration_seconds": 15,
            "lease_name": LEASE})
        with e2e.timed(timings, f"{REPLICAS} bridge replicas + nginx"):
            proxy = RoundRobinProxy(nginx, workdir / "nginx", [])
            env = Replicas(plane, gitea, flux, proxy, workdir, kubeconfig, bridge_user, config,
                           tokens, timings=timings)
            teardown.append(lambda: _stop_replicas(env))
            env.replicas = [env.spawn(min_receivers=0) for _ in range(REPLICAS)]
            proxy.upstreams = [b.port for b in env.replicas]
            proxy.start()
            teardown.append(proxy.stop)

        with e2e.timed(timings, "fleet: objects, first deploys"):
            _make_fleet(env)
        timings["environment total"] = time.monotonic() - module_started
        e2e.print_timings("replicas environment up", timings)
        print(f"  replicas: {', '.join(f'{env.name(b.port)}=:{b.port}' for b in env.replicas)}; "
              f"proxy {proxy.url}; bridge user {bridge_user}")
        yield env
        print(f"\n=== replicas module total {time.monotonic() - module_started:.1f}s ===")


@pytest.fixture(autouse=True)
def _all_replicas_ready(request: pytest.FixtureRequest) -> None:
    """Before each test: every current replica ready and behind the proxy (a test that failed
    half-way through a rollout leaves a consistent set behind)."""
    if "replicas" not in request.fixturenames:
        return
    env: Replicas = request.getfixturevalue("replicas")
    for bridge in list(env.replicas):
        if bridge.exited() is not None or not bridge.ready():
            env.retire(bridge)
            bridge.stop()
    while len(env.replicas) < REPLICAS:
        env.replicas.append(env.spawn())
    if sorted(env.proxy.upstreams) != sorted(b.port for b in env.replicas):
        env.publish()


def _stop_replicas(env: Replicas) -> None:
    for bridge in [*env.replicas, *env.retired]:
        bridge.stop()


def _make_fleet(env: Replicas) -> None:
    """Repository layout, branches, Flux objects and Receivers; waits for the first deploys."""
    gitea = env.gitea
    main = gitea.commit_files(ORG, REPO, {
        APPS_FILE: configmap("apps-settings", APPS_NS, release="1"),
        REPLAY_FILE: configmap("replay-settings", REPLAY_NS, run="0"),
    }, "fleet: apps and replay")
    env.heads["main"] = main
    for branch in ("replay", "rollout"):
        env.heads[branch] = gitea.commit_files(
            ORG, REPO, {f"{branch}.txt": f"{branch}\n"}, f"{branch}: start", new_branch=branch)
    env.secret("gitea-auth", {"username": gitea.admin, "password": gitea.token})
    for name in RECEIVERS:
        env.secret(f"{name}-token", {"token": env.tokens[name]})
    # Events go through the proxy, as to a Service.
    e2e.alert_to_bridge(env.plane, NS, f"{env.proxy.url}/events", env.tokens["events"],
                        ["GitRepository", "Kustomization"])
    for name, branch in (("fleet", "main"), ("replay", "replay"), ("rollout", "rollout")):
        e2e.git_repository(env.plane, NS, name, gitea.clone_url(ORG, REPO), branch=branch)
    for name, source, path in (("apps", "fleet", APPS_PATH), ("replay", "replay", REPLAY_PATH)):
        e2e.kustomization(env.plane, NS, name, f"./{path}", source=("GitRepository", source))
    for name, (rtype, _, listed) in RECEIVERS.items():
        e2e.receiver(env.plane, NS, name, rtype, f"{name}-token", listed,
                     events=["push"] if rtype == "github" else None)
    for bridge in env.replicas:
        bridge.wait_receivers(len(RECEIVERS))
    for kind, name, branch in (("Kustomization", "apps", "main"),
                               ("Kustomization", "replay", "replay"),
                               ("GitRepository", "rollout", "rollout")):
        sha = env.heads[branch]
        env.wait(f"first deploy of {kind} {name}", lambda k=kind, n=name, s=sha: env.ready_at(k, n, s),
                 DEPLOY_TIMEOUT)


# -- 0. the environment itself ----------------------------------------------------------------------


def test_replicas_share_the_cluster_behind_a_round_robin_proxy(replicas: Replicas) -> None:
    """The harness: every replica ready behind the proxy, plain round robin, one resync leader."""
    env = replicas
    started = time.time()
    seen = []
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        for i in range(3 * len(env.replicas)):
            response = client.get(f"{env.proxy.url}/readyz", headers={"X-Test-Id": f"ready-{i}"})
            seen.append((i, response.status_code, env.name(upstream_port(
                {"upstream": response.headers.get("x-upstream", "")}))))
    print("  GET /readyz through the proxy:")
    print(table(seen, ["#", "answer", "replica"]))
    assert all(status == 200 for _, status, _ in seen), seen
    # Round robin (notification-controller's events share the proxy, so not strictly
    # alternating here): every replica answers some of them.
    counts = Counter(name for _, _, name in seen)
    assert set(counts) == {env.name(b.port) for b in env.replicas}, counts
    logged = env.proxy.requests(since=started - 1, uri_prefix="/readyz")
    assert [r["test_id"] for r in logged] == [f"ready-{i}" for i, _, _ in seen], logged
    # No request was ever passed on to a second upstream: a client sees what one replica said.
    assert not [r for r in env.proxy.requests() if "," in str(r.get("upstream", ""))]

    # The resync Lease: held by exactly one live replica.
    lease = env.wait("the resync Lease to be held", lambda: _lease_holder(env), 30)
    leaders = env.wait("a replica to run the resync", lambda: [
        env.name(b.port) for b in env.replicas
        if any(r["unix"] >= started for r in b.records("resync done"))] or None, 30)
    print(f"  Lease {NS}/{LEASE}: holder {lease}; replicas running the resync: {leaders}")
    assert len(leaders) == 1, leaders


def _lease_holder(env: Replicas) -> str | None:
    found = env.plane.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEASE}",
                              ok=(200, 404))
    holder = (found.get("spec") or {}).get("holderIdentity")
    return str(holder) if holder else None


# -- a. events for one commit at alternating replicas ------------------------------------------------


EVENT_ORDERS = {
    "failure-via-B-then-success-via-A": [("B", "failure"), ("A", "success"),
                                         ("B", "failure"), ("A", "success")],
    "failure-via-A-then-success-via-B": [("A", "failure"), ("B", "success"),
                                         ("A", "failure"), ("B", "success")],
}


def flux_event(state: str, sha: str) -> bytes:
    """A Kustomization event as notification-controller forwards it (generic-hmac Provider)."""
    if state == "success":
        severity, reason = "info", "ReconciliationSucceeded"
        message = "Reconciliation finished in 1.2s, next run in 1h0m0s"
    else:
        severity, reason = "error", "HealthCheckFailed"
        message = ("Health check failed after 29.9s: timeout waiting for: "
                   f"[Deployment/{APPS_NS}/web status: 'InProgress']")
    return json.dumps({
        "involvedObject": {"kind": "Kustomization", "namespace": NS, "name": "apps",
                           "apiVersion": "kustomize.toolkit.fluxcd.io/v1",
                           "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, "apps"))},
        "severity": severity, "timestamp": now_rfc3339(), "message": message, "reason": reason,
        "metadata": {"revision": f"main@sha1:{sha}"},
        "reportingController": "kustomize-controller",
        "reportingInstance": "kustomize-controller-e2e",
    }).encode()


@pytest.mark.parametrize("order", list(EVENT_ORDERS))
def test_events_at_alternating_replicas_leave_gitea_showing_the_latest(
        replicas: Replicas, order: str) -> None:
    env = replicas
    targets = {"A": env.replicas[0], "B": env.replicas[1]}
    # A commit of its own that Flux never deploys: only these events speak about it.
    sha = env.gitea.commit_files(ORG, REPO, {"events.txt": f"{order} {secrets.token_hex(4)}\n"},
                                 f"events: {order}", new_branch=f"events-{secrets.token_hex(4)}")
    ctx = context("apps")
    rows: list[tuple[Any, ...]] = []
    failure = ""
    for step, (label, state) in enumerate(EVENT_ORDERS[order], 1):
        bridge = targets[label]
        body = flux_event(state, sha)
        signature = "sha256=" + hmac.new(env.tokens["events"].encode(), body,
                                         hashlib.sha256).hexdigest()
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            response = client.post(f"{bridge.url}/events", content=body, headers={
                "Content-Type": "application/json", "X-Signature": signature})
        answer = f"{response.status_code} {response.text.strip()[:40]}"
        if response.status_code != 202:
            rows.append((step, f"{label}={env.name(bridge.port)}", state, answer, "-"))
            failure = f"event {step} ({state} via replica {label}) was answered {answer}"
            break

        def shows(expected: str = state) -> dict[str, Any] | None:
            latest = env.latest_status(sha, ctx)
            return latest if latest and latest.get("status") == expected else None

        try:
            wait_until(f"Gitea to show {state}", shows, STATUS_TIMEOUT, interval=0.2)
            shown = state
        except ControlPlaneError:
            latest = env.latest_status(sha, ctx)
            shown = str(latest.get("status")) if latest else "(nothing)"
        rows.append((step, f"{label}={env.name(bridge.port)}", state, answer, shown))
        if shown != state:
            history = e2e.described(e2e.context_history(env.gitea, ORG, REPO, sha, ctx))
            failure = (f"after event {step} ({state} via replica {label}), Gitea still shows "
                       f"{shown!r} for {ctx} on {sha[:12]} ({STATUS_TIMEOUT:g}s later); "
                       f"history: {history}")
            break
    print(f"  events for {sha[:12]} ({order}), each sent straight to one replica:")
    print(table(rows, ["#", "replica", "event", "answer", "Gitea shows"]))
    assert not failure, failure


# -- b. the notify-flux action through the proxy -------------------------------------------------------


def _notify(env: Replicas, sha: str, paths: list[str], workdir: Path, *, wait: int
            ) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """notify.sh against the proxy, in the background; (process, stdout file, stderr file)."""
    run_env = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "LANG") if k in os.environ}
    run_env.update({
        "FLUX_BRIDGE_URL": env.proxy.url, "FLUX_BRIDGE_HOOK": env.hook("actions"),
        "FLUX_BRIDGE_TOKEN": env.tokens["actions"], "FLUX_BRIDGE_WAIT": str(wait),
        "FLUX_BRIDGE_REPOSITORY": env.repository_url(), "FLUX_BRIDGE_REF": "refs/heads/main",
        "FLUX_BRIDGE_SHA": sha, "FLUX_BRIDGE_PATHS": "\n".join(paths),
        "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
    })
    workdir.mkdir(parents=True, exist_ok=True)
    out, err = workdir / "notify.out", workdir / "notify.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(["bash", str(NOTIFY)], env=run_env, stdout=stdout, stderr=stderr,
                                stdin=subprocess.DEVNULL, cwd=ROOT)
    return proc, out, err


def _job_requests(env: Replicas, since: float) -> list[dict[str, Any]]:
    hook = env.hook("actions")
    return [r for r in env.proxy.requests(since=since)
            if r["uri"].startswith(hook) or r["uri"].startswith("/deliveries/")]


def _print_job(env: Replicas, since: float, notes: dict[int, str] | None = None) -> None:
    rows = []
    for r in _job_requests(env, since):
        path = r["uri"].split("?")[0]
        what = "push" if path.startswith("/hook/") else "follow" + (
            " ?wait" if "wait=" in r["uri"] else "")
        port = upstream_port(r)
        rows.append((f"{float(r['t']) - since:6.1f}s", r["method"], what, env.name(port),
                     r["status"], f"{float(r['seconds']):.1f}s", (notes or {}).get(port or 0, "")))
    print("  the job's requests through the proxy (logged when answered):")
    print(table(rows, ["ended", "method", "what", "replica", "answer", "took", ""]))


def _every_replica_answers(env: Replicas, delivery_id: str) -> list[tuple[str, int, str]]:
    answers = []
    for bridge in env.replicas:
        status, body = env.delivery(bridge.url, delivery_id, "actions")
        answers.append((env.name(bridge.port), status, str(body.get("outcome", body.get("error")))))
    return answers


def test_notify_action_waits_through_the_proxy(replicas: Replicas, tmp_path: Path) -> None:
    env = replicas
    since = time.time()
    sha = env.gitea.commit_files(ORG, REPO, {
        APPS_FILE: configmap("apps-settings", APPS_NS, release=secrets.token_hex(3))},
        "apps: a release notify-flux waits for")
    proc, out, err = _notify(env, sha, [APPS_FILE], tmp_path, wait=150)
    try:
        code = proc.wait(timeout=210)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.read_text(errors="replace")
    _print_job(env, since)
    print("  notify.sh stderr:\n    " + "\n    ".join(stderr.splitlines()[-8:]))
    assert code == 0, f"notify.sh exited {code}:\n{stderr}"
    assert "deployed: every target is Ready" in stderr, stderr
    delivery_id = _delivery_of(out)
    # Any replica gives the same answer, not only the one that took the push.
    answers = _every_replica_answers(env, delivery_id)
    print("  GET /deliveries/<id> on every replica directly:")
    print(table(answers, ["replica", "answer", "outcome"]))
    assert all(status == 200 and outcome == "ready" for _, status, outcome in answers), (
        f"GET /deliveries/<id> must give the same answer on every replica: {answers}")
    follows = [r for r in _job_requests(env, since) if r["uri"].startswith("/deliveries/")]
    assert all(r["status"] == 200 for r in follows), (
        "a replica answered the job's follow request with something other than 200: "
        f"{[(env.name(upstream_port(r)), r['status']) for r in follows]}")


def test_notify_action_survives_kill_9_of_the_replica_that_accepted_the_push(
        replicas: Replicas, tmp_path: Path) -> None:
    env = replicas
    since = time.time()
    notes: dict[int, str] = {}
    # kustomize-controller is frozen until the accepting replica is gone: the job is still
    # waiting when it dies.
    env.flux.pause("kustomize-controller")
    proc: subprocess.Popen[bytes] | None = None
    try:
        sha = env.gitea.commit_files(ORG, REPO, {
            APPS_FILE: configmap("apps-settings", APPS_NS, release=secrets.token_hex(3))},
            "apps: a release whose replica dies")
        proc, out, err = _notify(env, sha, [APPS_FILE], tmp_path, wait=150)
        env.wait("the job to be accepted and waiting", lambda: (
            "accepted as delivery" in err.read_text(errors="replace") or proc.poll() is not None),
            30)
        assert proc.poll() is None, f"notify.sh ended early:\n{err.read_text()}"
        pushes = [r for r in _job_requests(env, since) if r["method"] == "POST"]
        assert pushes and pushes[-1]["status"] == 202, pushes
        victim = env.by_port(upstream_port(pushes[-1]))
        assert victim is not None, pushes
        env.wait("source-controller to fetch the commit",
                 lambda: env.ready_at("GitRepository", "fleet", sha), 60)
        victim.kill()
        notes[victim.port] = "killed (-9) after accepting the push"
        env.retire(victim)
        env.publish()  # its endpoint goes away
        replacement = env.spawn()
        env.replicas.append(replacement)
        env.publish()
        notes[replacement.port] = "replacement"
        print(f"  killed {env.name(victim.port)} (-9); replacement {env.name(replacement.port)}")
    finally:
        env.flux.resume("kustomize-controller")
    try:
        code = proc.wait(timeout=210)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err.read_text(errors="replace")
    _print_job(env, since, notes)
    print("  notify.sh stderr:\n    " + "\n    ".join(stderr.splitlines()[-10:]))
    assert code == 0, f"notify.sh exited {code} after the kill -9:\n{stderr}"
    assert "deployed: every target is Ready" in stderr, stderr
    answers = _every_replica_answers(env, _delivery_of(out))
    print("  GET /deliveries/<id> on every live replica directly:")
    print(table(answers, ["replica", "answer", "outcome"]))
    assert all(status == 200 and outcome == "ready" for _, status, outcome in answers), (
        f"GET /deliveries/<id> must give the same answer on every live replica: {answers}")


def _delivery_of(stdout: Path) -> str:
    for line in stdout.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and doc.get("delivery"):
                    return str(doc["delivery"])
    raise AssertionError(f"notify.sh printed no delivery:\n{stdout.read_text()}")


# -- c. replays sent to the other replica --------------------------------------------------------------


REPLAYED = [("GitRepository", "replay"), ("Kustomization", "replay")]


def _replay_request(env: Replicas, how: str, sha: str) -> tuple[str, str, bytes, dict[str, str]]:
    """(receiver, hook path, body, headers) of one signed push of `sha` to branch replay."""
    if how == "timestamped-signature":
        receiver = "replay-actions"
        body = json.dumps({"repository": env.repository_url(), "ref": "refs/heads/replay",
                           "sha": sha, "paths": [REPLAY_FILE]}).encode()
        headers = {"Content-Type": "application/json",
                   "X-Signature": sig.sign_timestamped(env.tokens[receiver], body, int(time.time()))}
    else:
        receiver = "replay-gitea"
        root = env.gitea.url + "/"
        commit = gitea_payloads.commit(f"{ORG}/{REPO}", "replay: run", modified=[REPLAY_FILE],
                                       root=root)
        commit["id"] = sha
        doc = gitea_payloads.push(f"{ORG}/{REPO}", "refs/heads/replay", commits=[commit],
                                  after=sha, root=root)
        body = gitea_payloads.gitea_bytes(doc)
        signature = hmac.new(env.tokens[receiver].encode(), body, hashlib.sha256).hexdigest()
        headers = {"Content-Type": "application/json", "X-Gitea-Event": "push", "X-GitHub-Event": "push",
                   "X-Gitea-Delivery": str(uuid.uuid4()), "X-Gitea-Signature": signature,
                   "X-Hub-Signature-256": f"sha256={signature}"}
    return receiver, env.hook(receiver), body, headers


def _snapshot(env: Replicas) -> dict[str, tuple[int, dict[str, str]]]:
    return {f"{kind}/{name}": (env.patches(kind, name), env.annotations(kind, name))
            for kind, name in REPLAYED}


def _settled(env: Replicas, bridge: BridgeProcess, delivery_id: str, receiver: str
             ) -> dict[str, Any] | None:
    status, body = env.delivery(bridge.url, delivery_id, receiver)
    return body if status == 200 and body.get("final") else None


@pytest.mark.parametrize("how", ["timestamped-signature", "x-gitea-delivery"])
def test_replay_sent_to_the_other_replica_annotates_nothing(replicas: Replicas, how: str) -> None:
    env = replicas
    first, other = env.replicas[0], env.replicas[1]
    sha = env.gitea.commit_files(ORG, REPO, {
        REPLAY_FILE: configmap("replay-settings", REPLAY_NS, run=secrets.token_hex(3))},
        f"replay: {how}", branch="replay")
    receiver, hook, body, headers = _replay_request(env, how, sha)
    rows: list[tuple[Any, ...]] = []

    before_first = _snapshot(env)
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        answer = client.post(first.url + hook, content=body, headers=headers)
    rows.append(("original", env.name(first.port), answer.status_code,
                 answer.json().get("status", "") if answer.status_code == 200 else ""))
    assert answer.status_code == 202, answer.text
    delivery_id = str(answer.json()["delivery"])
    env.wait(f"the original delivery to settle on {env.name(first.port)}",
             lambda: _settled(env, first, delivery_id, receiver), SETTLE_TIMEOUT)
    env.wait("Kustomization replay Ready at the commit",
             lambda: env.ready_at("Kustomization", "replay", sha), DEPLOY_TIMEOUT)
    before = _snapshot(env)
    source = "GitRepository/replay"
    assert before[source][0] > before_first[source][0], \
        f"the original push patched nothing: {before_first} -> {before}"
    assert before[source][1].get(e2e.RECONCILE) != before_first[source][1].get(e2e.RECONCILE), before

    # The same bytes and headers again, to the replica that has not seen them.
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        again = client.post(other.url + hook, content=body, headers=headers)
    reply: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        reply = again.json()
    rows.append(("replay", env.name(other.port), again.status_code,
                 str(reply.get("status") or reply.get("error") or reply.get("delivery", ""))[:40]))
    if again.status_code == 202 and reply.get("delivery"):
        # Accepted: let whatever it started finish before counting (or it may still patch).
        replay_id = str(reply["delivery"])
        env.wait(f"the replayed delivery to settle on {env.name(other.port)}",
                 lambda: _settled(env, other, replay_id, receiver), SETTLE_TIMEOUT)
    after = _snapshot(env)

    print(f"  {how}: one signed push of {sha[:12]}, then the same request to another replica:")
    print(table(rows, ["request", "replica", "answer", "detail"]))
    print(table([(obj, before[obj][0], after[obj][0],
                  "same" if before[obj][1] == after[obj][1] else "CHANGED")
                 for obj in before],
                ["object", "bridge PATCHes before replay", "after", "annotations"]))
    changed = {obj: {"patches": (before[obj][0], after[obj][0]),
                     "annotations": (before[obj][1], after[obj][1])}
               for obj in before if before[obj] != after[obj]}
    assert not changed, (f"the replay ({how}) sent to {env.name(other.port)} was answered "
                         f"{again.status_code} and annotated again: {changed}")


# -- d. a rolling restart under a steady stream of pushes ---------------------------------------------


@dataclass
class PushResult:
    index: int
    attempts: list[tuple[float, str, str]] = field(default_factory=list)  # (t, answer, replica)

    @property
    def final(self) -> str:
        return self.attempts[-1][1] if self.attempts else "not sent"

    @property
    def delivered(self) -> bool:
        return self.final.isdigit() and 200 <= int(self.final) < 300


class PushStream:
    """Signed pushes to the rollout Receiver through the proxy at a fixed rate, each retried on
    503 (and only on 503) like notify-flux does, signed afresh each time."""

    def __init__(self, env: Replicas) -> None:
        self.env = env
        self.hook = env.hook("rollout")
        self.token = env.tokens["rollout"]
        self.results: list[PushResult] = []
        self.sent = 0
        self.started = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
        self._client = httpx.Client(trust_env=False, timeout=30.0,
                                    limits=httpx.Limits(max_connections=32))
        self._thread = threading.Thread(target=self._run, name="push-stream", daemon=True)

    def start(self) -> PushStream:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        for index in range(MAX_PUSHES):
            due = self.started + index / PUSH_RATE
            # Pacing of the load generator itself (a steady rate), not a wait for a condition.
            if self._stop.wait(max(0.0, due - time.monotonic())):
                break
            result = PushResult(index)
            with self._lock:
                self.results.append(result)
                self.sent += 1
            self._pool.submit(self._push, result)

    def _push(self, result: PushResult) -> None:
        body = json.dumps({"repository": self.env.repository_url(), "ref": "refs/heads/rollout",
                           "sha": self.env.heads["rollout"],
                           "paths": [f"rollout/push-{result.index:05d}.txt"]}).encode()
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            signed_at = int(time.time())
            headers = {"Content-Type": "application/json",
                       "X-Signature": sig.sign_timestamped(self.token, body, signed_at),
                       "X-Test-Id": f"push-{result.index}-{attempt}"}
            at = time.monotonic() - self.started
            try:
                response = self._client.post(self.env.proxy.url + self.hook, content=body,
                                             headers=headers)
            except httpx.HTTPError as exc:
                result.attempts.append((at, type(exc).__name__, "-"))
                return
            replica = self.env.name(upstream_port(
                {"upstream": response.headers.get("x-upstream", "")}))
            result.attempts.append((at, str(response.status_code), replica))
            if response.status_code != 503 or attempt == PUSH_ATTEMPTS:
                return
            # A retry is signed afresh, and a signature is one per (second, body): the
            # retry goes out as soon as the clock has moved to the next second.
            wait_until("the next second, for a fresh signature",
                       lambda at=signed_at: int(time.time()) > at, 5, interval=0.05)

    def wait_sent(self, more: int, timeout: float = 60.0) -> None:
        target = self.sent + more
        wait_until(f"{more} more pushes to be sent", lambda: self.sent >= target, timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)
        self._client.close()


def rolling_restart(env: Replicas, lag: Callable[[], None], mark: Callable[[str], None]
                    ) -> list[BridgeProcess]:
    """Replace every replica, one at a time, as a Deployment's rolling update does: SIGTERM the
    old one (a pod's deletion), `lag()` while the proxy still sends it traffic (the endpoints
    lag behind the deletion), take it out of the proxy, start a new one on a new port and put
    it in once ready. Returns the terminated replicas (they end by themselves)."""
    terminated: list[BridgeProcess] = []
    for old in list(env.replicas):
        old_name = env.name(old.port)
        old.signal(signal.SIGTERM)
        terminated.append(old)
        mark(f"SIGTERM {old_name}")
        env.wait(f"{old_name} to stop being ready", lambda b=old: not b.ready(), 30)
        mark(f"{old_name} not ready")
        lag()
        env.retire(old)
        env.publish()
        mark(f"{old_name} out of the proxy")
        new = env.spawn()
        env.replicas.append(new)
        env.publish()
        mark(f"{env.name(new.port)} started, in the proxy")
        lag()
    return terminated


def wait_exited(env: Replicas, terminated: list[BridgeProcess], mark: Callable[[str], None]
                ) -> None:
    """The terminated replicas end by themselves once drained; then nothing is in flight."""
    for old in terminated:
        with contextlib.suppress(ControlPlaneError):
            wait_until(f"{env.name(old.port)} to exit", lambda b=old: b.exited() is not None, 60)
        mark(f"{env.name(old.port)} exited with {old.exited()}")


def test_rolling_restart_under_a_stream_of_pushes_loses_none(replicas: Replicas) -> None:
    env = replicas
    timeline: list[tuple[str, str]] = []
    stream = PushStream(env).start()

    def mark(what: str) -> None:
        timeline.append((f"{time.monotonic() - stream.started:6.1f}s", what))

    try:
        stream.wait_sent(10)
        # While the endpoints lag, the proxy still sends the next pushes to the old replica.
        terminated = rolling_restart(env, lambda: stream.wait_sent(LAG_PUSHES), mark)
        stream.wait_sent(10)
    finally:
        stream.stop()
        mark(f"stream stopped after {stream.sent} pushes")
    wait_exited(env, terminated, mark)

    results = stream.results
    lost = [r for r in results if not r.delivered]
    retried = [r for r in results if r.delivered and len(r.attempts) > 1]
    print("  rollout timeline:")
    print(table(timeline, ["at", "what"]))
    by_replica = Counter((replica, answer) for r in results for _, answer, replica in r.attempts)
    print("  answers per replica (every attempt, through the proxy):")
    print(table(sorted((replica, answer, count) for (replica, answer), count in by_replica.items()),
                ["replica", "answer", "attempts"]))
    outcomes = Counter((r.final, len(r.attempts)) for r in results)
    print("  pushes by final answer and attempts:")
    print(table(sorted((answer, tries, count) for (answer, tries), count in outcomes.items()),
                ["final answer", "attempts", "pushes"]))
    if lost:
        print("  lost pushes (first 15):")
        print(table([(r.index, " ".join(f"{t:.1f}s:{a}@{rep}" for t, a, rep in r.attempts))
                     for r in lost[:15]], ["push", "attempts (at:answer@replica)"]))
    print(f"  pushes: {len(results)}; 2xx at once: {len(results) - len(lost) - len(retried)}; "
          f"2xx after 503 retries: {len(retried)}; lost pushes: {len(lost)}")
    assert results and all(r.attempts for r in results)
    assert not lost, (f"lost pushes: {len(lost)} of {len(results)} (neither 2xx nor retried "
                      f"503 to a 2xx): final answers {Counter(r.final for r in lost)}")



def test_job_waiting_through_a_rolling_restart_ends_ready(replicas: Replicas, tmp_path: Path
                                                         ) -> None:
    """A CI job follows its delivery while every replica is replaced: streams on a terminating
    replica end with a line that says to ask again, and another replica gives the answer."""
    env = replicas
    since = time.time()
    started = time.monotonic()
    timeline: list[tuple[str, str]] = []

    def mark(what: str) -> None:
        timeline.append((f"{time.monotonic() - started:6.1f}s", what))

    # kustomize-controller is frozen for the whole rollout: the job waits through all of it.
    env.flux.pause("kustomize-controller")
    proc: subprocess.Popen[bytes] | None = None
    terminated: list[BridgeProcess] = []
    try:
        sha = env.gitea.commit_files(ORG, REPO, {
            APPS_FILE: configmap("apps-settings", APPS_NS, release=secrets.token_hex(3))},
            "apps: a release deployed during a rollout")
        proc, out, err = _notify(env, sha, [APPS_FILE], tmp_path, wait=150)
        env.wait("the job to be accepted and waiting", lambda: (
            "accepted as delivery" in err.read_text(errors="replace") or proc.poll() is not None),
            30)
        mark("job accepted, waiting")
        assert proc.poll() is None, f"notify.sh ended early:\n{err.read_text()}"
        terminated = rolling_restart(env, lambda: None, mark)
    finally:
        env.flux.resume("kustomize-controller")
        mark("kustomize-controller resumed")
    try:
        code = proc.wait(timeout=210)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    mark(f"job ended with exit {code}")
    wait_exited(env, terminated, mark)
    stderr = err.read_text(errors="replace")
    print("  rollout timeline:")
    print(table(timeline, ["at", "what"]))
    _print_job(env, since)
    print("  notify.sh stderr:\n    " + "\n    ".join(stderr.splitlines()[-10:]))
    assert code == 0, f"notify.sh exited {code} during a rolling restart:\n{stderr}"
    assert "deployed: every target is Ready" in stderr, stderr
    answers = _every_replica_answers(env, _delivery_of(out))
    print("  GET /deliveries/<id> on every new replica directly:")
    print(table(answers, ["replica", "answer", "outcome"]))
    assert all(status == 200 and outcome == "ready" for _, status, outcome in answers), (
        f"GET /deliveries/<id> must give the same answer on every replica: {answers}")
