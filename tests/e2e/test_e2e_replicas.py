"""Many replicas, one truth, end to end: several bridge processes behind a round-robin proxy,
with a real kube-apiserver, real Flux controllers and a real Gitea.

One environment serves the module (`replicas` fixture): etcd + kube-apiserver with an audit log
(`tests.e2e.realk8s`): every patch/update of Flux objects, with the request body for the
bridge's patches of GitRepositories (which marks each one wrote) and for Kustomization status
writes (which commits kustomize-controller applied, in order); Gitea with SQLite; source-,
kustomize- and notification-controller (`tests.e2e.e2e_harness`); REPLICAS
`gitea-flux-bridge serve` processes with one configuration, running as the chart's
ServiceAccount (RBAC rendered by the real helm); and nginx in front of them as a Service
without affinity would be (`tests.e2e.proxy_harness`: round robin, no retry on another
upstream, unbuffered streams). notification-controller's
Provider and the CI steps go through the proxy; a test that must reach one replica goes to it
directly.

Gitea holds `platform/fleet`. Three corners of it keep the tests apart, so that they pass in any
order and each can count what it caused:
- branch `main`: GitRepository `fleet` + Kustomization `apps` (Receiver `actions`, generic):
  the notify-flux action's deploys, and the object Flux events are written for;
- branch `replay`: GitRepository `replay` + Kustomization `replay` (Receivers `replay-actions`,
  generic, and `replay-gitea`, Gitea webhooks; `replay-flood`, generic, lists the GitRepository
  only): replays and races, counted in the audit log;
- branch `rollout`: GitRepository `rollout` + Kustomization `rollout` (Receiver `rollout`,
  generic): the stream of new commits during the rolling restart.
Commit statuses from the tests' own events go to commits on branches of their own, which Flux
never deploys, so only those events decide what Gitea shows for them.

The tests: round robin; one resync leader over a window, and one successor when it is killed;
Flux events for one commit sent to alternating replicas; the notify-flux action through the
proxy, alone and with a kill -9 of the replica that took its push; one signed request sent to
two replicas at the same instant, again and again (one patch per object and push, from the audit
log); a replayed timestamped push and a repeated X-Gitea-Delivery sent to the other replica,
alone and after a flood of other pushes (nothing annotated); a rolling restart under a stream of
new commits, each push followed to its outcome (lost: 0; every `ready` commit really applied);
and one with a job waiting. A replica that exits during a test without the test saying it ends
it on purpose fails that test. Every test prints its counts (run with -s to see them).

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
import re
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
    metric_value,
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
APPS_NS, REPLAY_NS, ROLLOUT_NS = "eu-west-apps", "eu-west-replay", "eu-west-rollout"
APPS_PATH, REPLAY_PATH = "clusters/eu-west/apps", "clusters/eu-west/replay"
ROLLOUT_PATH = "clusters/eu-west/rollout"
APPS_FILE, REPLAY_FILE = f"{APPS_PATH}/settings.yaml", f"{REPLAY_PATH}/settings.yaml"
ROLLOUT_FILE = f"{ROLLOUT_PATH}/settings.yaml"
NOTIFY = ROOT / ".gitea" / "actions" / "notify-flux" / "notify.sh"
BRIDGE_ANNOTATION_PREFIX = "gitea-flux-bridge.io/"  # the bridge's own annotations

# Receiver -> (Flux type, branch, the objects it lists)
RECEIVERS = {
    "actions": ("generic", "main", [("GitRepository", "fleet"), ("Kustomization", "apps")]),
    "replay-actions": ("generic", "replay",
                       [("GitRepository", "replay"), ("Kustomization", "replay")]),
    "replay-gitea": ("github", "replay",
                     [("GitRepository", "replay"), ("Kustomization", "replay")]),
    "replay-flood": ("generic", "replay", [("GitRepository", "replay")]),
    "rollout": ("generic", "rollout",
                [("GitRepository", "rollout"), ("Kustomization", "rollout")]),
}
# Request bodies in the audit log: the bridge's patches of GitRepositories (the marks each one
# wrote) and Kustomization status writes (every commit kustomize-controller applied).
AUDIT_BODIES = {"source.toolkit.fluxcd.io": ["gitrepositories"],
                "kustomize.toolkit.fluxcd.io": ["kustomizations/status"]}
# The product's default coalescing window (the shared e2e configuration shortens it): the flood
# of other pushes before a replay falls inside one window, as a burst in production does.
COALESCE_WINDOW = 1.0

DEPLOY_TIMEOUT = 120.0
STATUS_TIMEOUT = 20.0  # an event accepted -> its status in Gitea (normally well under 1 s)
SETTLE_TIMEOUT = 120.0
PUSH_RATE = 5.0  # at most this many pushes per second (each is a new commit: Gitea sets the pace)
MAX_PUSHES = 400  # the stream's hard bound
PUSH_ATTEMPTS = 5  # a sender's tries for one push; only 503 is retried
LAG_PUSHES = 4  # pushes sent after a new replica joins the proxy, before the next is replaced
# After a replica's SIGTERM the stream's pushes still go to it (the endpoints lag behind the
# deletion: clients still reach it) until it has accepted DRAIN_PUSHES pushes, or DRAIN_LAG
# seconds at most: within its drain period (shutdown.drain_seconds, 5 s), while it serves.
DRAIN_PUSHES = 3
DRAIN_LAG = 3.5
FOLLOW_SECONDS = 180.0  # a pushed delivery's whole follow (GET ?wait=, asked again as needed)
RACE_ROUNDS = 20  # one request sent to two replicas at once, this many times
FLOOD = 48  # other pushes to the same GitRepository before a replay (more than it keeps marks)
RESYNC_ROUNDS = 4  # resync runs the leader is watched for (resync_interval_seconds apart)
SAMPLE_INTERVAL = 0.5  # how often the leader test samples the Lease and the replicas' gauges


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
    # port -> (signal, why): replicas a test ended on purpose; any other exit is a crash.
    on_purpose: dict[int, tuple[signal.Signals, str]] = field(default_factory=dict)
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

    def end(self, bridge: BridgeProcess, sig: signal.Signals, why: str) -> None:
        """End a replica on purpose (SIGTERM: a pod's deletion, drained, exits 0; SIGKILL: a
        lost node). Only such exits are expected: any other one fails the test (`crashes`)."""
        self.on_purpose[bridge.port] = (sig, why)
        bridge.signal(sig)

    def crashes(self) -> list[str]:
        """Replicas that exited without a test ending them, or ended otherwise than asked (a
        SIGTERM must drain and exit 0): one line each, with the log's tail."""
        found = []
        for bridge in [*self.replicas, *self.retired]:
            code = bridge.exited()
            if code is None:
                continue
            asked = self.on_purpose.get(bridge.port)
            if asked is None:
                why = f"exited with code {code}, and no test ended it"
            elif asked[0] == signal.SIGTERM and code != 0:
                why = f"exited with code {code} after SIGTERM ({asked[1]}), not 0 (drained)"
            else:
                continue
            found.append(f"replica {self.name(bridge.port)} {why}\n{bridge.tail(30)}")
        return found

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

    def bridge_patches(self, kind: str, name: str) -> list[dict[str, Any]]:
        """The audit events of the replicas' PATCH requests on the object, oldest first."""
        api_version, plural = e2e.FLUX_KINDS[kind]
        return self.plane.requests_on(("patch",), user=self.bridge_user,
                                      group=api_version.split("/")[0], resource=plural,
                                      namespace=NS, name=name)

    def written(self, kind: str, name: str) -> tuple[int, int]:
        """(patches the API server applied, patches it refused) by the replicas on the object:
        a refused one (409: another replica changed it first) wrote nothing."""
        events = self.bridge_patches(kind, name)
        ok = sum(1 for e in events if _succeeded(e))
        return ok, len(events) - ok

    def marks_written(self, kind: str, name: str) -> str:
        """Every value of the bridge's own annotations in its applied patches of the object
        (needs the request bodies: GitRepositories, `AUDIT_BODIES`), joined: a delivery's mark
        in it was written on the object."""
        values = []
        for event in self.bridge_patches(kind, name):
            if not _succeeded(event):
                continue
            annotations = (((event.get("requestObject") or {}).get("metadata") or {})
                           .get("annotations") or {})
            values += [str(v) for k, v in annotations.items()
                       if k.startswith(BRIDGE_ANNOTATION_PREFIX)]
        return "\n".join(values)

    def applied_commits(self, name: str) -> dict[str, float]:
        """Every commit kustomize-controller recorded as applied for Kustomization `name`, in
        the order it wrote them (its status writes in the audit log), with when it first did
        (unix seconds the API server received the write)."""
        found: dict[str, float] = {}
        for event in self.plane.requests_on(
                ("patch", "update"), group="kustomize.toolkit.fluxcd.io",
                resource="kustomizations", subresource="status", namespace=NS, name=name):
            status = (event.get("requestObject") or {}).get("status") or {}
            revision = status.get("lastAppliedRevision")
            if _succeeded(event) and isinstance(revision, str):
                found.setdefault(revision.rsplit(":", 1)[-1], _audit_unix(event))
        return found

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


def _succeeded(event: dict[str, Any]) -> bool:
    """The API server applied the audited request (2xx)."""
    return 200 <= int((event.get("responseStatus") or {}).get("code") or 0) < 300


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
                                             ROLLOUT_NS,
                                             audit_policy=audit_policy(bodies=AUDIT_BODIES))
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
        config["reconcile"]["coalesce_window_seconds"] = COALESCE_WINDOW
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
def _replicas_never_crash(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every current replica ready and behind the proxy before each test; after it, a replica
    that exited without the test ending it on purpose (`Replicas.end`), or did not drain after
    its SIGTERM, fails the test. Such a replica is replaced only after it has been reported, so
    the next tests still start from REPLICAS replicas."""
    if "replicas" not in request.fixturenames:
        yield
        return
    env: Replicas = request.getfixturevalue("replicas")
    before = _replace_crashed(env)
    for bridge in env.replicas:
        wait_until(f"replica {env.name(bridge.port)} ready", bridge.ready, 30)
    while len(env.replicas) < REPLICAS:  # a test ended some on purpose and left fewer
        env.replicas.append(env.spawn())
    if sorted(env.proxy.upstreams) != sorted(b.port for b in env.replicas):
        env.publish()
    if before:
        pytest.fail("replicas crashed since the last test:\n" + "\n".join(before))
    yield
    crashed = _replace_crashed(env)
    if crashed:
        pytest.fail("replicas crashed during this test:\n" + "\n".join(crashed))


def _replace_crashed(env: Replicas) -> list[str]:
    """Report every crash once; take crashed replicas out of the set (they are replaced)."""
    crashed = env.crashes()
    for bridge in [b for b in env.replicas if b.exited() is not None]:
        env.retire(bridge)
    for bridge in env.retired:
        if bridge.exited() is not None:
            env.on_purpose[bridge.port] = (signal.SIGKILL, "reported")  # once
    return crashed


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
    env.heads["replay"] = gitea.commit_files(ORG, REPO, {"replay.txt": "replay\n"},
                                             "replay: start", new_branch="replay")
    env.heads["rollout"] = gitea.commit_files(
        ORG, REPO, {ROLLOUT_FILE: configmap("rollout-settings", ROLLOUT_NS, serial="start")},
        "rollout: start", new_branch="rollout")
    env.secret("gitea-auth", {"username": gitea.admin, "password": gitea.token})
    for name in RECEIVERS:
        env.secret(f"{name}-token", {"token": env.tokens[name]})
    # Events go through the proxy, as to a Service.
    e2e.alert_to_bridge(env.plane, NS, f"{env.proxy.url}/events", env.tokens["events"],
                        ["GitRepository", "Kustomization"])
    for name, branch in (("fleet", "main"), ("replay", "replay"), ("rollout", "rollout")):
        e2e.git_repository(env.plane, NS, name, gitea.clone_url(ORG, REPO), branch=branch)
    for name, source, path in (("apps", "fleet", APPS_PATH), ("replay", "replay", REPLAY_PATH),
                               ("rollout", "rollout", ROLLOUT_PATH)):
        e2e.kustomization(env.plane, NS, name, f"./{path}", source=("GitRepository", source))
    for name, (rtype, _, listed) in RECEIVERS.items():
        e2e.receiver(env.plane, NS, name, rtype, f"{name}-token", listed,
                     events=["push"] if rtype == "github" else None)
    for bridge in env.replicas:
        bridge.wait_receivers(len(RECEIVERS))
    for kind, name, branch in (("Kustomization", "apps", "main"),
                               ("Kustomization", "replay", "replay"),
                               ("Kustomization", "rollout", "rollout")):
        sha = env.heads[branch]
        env.wait(f"first deploy of {kind} {name}", lambda k=kind, n=name, s=sha: env.ready_at(k, n, s),
                 DEPLOY_TIMEOUT)


# -- 0. the environment itself ----------------------------------------------------------------------


def test_replicas_share_the_cluster_behind_a_round_robin_proxy(replicas: Replicas) -> None:
    """The harness: every replica ready behind the proxy, plain round robin."""
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
    # nginx writes a request's log line after answering it: wait for all of them.
    logged = env.wait("the proxy's log of every request", lambda: [
        r for r in env.proxy.requests(since=started - 1, uri_prefix="/readyz")
        if str(r.get("test_id", "")).startswith("ready-")] if len(
            env.proxy.requests(since=started - 1, uri_prefix="/readyz")) >= len(seen) else None,
        10)
    assert [r["test_id"] for r in logged] == [f"ready-{i}" for i, _, _ in seen], logged
    # No request was ever passed on to a second upstream: a client sees what one replica said.
    assert not [r for r in env.proxy.requests() if "," in str(r.get("upstream", ""))]


# -- the resync leader ------------------------------------------------------------------------------


def _lease_holder(env: Replicas) -> str | None:
    found = env.plane.request("GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEASE}",
                              ok=(200, 404))
    holder = (found.get("spec") or {}).get("holderIdentity")
    return str(holder) if holder else None


def _claims_leadership(bridge: BridgeProcess) -> bool:
    """The replica's own word (gfb_resync_leader): it holds the Lease and runs the resync."""
    try:
        return metric_value(bridge.metrics(), "gfb_resync_leader") == 1
    except httpx.HTTPError:
        return False


@dataclass
class LeaderSample:
    at: float  # unix
    phase: str
    holder: str | None  # the Lease's holderIdentity
    claims: tuple[str, ...]  # live replicas whose gauge says they lead


def _resyncs(env: Replicas, since: float) -> list[tuple[float, str]]:
    """(unix, replica) of every "resync done" any replica, live or ended, logged since `since`."""
    return sorted((r["unix"], env.name(b.port)) for b in [*env.replicas, *env.retired]
                  for r in b.records("resync done") if r["unix"] >= since)


def test_one_resync_leader_over_a_window_and_one_successor_when_it_dies(replicas: Replicas
                                                                        ) -> None:
    """Three replicas: once one leads, over RESYNC_ROUNDS resync runs exactly one of them holds
    the Lease, says it leads and runs the resync; killed (-9), exactly one other takes over,
    and from then on only that one runs it."""
    env = replicas
    extra = env.spawn()  # a third candidate, so that a successor is a choice between two
    env.replicas.append(extra)
    env.publish()
    samples: list[LeaderSample] = []

    def sample(phase: str) -> LeaderSample:
        found = LeaderSample(time.time(), phase, _lease_holder(env), tuple(
            env.name(b.port) for b in env.replicas
            if b.exited() is None and _claims_leadership(b)))
        samples.append(found)
        return found

    # A test before may have ended the leader: the window starts once one replica leads.
    wait_until("one replica to lead", lambda: len(sample("settling").claims) == 1, 60,
               interval=SAMPLE_INTERVAL)
    started = time.time()
    # Sampled until the leader has run the resync RESYNC_ROUNDS times (a condition, bounded).
    wait_until(f"{RESYNC_ROUNDS} resync runs", lambda: (
        sample("steady") and len(_resyncs(env, started)) >= RESYNC_ROUNDS), 90,
        interval=SAMPLE_INTERVAL)
    steady = [x for x in samples if x.phase == "steady"]
    leader_name = steady[-1].claims[0] if len(steady[-1].claims) == 1 else ""
    steady_runs = _resyncs(env, started)

    leader = next((b for b in env.replicas if env.name(b.port) == leader_name), None)
    killed_at = time.time()
    successor_runs: list[tuple[float, str]] = []
    if leader is not None:
        env.end(leader, signal.SIGKILL, "the resync leader, killed to see who takes over")
        env.retire(leader)
        env.publish()
        killed_at = time.time()

        def taken_over() -> bool:
            now = sample("after kill")
            runs = _resyncs(env, killed_at)
            return len(now.claims) == 1 and len({n for _, n in runs}) >= 1 and len(runs) >= 2

        wait_until("another replica to take the Lease over and run the resync twice",
                   taken_over, 90, interval=SAMPLE_INTERVAL)
        successor_runs = _resyncs(env, killed_at)

    after = [x for x in samples if x.phase == "after kill"]
    takeover = next((x.at - killed_at for x in after if x.claims), None)
    print(f"  {len(steady)} samples over {steady[-1].at - started:.1f}s, then {len(after)} after "
          f"killing the leader (taken over after {takeover or 0:.1f}s):")
    print(table(_sample_rows(samples, started), ["from", "to", "phase", "Lease holder",
                                                  "replicas saying they lead", "samples"]))
    print(table(Counter(n for _, n in steady_runs).most_common(), ["replica", "resyncs (steady)"]))
    print(table(Counter(n for _, n in successor_runs).most_common(),
                ["replica", "resyncs (after the kill)"]))
    assert all(len(x.claims) == 1 for x in steady), (
        f"not exactly one replica leads at every instant: {_sample_rows(samples, started)}")
    assert len({x.claims for x in steady}) == 1 and len({x.holder for x in steady}) == 1, (
        f"the lead moved while every replica was alive: {_sample_rows(samples, started)}")
    assert {n for _, n in steady_runs} == {leader_name}, (
        f"replicas other than the leader {leader_name} ran the resync: {steady_runs}")
    assert all(len(x.claims) <= 1 for x in after), _sample_rows(samples, started)
    successors = {c for x in after for c in x.claims}
    assert len(successors) == 1 and leader_name not in successors, (
        f"after {leader_name} was killed, these took over: {successors}")
    holders = [h for h in dict.fromkeys(x.holder for x in after) if h]
    assert holders[-1] != steady[-1].holder and len(holders) <= 2, (
        f"the Lease went from {steady[-1].holder} to {holders} (one change expected)")
    assert {n for _, n in successor_runs} == successors, (
        f"resyncs after the kill by {Counter(n for _, n in successor_runs)}, "
        f"successor {successors}")


def _sample_rows(samples: list[LeaderSample], started: float) -> list[tuple[Any, ...]]:
    """Consecutive samples that saw the same thing, as one row each."""
    rows: list[list[Any]] = []
    for x in samples:
        key = (x.phase, (x.holder or "-")[-8:], ",".join(x.claims) or "-")
        if rows and tuple(rows[-1][2:5]) == key:
            rows[-1][1] = f"{x.at - started:.1f}s"
            rows[-1][5] += 1
        else:
            rows.append([f"{x.at - started:.1f}s", f"{x.at - started:.1f}s", *key, 1])
    return [tuple(r) for r in rows]


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


def _deployed_everywhere(env: Replicas, code: int | None, stderr: str, out: Path,
                        when: str) -> None:
    """The job ended `deployed`, and every live replica, asked directly, answers `ready`."""
    print("  notify.sh stderr:\n    " + "\n    ".join(stderr.splitlines()[-10:]))
    assert code == 0, f"notify.sh exited {code} {when}:\n{stderr}"
    assert "deployed: every target is Ready" in stderr, stderr
    answers = _every_replica_answers(env, _delivery_of(out))
    print("  GET /deliveries/<id> on every live replica directly:")
    print(table(answers, ["replica", "answer", "outcome"]))
    assert all(status == 200 and outcome == "ready" for _, status, outcome in answers), (
        f"GET /deliveries/<id> must give the same answer on every live replica: {answers}")


def _waiting_job(env: Replicas, tmp_path: Path, message: str
                 ) -> tuple[str, subprocess.Popen[bytes], Path, Path]:
    """A new commit of the apps file, and a notify-flux job waiting for it (accepted, not
    finished: kustomize-controller is paused by the caller). (sha, job, stdout, stderr)."""
    sha = env.gitea.commit_files(ORG, REPO, {
        APPS_FILE: configmap("apps-settings", APPS_NS, release=secrets.token_hex(3))}, message)
    proc, out, err = _notify(env, sha, [APPS_FILE], tmp_path, wait=150)
    env.wait("the job to be accepted and waiting", lambda: (
        "accepted as delivery" in err.read_text(errors="replace") or proc.poll() is not None),
        30)
    assert proc.poll() is None, f"notify.sh ended early:\n{err.read_text()}"
    return sha, proc, out, err


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
        sha, proc, out, err = _waiting_job(env, tmp_path, "apps: a release whose replica dies")
        pushes = [r for r in _job_requests(env, since) if r["method"] == "POST"]
        assert pushes and pushes[-1]["status"] == 202, pushes
        victim = env.by_port(upstream_port(pushes[-1]))
        assert victim is not None, pushes
        env.wait("source-controller to fetch the commit",
                 lambda: env.ready_at("GitRepository", "fleet", sha), 60)
        env.end(victim, signal.SIGKILL, "the replica that accepted the push, killed (-9)")
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
    _deployed_everywhere(env, code, stderr, out, "after the kill -9")


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


def follow(env: Replicas, base_url: str, delivery_id: str, receiver: str, timeout: float,
           client: httpx.Client | None = None) -> tuple[dict[str, Any], int]:
    """Follow a delivery as a CI job does: `GET /deliveries/{id}?wait=` at `base_url`, asked
    again when a stream ends unsettled (a draining replica's last line, a replica gone), until
    it settles or `timeout` passes. (The last state read, how many times it was asked.)"""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    asks = 0
    own = client is None
    http = client or httpx.Client(trust_env=False)
    headers = {"Authorization": f"Bearer {env.tokens[receiver]}"}
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return last, asks
            asks += 1
            try:
                with http.stream("GET", f"{base_url}/deliveries/{delivery_id}",
                                 params={"wait": f"{max(1.0, left):.0f}"}, headers=headers,
                                 timeout=httpx.Timeout(10.0, read=left + 15)) as response:
                    for line in response.iter_lines():
                        with contextlib.suppress(ValueError):
                            doc = json.loads(line)
                            if isinstance(doc, dict) and "outcome" in doc:
                                last = doc
                    if response.status_code == 200 and _settled(last):
                        return last, asks
                    failure = response.status_code != 200
            except httpx.HTTPError:
                failure = True
            if failure and deadline > time.monotonic():
                # The replica behind this request is gone or refused it: ask again once one
                # behind `base_url` is ready to answer.
                with contextlib.suppress(AssertionError):  # none in time: the deadline ends it
                    env.wait("a replica ready behind " + base_url, lambda: _ready(http, base_url),
                             max(1.0, deadline - time.monotonic()))
    finally:
        if own:
            http.close()


def _ready(http: httpx.Client, base_url: str) -> bool:
    try:
        return http.get(f"{base_url}/readyz", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


def _settled(doc: dict[str, Any]) -> bool:
    """Nothing more to wait for: final, or failed (a CI job stops there)."""
    return bool(doc.get("final")) or doc.get("outcome") == "failed"


def _post_at_once(targets: list[tuple[BridgeProcess, httpx.Client]], path: str, body: bytes,
                  headers: dict[str, str]) -> list[tuple[int, dict[str, Any], float, float]]:
    """The same request to each target at the same instant (a barrier, each on a connection
    opened beforehand): (answer, reply, sent at, answered at) per target."""
    barrier = threading.Barrier(len(targets))

    def send(bridge: BridgeProcess, client: httpx.Client
             ) -> tuple[int, dict[str, Any], float, float]:
        barrier.wait(timeout=30)
        sent = time.monotonic()
        response = client.post(bridge.url + path, content=body, headers=headers)
        answered = time.monotonic()
        reply: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            found = response.json()
            reply = found if isinstance(found, dict) else {}
        return response.status_code, reply, sent, answered

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(targets)) as pool:
        futures = [pool.submit(send, bridge, client) for bridge, client in targets]
        return [f.result() for f in futures]


def test_one_request_at_two_replicas_at_once_patches_each_object_once(replicas: Replicas
                                                                       ) -> None:
    """RACE_ROUNDS times a fresh commit, and its signed push (alternately a timestamped
    signature and a Gitea webhook delivery) sent to two replicas at the same instant: the audit
    log shows each push written exactly once on the GitRepository and on the Kustomization.
    kustomize-controller is paused until the consumer is annotated: left running, it starts on
    the new artifact by itself within the bridge's grace, and the consumer is never patched."""
    env = replicas
    a, b = env.replicas[0], env.replicas[1]
    rows: list[tuple[Any, ...]] = []
    problems: list[str] = []
    totals: Counter[str] = Counter()
    hows = ("timestamped-signature", "x-gitea-delivery")
    # Annotated this long after the push or later, the consumer waited for its source's
    # time-out (the deadline sweep), not for its source to be Ready: a CI gate waits minutes.
    late = env.bridge_config["reconcile"]["source_timeout_seconds"] / 2
    with httpx.Client(trust_env=False, timeout=30.0) as to_a, \
            httpx.Client(trust_env=False, timeout=30.0) as to_b:
        for round_ in range(1, RACE_ROUNDS + 1):
            how = hows[round_ % 2]
            sha = env.gitea.commit_files(ORG, REPO, {
                REPLAY_FILE: configmap("replay-settings", REPLAY_NS, run=f"race-{round_}")},
                f"replay: race {round_}", branch="replay")
            receiver, hook, body, headers = _replay_request(env, how, sha)
            before = {obj: env.written(*obj) for obj in REPLAYED}
            for bridge, client in ((a, to_a), (b, to_b)):  # connections open before the barrier
                client.get(bridge.url + "/readyz")
            env.flux.pause("kustomize-controller")
            try:
                answers = _post_at_once([(a, to_a), (b, to_b)], hook, body, headers)
                accepted = {str(reply["delivery"]): bridge for (status, reply, _, _), bridge
                            in zip(answers, (a, b), strict=True) if status == 202}
                annotated_after: float | None = None
                if accepted:
                    consumer = REPLAYED[1]
                    posted = time.monotonic()
                    env.wait(f"round {round_}: the bridge to annotate the Kustomization",
                             lambda c=consumer, n=before[consumer][0]: env.written(*c)[0] > n,
                             DEPLOY_TIMEOUT)
                    annotated_after = time.monotonic() - posted
            finally:
                env.flux.resume("kustomize-controller")
            overlap = max(x[2] for x in answers) < min(x[3] for x in answers)
            outcomes = []
            settled = float("inf")  # when the first follow read its delivery's last state
            for delivery_id, bridge in accepted.items():
                # Both replicas' work must be over before counting: either may still patch.
                last, _ = follow(env, bridge.url, delivery_id, receiver, SETTLE_TIMEOUT)
                settled = min(settled, time.time())
                outcomes.append(str(last.get("outcome", "-")))
            # Applied before the bridge said so, from kustomize-controller's status writes (the
            # object itself may already be reconciling again, Ready Unknown, at the same commit).
            # The audit log may record a write a moment after the API server has answered it.
            applied_at: float | None = None
            with contextlib.suppress(ControlPlaneError):
                applied_at = wait_until(f"the write of {sha[:12]} in the audit log",
                                        lambda s=sha: env.applied_commits("replay").get(s), 10)
            deployed = applied_at is not None and applied_at <= settled
            after = {obj: env.written(*obj) for obj in REPLAYED}
            (src_ok, src_refused), (ks_ok, ks_refused) = (
                tuple(x - y for x, y in zip(after[obj], before[obj], strict=True))
                for obj in REPLAYED)
            rows.append((round_, how, " ".join(str(x[0]) for x in answers),
                         "yes" if overlap else "no", ",".join(outcomes) or "-",
                         "-" if annotated_after is None else f"{annotated_after:.1f}s",
                         f"{settled - applied_at:.2f}s before" if deployed else "NO",
                         src_ok, src_refused, ks_ok, ks_refused))
            totals.update({"rounds": 1, "in flight together": int(overlap),
                           "source written": src_ok, "source refused": src_refused,
                           "consumer written": ks_ok, "consumer refused": ks_refused})
            if not accepted:
                problems.append(f"round {round_}: neither replica accepted the push: {answers}")
            if annotated_after is not None and annotated_after >= late:
                problems.append(f"round {round_}: the Kustomization was annotated "
                                f"{annotated_after:.1f}s after the push: at its source's "
                                "time-out, not once its source was Ready at the commit")
            if src_ok != 1 or ks_ok != 1:
                problems.append(f"round {round_} ({how}): GitRepository written {src_ok} times, "
                                f"Kustomization {ks_ok} times (once each expected)")
            if not deployed or outcomes != ["ready"] * len(outcomes):
                problems.append(f"round {round_}: outcomes {outcomes}; kustomize-controller "
                                f"applied the commit at {applied_at} (unix), the first "
                                f"delivery's follow read its answer at {settled:.3f}")
    print(f"  one signed push sent to {env.name(a.port)} and {env.name(b.port)} at once, "
          f"{RACE_ROUNDS} times (patches counted in the audit log):")
    print(table(rows, ["round", "request", "answers", "in flight together", "outcomes",
                       "consumer annotated (after the push)", "applied (before the answer)",
                       "source written", "refused", "consumer written", "refused"]))
    print("  totals: " + ", ".join(f"{k} {v}" for k, v in totals.items()))
    assert not problems, "\n".join(problems)
    # The race is the point: most rounds must have had both requests in flight together.
    assert totals["in flight together"] >= RACE_ROUNDS // 2, totals


def _flood(env: Replicas, bridge: BridgeProcess, count: int) -> list[tuple[int, dict[str, Any]]]:
    """`count` signed pushes from Receiver replay-flood (the GitRepository only), each naming
    another commit, sent to `bridge` together so that they share one coalescing window."""
    hook, token = env.hook("replay-flood"), env.tokens["replay-flood"]
    signed_at = int(time.time())
    requests = []
    for _ in range(count):
        body = json.dumps({"repository": env.repository_url(), "ref": "refs/heads/replay",
                           "sha": secrets.token_hex(20)}).encode()
        requests.append((body, {"Content-Type": "application/json",
                                "X-Signature": sig.sign_timestamped(token, body, signed_at)}))
    workers = 16
    barrier = threading.Barrier(workers)
    clients = [httpx.Client(trust_env=False, timeout=30.0) for _ in range(workers)]

    def send(worker: int) -> list[tuple[int, dict[str, Any]]]:
        client = clients[worker]
        client.get(bridge.url + "/readyz")  # the connection is open before the barrier
        barrier.wait(timeout=30)
        out = []
        for body, headers in requests[worker::workers]:
            response = client.post(bridge.url + hook, content=body, headers=headers)
            out.append((response.status_code, response.json()))
        return out

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            return [x for f in [pool.submit(send, w) for w in range(workers)] for x in f.result()]
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("others", [0, FLOOD], ids=["alone", f"after-{FLOOD}-other-pushes"])
@pytest.mark.parametrize("how", ["timestamped-signature", "x-gitea-delivery"])
def test_replay_sent_to_the_other_replica_annotates_nothing(replicas: Replicas, how: str,
                                                            others: int) -> None:
    """A signed push accepted once, then (after `others` pushes from another Receiver to the
    same GitRepository, inside one coalescing window) the same request to the other replica:
    refused, and the audit log shows no new write on either object."""
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
    mark = str(answer.json()["mark"])
    last, _ = follow(env, first.url, delivery_id, receiver, SETTLE_TIMEOUT)
    assert last.get("outcome") == "ready", last
    env.wait("Kustomization replay Ready at the commit",
             lambda: env.ready_at("Kustomization", "replay", sha), DEPLOY_TIMEOUT)
    written = _snapshot(env)
    source = "GitRepository/replay"
    assert written[source][0] > before_first[source][0], \
        f"the original push patched nothing: {before_first} -> {written}"
    assert written[source][1].get(e2e.RECONCILE) != before_first[source][1].get(e2e.RECONCILE), \
        written

    flood_patches = 0
    if others:
        flood_started = time.time()
        flooded = _flood(env, first, others)
        accepted = [str(reply["delivery"]) for status, reply in flooded if status == 202]
        rows.append((f"{others} pushes of replay-flood", env.name(first.port),
                     " ".join(f"{n}x{c}" for c, n in Counter(s for s, _ in flooded).items()),
                     f"{len(accepted)} accepted"))
        assert len(accepted) == others, Counter(s for s, _ in flooded)
        # Pushes that did not go out at once ride on the window's trailing patch: the replay
        # goes once none is queued any more, or it would meet the marks as they were.
        env.wait("no push of the flood still queued", lambda: not any(
            t.get("state") == "queued"
            for id_ in accepted for t in env.delivery(first.url, id_, "replay-flood")[1]
            .get("targets", [])), 60)
        flood_patches = sum(1 for e in env.bridge_patches("GitRepository", "replay")
                            if _audit_unix(e) >= flood_started)
    before = _snapshot(env)
    still_marked = mark in "\n".join(before[source][1].values())

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
        follow(env, other.url, str(reply["delivery"]), receiver, SETTLE_TIMEOUT)
    after = _snapshot(env)

    print(f"  {how}: one signed push of {sha[:12]}, {others} other pushes "
          f"({flood_patches} bridge patches of the GitRepository; the original's mark "
          f"{'still' if still_marked else 'no longer'} on it), then the same request to "
          "another replica:")
    print(table(rows, ["request", "replica", "answer", "detail"]))
    print(table([(obj, before[obj][0], after[obj][0],
                  "same" if before[obj][1] == after[obj][1] else "CHANGED")
                 for obj in before],
                ["object", "bridge PATCHes before replay", "after", "annotations"]))
    changed = {obj: {"patches": (before[obj][0], after[obj][0]),
                     "annotations": (before[obj][1], after[obj][1])}
               for obj in before if before[obj] != after[obj]}
    assert not changed, (f"the replay ({how}) sent to {env.name(other.port)} after {others} "
                         f"other pushes was answered {again.status_code} and annotated again: "
                         f"{changed}")
    assert again.status_code in (200, 401), (again.status_code, reply)


def test_a_ready_verdict_stays_ready_when_flux_reconciles_the_same_commit_again(
        replicas: Replicas) -> None:
    """A delivery followed to `ready`, then its Kustomization reconciled again at the same
    commit (someone runs `flux reconcile`; Flux's own interval does the same): every answer
    while kustomize-controller works (Ready Unknown for a moment) still says `ready`, on both
    replicas. A CI gate that was told "deployed" must not be told "in progress" on asking
    again."""
    env = replicas
    sha = env.gitea.commit_files(ORG, REPO, {
        REPLAY_FILE: configmap("replay-settings", REPLAY_NS, run=secrets.token_hex(3))},
        "replay: ready, then reconciled again", branch="replay")
    receiver, hook, body, headers = _replay_request(env, "timestamped-signature", sha)
    with httpx.Client(trust_env=False, timeout=10.0) as client:
        answer = client.post(env.replicas[0].url + hook, content=body, headers=headers)
    assert answer.status_code == 202, answer.text
    delivery_id = str(answer.json()["delivery"])
    last, _ = follow(env, env.replicas[0].url, delivery_id, receiver, SETTLE_TIMEOUT)
    assert last.get("outcome") == "ready", last

    requested = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    env.plane.request("PATCH", f"{e2e.collection('Kustomization', NS)}/replay",
                      {"metadata": {"annotations": {e2e.RECONCILE: requested}}},
                      content_type="application/merge-patch+json")
    answers: Counter[tuple[str, str]] = Counter()

    def handled() -> bool:
        for bridge in env.replicas:
            status, doc = env.delivery(bridge.url, delivery_id, receiver)
            answers[(env.name(bridge.port), str(doc.get("outcome", status)))] += 1
        ks = env.get("Kustomization", "replay")
        return (ks.get("status") or {}).get("lastHandledReconcileAt") == requested and bool(
            e2e.applied_at(ks, f"replay@sha1:{sha}"))

    # Sampled (every answer counted) until kustomize-controller has handled the request and
    # is Ready at the commit again.
    wait_until("kustomize-controller to handle the new request", handled, DEPLOY_TIMEOUT,
               interval=0.02)
    print(f"  delivery of {sha[:12]} ready; Kustomization replay reconciled again at it; "
          "GET /deliveries/<id> answers meanwhile:")
    print(table(sorted((r, o, n) for (r, o), n in answers.items()),
                ["replica", "outcome", "answers"]))
    assert {o for _, o in answers} == {"ready"}, (
        f"a delivery told `ready` was answered otherwise while Flux reconciled the same "
        f"commit again: {dict(answers)}")


def _audit_unix(event: dict[str, Any]) -> float:
    """When the API server received the audited request (unix seconds)."""
    stamp = str(event.get("requestReceivedTimestamp", "")).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return 0.0


# -- d. a rolling restart under a stream of new commits ---------------------------------------------


@dataclass
class PushResult:
    index: int
    sha: str = ""  # the new commit this push names
    attempts: list[tuple[float, str, str]] = field(default_factory=list)  # (t, answer, replica)
    delivery: str = ""
    mark: str = ""
    last: dict[str, Any] = field(default_factory=dict)  # the last state its follow read
    settled_at: float = 0.0  # unix time its follow read that state
    asks: int = 0  # GET ?wait= requests its follow made

    @property
    def final(self) -> str:
        return self.attempts[-1][1] if self.attempts else "not sent"

    @property
    def accepted(self) -> bool:
        return self.final == "202" and bool(self.delivery)

    @property
    def outcome(self) -> str:
        if not self.accepted:
            return "not accepted"
        return str(self.last.get("outcome", "-")) if _settled(self.last) else "never settled"


class PushStream:
    """A stream of new commits on branch rollout: each made in Gitea, then pushed (signed) to
    the rollout Receiver through the proxy (or to a draining replica, while the endpoints lag:
    `lag`), retried on 503 (and only on 503) like notify-flux does, signed afresh each time;
    once accepted, followed through the proxy to its outcome with `GET /deliveries/{id}?wait=`,
    as the CI job would."""

    def __init__(self, env: Replicas) -> None:
        self.env = env
        self.hook = env.hook("rollout")
        self.token = env.tokens["rollout"]
        self.results: list[PushResult] = []
        self.sent = 0
        self.started = 0.0
        self.errors: list[str] = []
        self.direct: BridgeProcess | None = None  # a draining replica pushes still go to
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # One worker per push: each one pushes and then follows its delivery to the end.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=MAX_PUSHES)
        self._client = httpx.Client(trust_env=False, timeout=30.0,
                                    limits=httpx.Limits(max_connections=MAX_PUSHES + 16))
        self._thread = threading.Thread(target=self._run, name="push-stream", daemon=True)

    def start(self) -> PushStream:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _run(self) -> None:
        for index in range(MAX_PUSHES):
            due = self.started + index / PUSH_RATE
            # Pacing of the load generator itself (at most PUSH_RATE), not a wait for a condition.
            if self._stop.wait(max(0.0, due - time.monotonic())):
                break
            try:
                sha = self.env.gitea.commit_files(ORG, REPO, {
                    ROLLOUT_FILE: configmap("rollout-settings", ROLLOUT_NS, serial=str(index))},
                    f"rollout: push {index}", branch="rollout")
            except Exception as exc:  # reported with the results, the stream goes on
                self.errors.append(f"commit {index}: {exc}")
                continue
            result = PushResult(index, sha)
            with self._lock:
                self.results.append(result)
                self.sent += 1
            self._pool.submit(self._push, result)

    def _push(self, result: PushResult) -> None:
        body = json.dumps({"repository": self.env.repository_url(), "ref": "refs/heads/rollout",
                           "sha": result.sha, "paths": [ROLLOUT_FILE]}).encode()
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            signed_at = int(time.time())
            headers = {"Content-Type": "application/json",
                       "X-Signature": sig.sign_timestamped(self.token, body, signed_at),
                       "X-Test-Id": f"push-{result.index}-{attempt}"}
            at = time.monotonic() - self.started
            direct = self.direct
            try:
                response = self._client.post(
                    (direct.url if direct is not None else self.env.proxy.url) + self.hook,
                    content=body, headers=headers)
            except httpx.HTTPError as exc:
                result.attempts.append((at, type(exc).__name__, "-"))
                return
            replica = self.env.name(direct.port if direct is not None else upstream_port(
                {"upstream": response.headers.get("x-upstream", "")}))
            result.attempts.append((at, str(response.status_code), replica))
            if response.status_code == 202:
                reply = response.json()
                result.delivery, result.mark = str(reply["delivery"]), str(reply["mark"])
                break
            if response.status_code != 503 or attempt == PUSH_ATTEMPTS:
                return
            # A retry is signed afresh, and a signature is one per (second, body): the
            # retry goes out as soon as the clock has moved to the next second.
            wait_until("the next second, for a fresh signature",
                       lambda at=signed_at: int(time.time()) > at, 5, interval=0.05)
        result.last, result.asks = follow(self.env, self.env.proxy.url, result.delivery,
                                          "rollout", FOLLOW_SECONDS, client=self._client)
        result.settled_at = time.time()

    def taken_by(self, replica: str, since: float) -> int:
        """Pushes `replica` accepted at or after `since` (seconds into the stream)."""
        with self._lock:
            results = list(self.results)
        return sum(1 for r in results for at, answer, name in list(r.attempts)
                   if name == replica and answer == "202" and at >= since)

    def lag(self, old: BridgeProcess | None, mark: Callable[[str], None]) -> None:
        """The endpoints' lag behind a replica's SIGTERM (`old`): the stream's pushes go to it
        until it has taken DRAIN_PUSHES, DRAIN_LAG seconds at most; or behind a new replica
        (`None`): LAG_PUSHES more pushes through the proxy."""
        if old is None:
            self.wait_sent(LAG_PUSHES)
            return
        name = self.env.name(old.port)
        since = time.monotonic() - self.started
        self.direct = old
        try:
            with contextlib.suppress(ControlPlaneError):  # the bound is the drain, no failure
                wait_until(f"{name} to take {DRAIN_PUSHES} pushes while draining",
                           lambda: self.taken_by(name, since) >= DRAIN_PUSHES, DRAIN_LAG,
                           interval=0.05)
        finally:
            self.direct = None
        mark(f"{name} took {self.taken_by(name, since)} pushes while draining")

    def wait_sent(self, more: int, timeout: float = 60.0) -> None:
        target = self.sent + more
        wait_until(f"{more} more pushes to be sent", lambda: self.sent >= target, timeout)

    def stop_sending(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def wait_followed(self) -> None:
        """Every push answered and followed to its end (each follow is bounded)."""
        self._pool.shutdown(wait=True)
        self._client.close()


def rolling_restart(env: Replicas, lag: Callable[[BridgeProcess | None], None],
                    mark: Callable[[str], None]
                    ) -> list[BridgeProcess]:
    """Replace every replica, one at a time, as a Deployment's rolling update does: SIGTERM the
    old one (a pod's deletion), `lag(old)` while it still gets traffic (the endpoints lag
    behind the deletion), take it out of the proxy, start a new one on a new port and put it
    in once ready, `lag(None)`, and let the old one drain and exit before the next. Returns
    the terminated replicas."""
    terminated: list[BridgeProcess] = []
    for old in list(env.replicas):
        old_name = env.name(old.port)
        env.end(old, signal.SIGTERM, "replaced in a rolling restart")
        terminated.append(old)
        mark(f"SIGTERM {old_name}")
        env.wait(f"{old_name} to stop being ready", lambda b=old: not b.ready(), 30)
        mark(f"{old_name} not ready")
        lag(old)
        env.retire(old)
        env.publish()
        mark(f"{old_name} out of the proxy")
        new = env.spawn()
        env.replicas.append(new)
        env.publish()
        mark(f"{env.name(new.port)} started, in the proxy")
        lag(None)
        wait_exited(env, [old], mark)
    return terminated


def wait_exited(env: Replicas, terminated: list[BridgeProcess], mark: Callable[[str], None]
                ) -> None:
    """The terminated replicas end by themselves once drained; then nothing is in flight."""
    for old in terminated:
        with contextlib.suppress(ControlPlaneError):
            wait_until(f"{env.name(old.port)} to exit", lambda b=old: b.exited() is not None, 60)
        mark(f"{env.name(old.port)} exited with {old.exited()}")


def test_rolling_restart_under_a_stream_of_pushes_loses_none(replicas: Replicas) -> None:
    """Every replica replaced one by one (SIGTERM, drained, a new one) while new commits are
    pushed: every accepted push ends `ready` with its commit, or a later commit of the stream
    that contains it, really applied by kustomize-controller, or `superseded` naming a newer
    commit; none is accepted and then dropped (its mark never written), left unsettled, or
    timed out."""
    env = replicas
    timeline: list[tuple[str, str]] = []
    stream = PushStream(env).start()

    def mark(what: str) -> None:
        timeline.append((f"{time.monotonic() - stream.started:6.1f}s", what))

    terminated: list[BridgeProcess] = []
    try:
        stream.wait_sent(5)
        terminated = rolling_restart(env, lambda old: stream.lag(old, mark), mark)
        stream.wait_sent(5)
    finally:
        stream.stop_sending()
        mark(f"stream stopped after {stream.sent} pushes")
        stream.wait_followed()
        mark("every push answered and followed to its end")
    assert [b.exited() for b in terminated] == [0] * len(terminated), (
        "a replaced replica did not drain and exit 0: "
        f"{[(env.name(b.port), b.exited()) for b in terminated]}")

    results = stream.results
    head = results[-1].sha if results else ""
    env.wait("the stream's last commit applied", lambda: head in env.applied_commits("rollout"),
             DEPLOY_TIMEOUT)
    applied = env.applied_commits("rollout")
    # A push coalesced into a window's trailing patch can be ready (Flux fetched the head for an
    # earlier patch) before that patch is sent and audited: wait for every accepted mark, up to
    # the window and the audit log's lag, before calling one dropped.
    marks = {r.mark for r in results if r.accepted}
    with contextlib.suppress(AssertionError):
        env.wait("every accepted push's mark in the audit log",
                 lambda: marks <= env.marks_written("GitRepository", "rollout"), 15)
    written = env.marks_written("GitRepository", "rollout")
    pushed = {r.sha: r.index for r in results}
    problems: dict[str, list[PushResult]] = {}

    def problem(what: str, result: PushResult) -> None:
        problems.setdefault(what, []).append(result)

    for r in results:
        if not r.accepted:
            problem("never accepted", r)
            continue
        if r.mark not in written:
            problem("accepted, its mark never written on the GitRepository (dropped)", r)
        if r.outcome == "ready":
            if not (_applied_before(r.sha, r, applied)
                    or _contained_in_applied(r, pushed, applied)):
                problem(LIE, r)
        elif r.outcome == "superseded":
            if not _names_newer(r, pushed):
                problem("superseded, naming no newer commit of the stream", r)
        else:
            problem(f"lost: {r.outcome}", r)

    print("  rollout timeline:")
    print(table(timeline, ["at", "what"]))
    by_replica = Counter((replica, answer) for r in results for _, answer, replica in r.attempts)
    print("  answers per replica (every attempt, through the proxy):")
    print(table(sorted((replica, answer, count) for (replica, answer), count in by_replica.items()),
                ["replica", "answer", "attempts"]))
    outcomes = Counter(r.outcome for r in results)
    accepted = [r for r in results if r.accepted]
    # Pushes a replica took after its SIGTERM, while the proxy still sent it traffic.
    terms = {what.split()[1]: float(at.rstrip("s")) for at, what in timeline
             if what.startswith("SIGTERM ")}
    draining = [r for r in accepted
                if r.attempts[-1][2] in terms and r.attempts[-1][0] >= terms[r.attempts[-1][2]]]
    lost = [r for r in accepted if r.outcome not in ("ready", "superseded")]
    stream_applied = [sha for sha in applied if sha in pushed]
    lies = len(problems.get(LIE, []))
    later = sum(1 for r in accepted if r.outcome == "ready"
                and not _applied_before(r.sha, r, applied)
                and _contained_in_applied(r, pushed, applied))
    print(f"  pushes (each a new commit): {len(results)}; accepted: {len(accepted)}; "
          f"ready: {outcomes['ready']} ({outcomes['ready'] - later - lies} with the commit "
          f"applied, {later} with a later commit containing it applied, {lies} with neither); "
          f"superseded: {outcomes['superseded']}; other outcomes: "
          f"{ {k: v for k, v in outcomes.items() if k not in ('ready', 'superseded')} }; "
          f"lost: {len(lost)}; accepted by a draining replica: {len(draining)} "
          f"({Counter(r.outcome for r in draining)}); retried after 503: "
          f"{sum(1 for r in accepted if len(r.attempts) > 1)}; GET ?wait= asks: "
          f"{sum(r.asks for r in accepted)}")
    print(f"  kustomize-controller applied {len(stream_applied)} of the {len(results)} commits "
          f"(it goes straight to the newest it has); Gitea errors: {stream.errors or 'none'}")
    for what, found in problems.items():
        print(f"  {what}: {len(found)} (first 10)")
        print(table([(r.index, r.sha[:12], r.outcome,
                      "applied" if r.sha in applied else "never applied",
                      " ".join(f"{t:.1f}s:{a}@{rep}" for t, a, rep in r.attempts),
                      _short(r.last)) for r in found[:10]],
                    ["push", "commit", "outcome", "commit", "attempts (at:answer@replica)",
                     "last state"]))
    assert results and not stream.errors, stream.errors
    assert draining, "no push reached a replica after its SIGTERM: the drain went untested"
    assert not problems, {what: [r.index for r in found] for what, found in problems.items()}


LIE = ("ready, but kustomize-controller had applied neither its commit nor one containing it "
       "when the bridge said so")


def _applied_before(sha: str, result: PushResult, applied: dict[str, float]) -> bool:
    """Had kustomize-controller applied `sha` when the delivery's follow read its last state?"""
    return applied.get(sha, result.settled_at + 1) <= result.settled_at


def _contained_in_applied(result: PushResult, pushed: dict[str, int], applied: dict[str, float]
                          ) -> bool:
    """Does the delivery say its Kustomization is Ready at a later commit containing its own
    (ContainsCommit), and did kustomize-controller really apply that commit? Each commit of the
    stream is made on the one before (only this test writes the branch), so a later one
    contains every earlier one."""
    for target in result.last.get("targets", []):
        detail = target.get("detail") or {}
        if target.get("kind") != "Kustomization" or detail.get("reason") != "ContainsCommit":
            continue
        held = re.search(r"holds ([0-9a-f]{7,40})", str(detail.get("message", "")))
        return held is not None and any(
            sha.startswith(held.group(1)) and index > result.index
            and _applied_before(sha, result, applied)
            for sha, index in pushed.items())
    return False


def _names_newer(result: PushResult, pushed: dict[str, int]) -> bool:
    """Does the delivery's last state name a commit pushed after its own (in any field)?"""
    tokens = re.findall(r"[0-9a-f]{7,40}", json.dumps(result.last))
    return any(sha.startswith(token) and index > result.index
               for token in tokens for sha, index in pushed.items())


def _short(doc: dict[str, Any]) -> str:
    """A delivery's state in one line: outcome, then each target's state and reason."""
    targets = " ".join(f"{t.get('kind')}:{t.get('state')}"
                       f"{'/' + str(t['detail'].get('reason')) if t.get('detail') else ''}"
                       for t in doc.get("targets", []))
    return f"{doc.get('outcome', '-')} {targets}"[:100]


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
        _, proc, out, err = _waiting_job(env, tmp_path, "apps: a release deployed during a rollout")
        mark("job accepted, waiting")
        terminated = rolling_restart(env, lambda _: None, mark)
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
    _deployed_everywhere(env, code, stderr, out, "during a rolling restart")
