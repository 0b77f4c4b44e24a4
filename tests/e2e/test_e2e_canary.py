"""Flagger canaries and a promotion gate, every peer real: Gitea push -> Flux applies -> Flagger
analyses -> the bridge shows it on the commit, holds the promotion on Gitea's statuses, and the
CI wait ends with Flagger's decision.

Peers: etcd + kube-apiserver, Gitea, source-, kustomize- and notification-controller, Flagger
v1.36.1 (`-mesh-provider kubernetes`: blue/green, no mesh) and the bridge as
`gitea-flux-bridge serve` with the chart's ServiceAccount and RBAC (canaries on), all on
127.0.0.1. Nothing runs Pods: the test plays the least of a
kubelet it can (`flagger_harness.ReadyReplicas`: it writes the Deployments' replica counts
ready through the status subresource, nothing else). Flagger's analysis calls a `rollout`
webhook the test serves (`CheckServer`: pass or fail), a `confirm-promotion` webhook on the
bridge (gate `production`: the commit must show `approve/production` success in Gitea) and an
`event` webhook on the bridge (which check failed).

The tests run in file order, as one story.

    python -m pytest tests/e2e/test_e2e_canary.py -q -x -s     (-s shows the timings)
"""

from __future__ import annotations

import functools
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e import e2e_env as e2e
from tests.e2e.e2e_harness import E2E_BINARIES, BridgeProcess, chart_service_account, e2e_peers
from tests.e2e.flagger_harness import (
    FLAGGER,
    CheckServer,
    FlaggerProcess,
    ReadyReplicas,
    install_flagger_crds,
)
from tests.e2e.realk8s import ROOT, audit_policy

pytestmark = pytest.mark.e2e

ORG, REPO = "shop", "deploy"
CLUSTER = "staging-eu"
NS = e2e.FLUX_NS
APP_NS = "shop"
APP_PATH = "apps/shop"
NOTIFY = ROOT / ".gitea" / "actions" / "notify-flux" / "notify.sh"
CANARY_CONTEXT = f"flagger/{CLUSTER}/{APP_NS}/podinfo"
KS_CONTEXT = e2e.status_context(CLUSTER, "Kustomization", NS, "shop")
APPROVAL = "approve/production"
LEASE = "canary-bridge-resync"
AGGREGATES = ("flux/fleet", "flux/env/staging")

DEPLOY_TIMEOUT = 120.0
CANARY_TIMEOUT = 300.0  # Flagger's analysis ticks every 10 s at the least


def deployment_yaml(release: str) -> str:
    # No `replicas`: Flagger owns the target's scale (it scales it to zero between analyses).
    return f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: podinfo
  namespace: {APP_NS}
spec:
  selector:
    matchLabels: {{app: podinfo}}
  template:
    metadata:
      labels: {{app: podinfo}}
      annotations: {{release: "{release}"}}
    spec:
      containers:
        - name: podinfo
          image: ghcr.io/stefanprodan/podinfo:6.5.0
          ports: [{{containerPort: 9898}}]
"""


def canary_yaml(check_url: str, bridge_url: str, token: str) -> str:
    return f"""apiVersion: flagger.app/v1beta1
kind: Canary
metadata:
  name: podinfo
  namespace: {APP_NS}
spec:
  provider: kubernetes
  targetRef: {{apiVersion: apps/v1, kind: Deployment, name: podinfo}}
  progressDeadlineSeconds: 600
  service: {{port: 9898}}
  analysis:
    interval: 10s
    threshold: 1
    iterations: 2
    webhooks:
      - name: load-check
        type: rollout
        url: {check_url}
        timeout: 5s
      - name: production-gate
        type: confirm-promotion
        url: {bridge_url}/flagger/gates/production
        metadata: {{token: "{token}"}}
      - name: bridge-events
        type: event
        url: {bridge_url}/flagger/events
        metadata: {{token: "{token}"}}
"""


@dataclass
class Canaries(e2e.BridgeEnv):
    workdir: Path
    actions_token: str
    flagger: FlaggerProcess
    checks: CheckServer
    kubelet: ReadyReplicas
    bridge_user: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)

    def diagnostics(self) -> list[str]:
        return [*super().diagnostics(), self.flagger.tail(30)]

    def canary(self) -> dict[str, Any]:
        return self.plane.request(
            "GET", f"/apis/flagger.app/v1beta1/namespaces/{APP_NS}/canaries/podinfo")

    def phase(self, *phases: str) -> dict[str, Any] | None:
        found = self.canary()
        return found if (found.get("status") or {}).get("phase") in phases else None

    def push(self, files: dict[str, str | None], message: str) -> str:
        return e2e.push(self.gitea, ORG, REPO, files, message)

    def history(self, sha: str, context: str = CANARY_CONTEXT) -> list[dict[str, Any]]:
        return e2e.context_history(self.gitea, ORG, REPO, sha, context)

    def wait_status(self, sha: str, context: str, state: str, timeout: float = CANARY_TIMEOUT,
                    description: str | None = None) -> list[dict[str, Any]]:
        return self.wait_state(self.gitea, ORG, REPO, sha, context, state, timeout, description)

    def deployed(self, sha: str) -> dict[str, Any] | None:
        return e2e.applied_at(self.get("Kustomization", "shop"), f"main@sha1:{sha}")

    def notify(self, sha: str, wait: int) -> subprocess.Popen[str]:
        """The notify-flux action's script, waiting for the canary too (wait-for-canaries)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GITHUB_", "FLUX_BRIDGE_"))}
        env.update({
            "FLUX_BRIDGE_URL": self.bridge.url,
            "FLUX_BRIDGE_HOOK": e2e.hook_path(self.actions_token, "actions", NS),
            "FLUX_BRIDGE_TOKEN": self.actions_token, "FLUX_BRIDGE_WAIT": str(wait),
            "FLUX_BRIDGE_WAIT_CANARIES": "true",
            "FLUX_BRIDGE_REPOSITORY": f"{self.gitea.url}/{ORG}/{REPO}",
            "FLUX_BRIDGE_REF": "refs/heads/main", "FLUX_BRIDGE_SHA": sha,
            "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"})
        return subprocess.Popen(["bash", str(NOTIFY)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

    def approve(self, sha: str, state: str = "success") -> None:
        """What the documented `workflow_dispatch` approval workflow posts (Gitea's API)."""
        self.gitea.api("POST", f"/repos/{ORG}/{REPO}/statuses/{sha}", {
            "context": APPROVAL, "state": state, "description": "approved by release-manager"})

    def badge(self, environment: str) -> str:
        """The environment badge's message (deployed, failed, deploying, unknown)."""
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            svg = client.get(f"{self.bridge.url}/badge/{ORG}/{REPO}.svg",
                             params={"environment": environment}).text
        assert f">{environment}<" in svg, svg
        return next(m for m in ("deployed", "failed", "deploying", "unknown") if f">{m}<" in svg)

    def aggregates_before_the_canary(self, sha: str, final: str) -> list[tuple[str, str]]:
        """(context, state) of each fleet or environment status Gitea shows on the commit from
        before the canary's first `final` status (Gitea numbers statuses in the order set)."""
        shown = self.gitea.statuses(ORG, REPO, sha)
        ends = [s["id"] for s in shown
                if s.get("context") == CANARY_CONTEXT and s.get("status") == final]
        assert ends, e2e.shown(shown)
        return [(str(s["context"]), str(s["status"])) for s in shown
                if s["id"] < min(ends) and s.get("context") in AGGREGATES]

    def bridge_reads(self, resource: str, since: float) -> int:
        """GETs of podinfo's `resource` (canaries, deployments) by the bridge's ServiceAccount
        that the API server answered since `since` (unix time), from its audit log."""
        return sum(1 for event in self.plane.audit_events()
                   if event.get("verb") == "get"
                   and (event.get("user") or {}).get("username") == self.bridge_user
                   and (event.get("objectRef") or {}).get("resource") == resource
                   and (event.get("objectRef") or {}).get("name") == "podinfo"
                   and _unix(str(event.get("stageTimestamp", ""))) >= since)

    def gate_answers(self, status: int) -> int:
        return sum(1 for r in self.bridge.records("flagger gate answered")
                   if r.get("status") == status)


@pytest.fixture(scope="module")
def canaries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Canaries]:
    started = time.monotonic()
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("e2e-canary")
    with e2e.stopping() as teardown:
        # Flagger first: a missing binary fails here with testbin's reason.
        with e2e.timed(timings, "flagger binary"):
            bin_dir, _ = e2e_peers((*E2E_BINARIES, FLAGGER))
        # The API server records every read of a Canary or a Deployment: a verdict the bridge
        # gives is read again from it first, and the test counts those reads.
        plane, gitea, flux = e2e.start_peers(
            workdir, teardown, timings, NS, APP_NS,
            audit_policy=audit_policy(("flagger.app", "apps"), verbs=("get",)))
        with e2e.timed(timings, "flagger CRDs"):
            install_flagger_crds(plane)
        with e2e.timed(timings, "chart RBAC (the bridge's ServiceAccount)"):
            # The bridge runs with exactly what the chart grants it with canaries on.
            user, token = chart_service_account(
                plane, "canary", NS, "--set", "config.statuses.canaries.enabled=true",
                "--set", f"config.statuses.lease_name={LEASE}")
            kubeconfig = plane.write_kubeconfig(workdir / "bridge-kubeconfig.yaml", token,
                                                user=user)
        gitea.create_org(ORG)
        gitea.create_repo(ORG, REPO, private=True)
        tokens = {n: secrets.token_hex(16) for n in ("actions", "events", "flagger")}
        (workdir / "flagger-token").write_text(tokens["flagger"])
        (workdir / "flagger-token").chmod(0o600)
        with e2e.timed(timings, "bridge"):
            bridge = BridgeProcess(e2e.bridge_config(
                CLUSTER, gitea, tokens["events"], workdir,
                statuses={
                    "resync_interval_seconds": 30, "lease_name": LEASE,
                    "fleet": {"enabled": True, "clusters": [CLUSTER],
                              "environments": [{"name": "staging", "clusters": [CLUSTER]}]},
                    "canaries": {"enabled": True,
                                 "webhook_token": {"file": str(workdir / "flagger-token")},
                                 "gates": {"production": {"require": [APPROVAL]}}}},
                deliveries={"canary_pickup_seconds": 60}), kubeconfig, workdir)
            bridge.start()
            teardown.append(bridge.stop)
        checks = CheckServer().start()
        teardown.append(checks.stop)
        kubelet = ReadyReplicas(plane, APP_NS).start()
        teardown.append(kubelet.stop)
        with e2e.timed(timings, "flagger start"):
            flagger = FlaggerProcess(bin_dir, plane.kubeconfig, APP_NS, workdir / "flagger")
            flagger.start()
            teardown.append(flagger.stop)
        env = Canaries(plane, gitea, flux, bridge, workdir, tokens["actions"], flagger,
                       checks, kubelet, bridge_user=user, timings=timings)
        with e2e.timed(timings, "first deploy and Flagger's initialization"):
            env.commits["initial"] = _make_shop(env, tokens)
        timings["environment total"] = time.monotonic() - started
        e2e.print_timings("canary e2e environment up", timings)
        yield env
        e2e.print_timings("canary e2e timings", timings)
        print(f"  status writes by the replica stand-in: {kubelet.writes}; rollout checks "
              f"answered: {len(checks.calls)}")


def _make_shop(env: Canaries, tokens: dict[str, str]) -> str:
    sha = env.push({
        f"{APP_PATH}/deployment.yaml": deployment_yaml("1"),
        f"{APP_PATH}/canary.yaml": canary_yaml(env.checks.url, env.bridge.url, tokens["flagger"]),
    }, "shop: podinfo behind a canary")
    env.secret("gitea-auth", {"username": env.gitea.admin, "password": env.gitea.token})
    env.secret("actions-token", {"token": tokens["actions"]})
    e2e.alert_to_bridge(env.plane, NS, f"{env.bridge.url}/events", tokens["events"],
                        ["GitRepository", "Kustomization"])
    e2e.git_repository(env.plane, NS, "deploy", env.gitea.clone_url(ORG, REPO))
    e2e.kustomization(env.plane, NS, "shop", f"./{APP_PATH}", source=("GitRepository", "deploy"))
    e2e.receiver(env.plane, NS, "actions", "generic", "actions-token",
                 [("GitRepository", "deploy"), ("Kustomization", "shop")])
    env.bridge.wait_receivers(1)
    env.wait("the first deploy", functools.partial(env.deployed, sha), DEPLOY_TIMEOUT)
    # Flagger's first rollout: it copies the target to podinfo-primary and promotes it without
    # an analysis; the bridge says so on the commit.
    env.wait("Flagger to initialize the canary", lambda: env.phase("Initialized"), CANARY_TIMEOUT)
    env.wait_status(sha, CANARY_CONTEXT, "success")
    return sha


def _unix(stamp: str) -> float:
    """An audit event's RFC 3339 time (microseconds) as unix seconds; 0 if unreadable."""
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


# -- the tests ---------------------------------------------------------------------------------------


def test_the_first_rollout_is_on_the_commit_that_applied_it(canaries: Canaries) -> None:
    sha = canaries.commits["initial"]
    history = canaries.history(sha)
    print(f"  {CANARY_CONTEXT} on {sha[:12]}: {e2e.described(history)}")
    assert history[-1]["status"] == "success"
    assert "initialized" in history[-1]["description"].lower()
    # The workload's labels name the Kustomization, whose revision names this commit.
    labels = canaries.plane.request(
        "GET", f"/apis/apps/v1/namespaces/{APP_NS}/deployments/podinfo")["metadata"]["labels"]
    assert labels["kustomize.toolkit.fluxcd.io/name"] == "shop", labels
    # The chart's RBAC lets the bridge list and watch Canaries and their workloads.
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        ready = client.get(f"{canaries.bridge.url}/readyz").json()
    assert not {"Canary", "Deployment", "DaemonSet"} & set(
        ready.get("kinds_not_permitted", []) + ready.get("kinds_not_installed", [])), ready


def test_a_passing_canary_holds_at_the_gate_until_approved_in_gitea(canaries: Canaries) -> None:
    env = canaries
    env.checks.passing = True
    sha = env.push({f"{APP_PATH}/deployment.yaml": deployment_yaml("2")}, "shop: release 2")
    env.commits["release-2"] = sha
    started = time.monotonic()
    job = env.notify(sha, wait=600)  # the CI job, waiting for the canary
    try:
        env.wait("the deploy", functools.partial(env.deployed, sha), DEPLOY_TIMEOUT)
        env.wait("Flagger to analyse the new revision", lambda: env.phase("Progressing"),
                 CANARY_TIMEOUT)
        env.wait_status(sha, CANARY_CONTEXT, "pending")
        env.wait("the analysis to pass and wait at the gate",
                 lambda: env.phase("WaitingPromotion"), CANARY_TIMEOUT)
        env.wait_status(sha, CANARY_CONTEXT, "pending",
                        description="Canary analysis passed, waiting for promotion")
        # Held: Flagger asks again every interval and the bridge answers no, while nothing in
        # Gitea approves the commit.
        refused = env.gate_answers(403)
        env.wait("the gate to refuse twice more", lambda: env.gate_answers(403) >= refused + 2,
                 60)
        assert env.phase("WaitingPromotion"), env.canary().get("status")
        if job.poll() is not None:
            out, err = job.communicate()
            print(f"  the CI job's output:\n{out}\n{err}\n  the bridge's settled waits:")
            for line in env.bridge.records("delivery wait settled"):
                print(f"    {line}")
            pytest.fail("the CI job ended before the promotion (its output is above)")
        env.timings["push -> waiting at the gate"] = time.monotonic() - started

        approved = time.monotonic()
        approved_at = time.time()
        env.approve(sha)
        env.wait("Flagger to promote", lambda: env.phase("Succeeded"), CANARY_TIMEOUT)
        promoted = time.monotonic() - approved
        history = env.wait_status(sha, CANARY_CONTEXT, "success", description="Canary promoted")
        shown = time.monotonic() - approved
        env.timings["approval in Gitea -> Flagger Succeeded"] = promoted
        env.timings["approval in Gitea -> success on the commit"] = shown
        print(f"  approval -> promotion: {promoted:.1f}s (-> Gitea success {shown:.1f}s)")
        print(f"  {CANARY_CONTEXT} on {sha[:12]}: {e2e.described(history)}")
        states = [s["status"] for s in history]
        assert states[0] == "pending" and states[-1] == "success", history
        assert any(s["description"].startswith("check ") for s in history), history
        out, err = job.communicate(timeout=120)
        env.timings["push -> CI job exit (canary promoted)"] = time.monotonic() - started
        print("  notify.sh stderr:\n    " + "\n    ".join(err.splitlines()[-8:]))
        assert job.returncode == 0, (out, err)
        assert "every canary promoted (1)" in err
        assert "Canary shop/podinfo: ready (Promoted)" in err
        # The promotion that ended the wait was read from the API server, not the cache alone.
        reads = {r: env.bridge_reads(r, approved_at) for r in ("canaries", "deployments")}
        print(f"  the bridge's reads after the approval (audit log): {reads}")
        assert reads["canaries"] >= 1 and reads["deployments"] >= 1, reads
        env.wait_status(sha, "flux/fleet", "success", 60)
        env.wait_status(sha, "flux/env/staging", "success", 60)
        assert env.badge("staging") == "deployed"
        # Between Flux's apply and Flagger's promotion the aggregates waited, never read success.
        early = env.aggregates_before_the_canary(sha, "success")
        print(f"  aggregates on {sha[:12]} before the promotion: {early}")
        assert early and all(state == "pending" for _, state in early), early
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()


def test_a_commit_that_leaves_the_workload_shows_the_standing_promotion(
        canaries: Canaries) -> None:
    """A commit that changes another object of the Kustomization: kustomize-controller applies
    it without touching the Deployment (its managedFields entry keeps its time), Flagger starts
    no analysis, and the commit shows the promotion of the workload it deploys at once; the
    fleet does not wait for a phase change that never comes."""
    env = canaries
    promoted = env.phase("Succeeded")
    assert promoted, env.canary().get("status")
    sha = env.push({f"{APP_PATH}/notes.yaml": f"""apiVersion: v1
kind: ConfigMap
metadata:
  name: shop-notes
  namespace: {APP_NS}
data:
  note: "not read by podinfo"
"""}, "shop: a ConfigMap podinfo does not use")
    started = time.monotonic()
    pushed_at = time.time()
    out, err = env.notify(sha, wait=0).communicate(timeout=60)  # the push reaches Flux now
    assert "accepted as delivery" in err, (out, err)
    env.wait("the deploy", functools.partial(env.deployed, sha), DEPLOY_TIMEOUT)
    history = env.wait_status(sha, CANARY_CONTEXT, "success", 60, description="Canary promoted")
    env.wait_status(sha, "flux/fleet", "success", 60)
    env.timings["push (workload unchanged) -> flux/fleet success"] = time.monotonic() - started
    print(f"  {CANARY_CONTEXT} on {sha[:12]}: {e2e.described(history)}")
    # Flagger never moved: the verdict shown is the standing one, for the same workload.
    now = env.canary()["status"]
    assert now.get("phase") == "Succeeded", now
    assert now.get("conditions") == promoted["status"].get("conditions"), now
    # "The apply left the workload as it was" was read from the API server after the apply.
    read = env.bridge_reads("deployments", pushed_at)
    print(f"  the bridge's reads of the Deployment after the push (audit log): {read}")
    assert read >= 1


def test_a_failing_canary_is_rolled_back_and_fails_the_commit_and_the_ci_wait(
        canaries: Canaries) -> None:
    env = canaries
    env.checks.passing = False
    opened = env.gate_answers(200)
    sha = env.push({f"{APP_PATH}/deployment.yaml": deployment_yaml("3")}, "shop: release 3")
    started = time.monotonic()
    job = env.notify(sha, wait=600)
    try:
        env.wait("the deploy", functools.partial(env.deployed, sha), DEPLOY_TIMEOUT)
        env.wait_status(sha, KS_CONTEXT, "success", 120)
        env.wait("Flagger to roll back", lambda: env.phase("Failed"), CANARY_TIMEOUT)
        history = env.wait_status(sha, CANARY_CONTEXT, "failure",
                                  description="Canary rolled back: load-check")
        env.timings["push -> rolled back on the commit"] = time.monotonic() - started
        print(f"  {CANARY_CONTEXT} on {sha[:12]}: {e2e.described(history)}")
        out, err = job.communicate(timeout=180)
        print("  notify.sh stderr:\n    " + "\n    ".join(err.splitlines()[-8:]))
        assert job.returncode == 1, (out, err)
        assert "Canary shop/podinfo: failed (RolledBack)" in err
        # The Kustomization applied the commit (its own status stays success); the rollback
        # turns the commit's aggregate to failure all the same.
        fleet = env.wait_status(sha, "flux/fleet", "failure", 60)
        assert env.history(sha, KS_CONTEXT)[-1]["status"] == "success"
        print(f"  flux/fleet on {sha[:12]}: {e2e.described(fleet)}")
        env.wait_status(sha, "flux/env/staging", "failure", 60)
        # The Kustomization's success came long before Flagger's verdict: no aggregate said
        # success meanwhile.
        early = env.aggregates_before_the_canary(sha, "failure")
        print(f"  aggregates on {sha[:12]} before the rollback: {early}")
        assert all(state == "pending" for _, state in early), early
        assert "success" not in [s["status"] for c in AGGREGATES for s in env.history(sha, c)]
        env.wait("the staging badge to read failed", lambda: env.badge("staging") == "failed",
                 60)
        assert any(not passed for _, passed in env.checks.calls), "no failing check was asked"
        # The gate opened for nothing more: this commit never passed its analysis.
        assert env.gate_answers(200) == opened
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
