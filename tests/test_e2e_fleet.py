"""The fleet status (issue 13, item 3) against a real Gitea, with real Flux controllers and two
regions' bridges.

One environment serves the module: etcd + kube-apiserver (`tests.realk8s`) with two namespaces
standing for two clusters, `eu-west` and `us-east`; Gitea with SQLite; one set of source-,
kustomize- and notification-controller watching both (`tests.e2e_harness`); and two
`gitea-flux-bridge serve` processes, one per region: each has its own `cluster_name` and watches
only its region's namespace (`namespaces`), and both turn `statuses.fleet` on for
`platform/fleet` with both clusters listed.

Gitea holds `platform/fleet` with one directory per region. In each region's namespace: a
GitRepository `fleet` on it, a Kustomization `apps` on `clusters/<region>` (ConfigMaps only:
there is no kubelet), a github-type Receiver whose hook URL on that region's bridge is one of the
repository's Gitea webhooks, and a generic-hmac Provider + Alert sending the region's events to
that region's bridge's /events. Every status comes from notification-controller's real events;
when a region reports is steered through its Flux objects only (a suspended Kustomization, a
broken manifest), never with made-up events.

Each test pushes its own commit and leaves both regions healthy, so the tests pass alone and in
any order.

    python -m pytest tests/test_e2e_fleet.py -q -s     (-s shows the timings and histories)
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from receiver import signatures as sig
from tests.e2e_harness import (
    BridgeProcess,
    FluxControllers,
    Gitea,
    e2e_peers,
    install_source_crds,
)
from tests.realk8s import ControlPlane, ControlPlaneError, wait_until

pytestmark = pytest.mark.e2e

T = TypeVar("T")

ORG, REPO = "platform", "fleet"
EU, US = "eu-west", "us-east"
REGIONS = (EU, US)
FLEET = "flux/fleet"
KS = "apps"  # each region's Kustomization (in the region's namespace)


def settings_file(region: str) -> str:
    return f"clusters/{region}/settings.yaml"


def broken_file(region: str) -> str:
    return f"clusters/{region}/broken.yaml"


SOURCE_API = "/apis/source.toolkit.fluxcd.io/v1"
KUSTOMIZE_API = "/apis/kustomize.toolkit.fluxcd.io/v1"
NOTIFICATION_API = "/apis/notification.toolkit.fluxcd.io"
PLURALS = {"GitRepository": f"{SOURCE_API}/namespaces/{{ns}}/gitrepositories",
           "Kustomization": f"{KUSTOMIZE_API}/namespaces/{{ns}}/kustomizations",
           "Receiver": f"{NOTIFICATION_API}/v1/namespaces/{{ns}}/receivers",
           "Provider": f"{NOTIFICATION_API}/v1beta3/namespaces/{{ns}}/providers",
           "Alert": f"{NOTIFICATION_API}/v1beta3/namespaces/{{ns}}/alerts"}
API_VERSIONS = {"GitRepository": "source.toolkit.fluxcd.io/v1",
                "Kustomization": "kustomize.toolkit.fluxcd.io/v1",
                "Receiver": "notification.toolkit.fluxcd.io/v1",
                "Provider": "notification.toolkit.fluxcd.io/v1beta3",
                "Alert": "notification.toolkit.fluxcd.io/v1beta3"}

DEPLOY_TIMEOUT = 90.0  # push -> Kustomization Ready at the commit (usually a few seconds)
STATUS_TIMEOUT = 60.0


def context(region: str) -> str:
    """The region's Kustomization context (the default template; namespace = region)."""
    return f"flux/{region}/kustomization/{region}/{KS}"


def source_context(region: str) -> str:
    return f"flux/{region}/gitrepository/{region}/fleet"


def configmap(name: str, namespace: str, **data: str) -> str:
    lines = "".join(f'  {k}: "{v}"\n' for k, v in data.items())
    return (f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n"
            f"  namespace: {namespace}\ndata:\n{lines}")


def healthy_layout(release: str) -> dict[str, str]:
    return {settings_file(r): configmap("apps-settings", r, release=release) for r in REGIONS}


# -- the environment ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    plane: ControlPlane
    gitea: Gitea
    flux: FluxControllers
    bridges: dict[str, BridgeProcess]
    initial_sha: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    # -- Kubernetes ----------------------------------------------------------------------------------

    def path(self, kind: str, region: str, name: str = "") -> str:
        base = PLURALS[kind].format(ns=region)
        return f"{base}/{name}" if name else base

    def create(self, kind: str, region: str, name: str, spec: dict[str, Any]) -> None:
        self.plane.request("POST", self.path(kind, region), {
            "apiVersion": API_VERSIONS[kind], "kind": kind,
            "metadata": {"name": name, "namespace": region}, "spec": spec})

    def secret(self, region: str, name: str, data: dict[str, str]) -> None:
        self.plane.request("POST", f"/api/v1/namespaces/{region}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "stringData": data})

    def suspend(self, region: str, suspended: bool) -> None:
        self.plane.request("PATCH", self.path("Kustomization", region, KS),
                           {"spec": {"suspend": suspended}},
                           content_type="application/merge-patch+json")

    def kustomization(self, region: str) -> dict[str, Any]:
        return self.plane.request("GET", self.path("Kustomization", region, KS))

    def deployed(self, region: str, sha: str) -> dict[str, Any] | None:
        """The region's Kustomization if it is Ready with `sha` applied, else None."""
        ks = self.kustomization(region)
        status = ks.get("status") or {}
        if (status.get("lastAppliedRevision") == f"main@sha1:{sha}"
                and _condition(ks, "Ready").get("status") == "True"):
            return ks
        return None

    def failed(self, region: str, sha: str) -> dict[str, Any] | None:
        ks = self.kustomization(region)
        status = ks.get("status") or {}
        if (status.get("lastAttemptedRevision") == f"main@sha1:{sha}"
                and _condition(ks, "Ready").get("status") == "False"):
            return ks
        return None

    def source_at(self, region: str, sha: str) -> dict[str, Any] | None:
        repo = self.plane.request("GET", self.path("GitRepository", region, "fleet"))
        artifact = (repo.get("status") or {}).get("artifact") or {}
        return repo if artifact.get("revision") == f"main@sha1:{sha}" else None

    # -- Gitea ---------------------------------------------------------------------------------------

    def push(self, files: Mapping[str, str | None], message: str) -> str:
        started = time.monotonic()
        sha = self.gitea.commit_files(ORG, REPO, files, message)
        print(f"  pushed {sha[:12]} ({message}) in {time.monotonic() - started:.2f}s")
        return sha

    def history(self, sha: str, ctx: str) -> list[dict[str, Any]]:
        """Every status of `ctx` on `sha` (Gitea keeps them all), oldest first."""
        return [s for s in self.gitea.statuses(ORG, REPO, sha) if s.get("context") == ctx]

    def combined(self, sha: str) -> dict[str, Any]:
        """Gitea's combined status of the commit (the latest per context)."""
        found: dict[str, Any] = self.gitea.api("GET", f"/repos/{ORG}/{REPO}/commits/{sha}/status")
        return found

    def wait_state(self, sha: str, ctx: str, state: str, description: str | None = None,
                   timeout: float = STATUS_TIMEOUT) -> list[dict[str, Any]]:
        """Until the newest status of `ctx` on `sha` is `state` (with `description`, when
        given); returns the context's whole history, oldest first."""
        def check() -> list[dict[str, Any]] | None:
            found = self.history(sha, ctx)
            if not found or found[-1].get("status") != state:
                return None
            return found if description in (None, found[-1].get("description")) else None

        return self.wait(f"{state} on {sha[:12]} for {ctx}", check, timeout,
                         lambda: f"statuses: {_shown(self.gitea.statuses(ORG, REPO, sha))}")

    # -- waiting -------------------------------------------------------------------------------------

    def wait(self, what: str, check: Callable[[], T | None], timeout: float,
             extra: Callable[[], str] | None = None) -> T:
        def diagnostics() -> str:
            parts = [extra()] if extra is not None else []
            parts += [f"--- bridge {r}\n{b.tail(25)}" for r, b in self.bridges.items()]
            parts += [self.flux.logs(15), self.gitea.tail(10)]
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


def _shown(statuses: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(str(s.get("context")), str(s.get("status")), str(s.get("description")))
            for s in statuses]


def _states(statuses: list[dict[str, Any]]) -> list[str]:
    return [str(s.get("status")) for s in statuses]


def _timed(timings: dict[str, float], name: str, started: float) -> None:
    timings[name] = time.monotonic() - started


def _bridge_config(region: str, gitea: Gitea, workdir: Path) -> dict[str, Any]:
    return {
        "cluster_name": region,
        "namespaces": [region],  # one cluster each: only its region's Flux objects
        "log_level": "info",
        "reconcile": {"source_timeout_seconds": 60, "consumer_timeout_seconds": 120,
                      "coalesce_window_seconds": 0.2},
        "gitea": [{"name": "e2e", "url": gitea.url,
                   "token": {"file": str(workdir / "gitea-token")}}],
        "events": {"hmac_token": {"file": str(workdir / "events-token")}},
        "statuses": {"resync_interval_seconds": 30, "lease_duration_seconds": 15,
                     "fleet": {"enabled": True, "repositories": [f"{ORG}/{REPO}"],
                               "clusters": list(REGIONS), "context": FLEET}},
    }


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    module_started = time.monotonic()
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("e2e-fleet")
    bin_dir, static_root = e2e_peers()
    assert static_root is not None

    teardown: list[Callable[[], None]] = []
    try:
        started = time.monotonic()
        plane = ControlPlane(bin_dir)
        plane.start()
        teardown.append(plane.stop)
        install_source_crds(plane)
        plane.ensure_namespace("flux-system", *REGIONS)
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

        started = time.monotonic()
        bridges: dict[str, BridgeProcess] = {}
        tokens: dict[str, dict[str, str]] = {}
        for region in REGIONS:
            home = workdir / f"bridge-{region}"
            home.mkdir()
            tokens[region] = {"webhook": secrets.token_hex(16), "events": secrets.token_hex(16)}
            for name, value in (("gitea-token", gitea.token),
                                ("events-token", tokens[region]["events"])):
                (home / name).write_text(value)
                (home / name).chmod(0o600)
            bridges[region] = BridgeProcess(_bridge_config(region, gitea, home),
                                            plane.kubeconfig, home)
            bridges[region].start()
            teardown.append(bridges[region].stop)
        _timed(timings, "two bridges", started)

        env = Fleet(plane, gitea, flux, bridges, timings=timings)
        started = time.monotonic()
        env.initial_sha = _make_regions(env, tokens)
        _timed(timings, "initial deploy (both regions Ready)", started)
        started = time.monotonic()
        env.wait_state(env.initial_sha, FLEET, "success")
        _timed(timings, "initial fleet success", started)
        timings["environment total"] = time.monotonic() - module_started
        yield env
        print("\n=== e2e fleet timings ===")
        for name, seconds in timings.items():
            print(f"  {name:<50} {seconds:6.1f}s")
        print(f"  component start: control plane {plane.timings}, gitea {gitea.timings}, "
              f"flux {flux.timings}, bridges {[b.timings for b in bridges.values()]}")
        print(f"  module total {time.monotonic() - module_started:.1f}s")
    finally:
        for stop in reversed(teardown):
            try:
                stop()
            except Exception as exc:  # keep tearing down the rest
                print(f"teardown: {exc}")


def _make_regions(env: Fleet, tokens: dict[str, dict[str, str]]) -> str:
    """The repository's first layout, each region's Flux objects and webhook; waits until both
    regions deployed the first commit. Returns that commit."""
    sha = env.push(healthy_layout("1"), "fleet: eu-west and us-east")
    for region in REGIONS:
        bridge = env.bridges[region]
        env.secret(region, "gitea-auth", {"username": env.gitea.admin,
                                          "password": env.gitea.token})
        env.secret(region, "webhook-token", {"token": tokens[region]["webhook"]})
        env.secret(region, "bridge-events", {"token": tokens[region]["events"]})
        env.create("Provider", region, "bridge", {
            "type": "generic-hmac", "address": f"{bridge.url}/events",
            "secretRef": {"name": "bridge-events"}})
        env.create("Alert", region, "bridge", {
            "providerRef": {"name": "bridge"}, "eventSeverity": "info",
            "eventSources": [{"kind": "GitRepository", "name": "*"},
                             {"kind": "Kustomization", "name": "*"}]})
        env.create("GitRepository", region, "fleet", {
            "interval": "1h", "timeout": "60s", "url": env.gitea.clone_url(ORG, REPO),
            "ref": {"branch": "main"}, "secretRef": {"name": "gitea-auth"}})
        env.create("Kustomization", region, KS, {
            "interval": "1h", "timeout": "2m", "path": f"./clusters/{region}", "prune": False,
            "sourceRef": {"kind": "GitRepository", "name": "fleet"}})
        env.create("Receiver", region, "gitea", {
            "type": "github", "events": ["push"], "secretRef": {"name": "webhook-token"},
            "resources": [
                {"apiVersion": API_VERSIONS["GitRepository"], "kind": "GitRepository",
                 "name": "fleet"},
                {"apiVersion": API_VERSIONS["Kustomization"], "kind": "Kustomization",
                 "name": KS}]})
    for region in REGIONS:
        env.bridges[region].wait_receivers(1)
        hook = "/hook/" + sig.hook_digest(tokens[region]["webhook"], "gitea", region)
        env.gitea.create_hook(ORG, REPO, f"{env.bridges[region].url}{hook}",
                              tokens[region]["webhook"])
    for region in REGIONS:
        env.wait(f"first deploy in {region}", functools.partial(env.deployed, region, sha),
                 DEPLOY_TIMEOUT)
    return sha


# -- the tests -----------------------------------------------------------------------------------------


def test_fleet_is_pending_after_the_first_region_and_success_after_the_second(fleet: Fleet
                                                                              ) -> None:
    # us-east will not deploy the next commit until it is resumed: kustomize-controller leaves
    # a suspended Kustomization alone, so only eu-west's events reach a bridge at first.
    fleet.suspend(US, True)
    try:
        sha = fleet.push(healthy_layout(f"pending-{secrets.token_hex(3)}"),
                         "both regions: a new release")
        fleet.wait_state(sha, context(EU), "success")
        fleet.wait("eu-west Ready at the commit", lambda: fleet.deployed(EU, sha), DEPLOY_TIMEOUT)
        # us-east fetched the commit all the same: its GitRepository's `success` is on it, and
        # says fetched, not deployed.
        fleet.wait_state(sha, source_context(US), "success")
        # eu-west's bridge decides it from what Gitea shows: eu-west done, us-east not.
        fleet.wait_state(sha, FLEET, "pending", f"Deployed in 1 of 2 clusters; waiting for {US}")
        us_east = fleet.history(sha, context(US))
        assert "success" not in _states(us_east), _shown(us_east)
        assert fleet.deployed(US, sha) is None, "us-east deployed while suspended"
        assert "success" not in _states(fleet.history(sha, FLEET))
    finally:
        fleet.suspend(US, False)

    # Resumed, kustomize-controller applies the commit in us-east; its events reach us-east's
    # bridge, whose post (and fleet check) turns the aggregate to success.
    started = time.monotonic()
    fleet.wait("us-east Ready at the commit", lambda: fleet.deployed(US, sha), DEPLOY_TIMEOUT)
    fleet.wait_state(sha, context(US), "success")
    history = fleet.wait_state(sha, FLEET, "success", "Deployed in all 2 clusters")
    fleet.timings["us-east resumed -> fleet success"] = time.monotonic() - started
    print(f"  {FLEET} on {sha[:12]}: {[(s, d) for _, s, d in _shown(history)]}")
    states = _states(history)
    assert states.index("pending") < states.index("success"), states
    assert not {"failure", "error"} & set(states), _shown(history)
    combined = fleet.combined(sha)
    assert combined["state"] == "success", combined
    latest = {s["context"]: s["status"] for s in combined["statuses"]}
    assert latest[FLEET] == latest[context(EU)] == latest[context(US)] == "success", latest


def test_a_failing_second_region_makes_the_fleet_status_failure(fleet: Fleet) -> None:
    release = f"failure-{secrets.token_hex(3)}"
    sha = fleet.push({**healthy_layout(release),
                      broken_file(US): "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: [x\n"},
                     "us-east: a broken manifest")
    try:
        fleet.wait("eu-west Ready at the commit", lambda: fleet.deployed(EU, sha), DEPLOY_TIMEOUT)
        fleet.wait_state(sha, context(EU), "success")
        us_east = fleet.wait("us-east to fail at the commit", lambda: fleet.failed(US, sha),
                             DEPLOY_TIMEOUT)
        assert _condition(us_east, "Ready")["reason"] == "BuildFailed", us_east["status"]
        fleet.wait_state(sha, context(US), "failure")
        history = fleet.wait_state(sha, FLEET, "failure", f"Failed in {US}")
        print(f"  {FLEET} on {sha[:12]}: {[(s, d) for _, s, d in _shown(history)]}")
        assert "success" not in _states(history), _shown(history)
        assert fleet.combined(sha)["state"] == "failure"
    finally:
        # Leave both regions healthy for whatever runs next.
        fixed = fleet.push({broken_file(US): None}, "us-east: remove the broken manifest")
        fleet.wait("us-east to recover", lambda: fleet.deployed(US, fixed), DEPLOY_TIMEOUT)
    fleet.wait_state(fixed, FLEET, "success")

