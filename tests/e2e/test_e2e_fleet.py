"""The fleet status against a real Gitea, with real Flux controllers and two
regions' bridges.

One environment serves the module: etcd + kube-apiserver (`tests.e2e.realk8s`) with two namespaces
standing for two clusters, `eu-west` and `us-east`; Gitea with SQLite; one set of source-,
kustomize- and notification-controller watching both (`tests.e2e.e2e_harness`); and two
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

    python -m pytest tests/e2e/test_e2e_fleet.py -q -s     (-s shows the timings and histories)
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import e2e_env as e2e
from tests.e2e.e2e_harness import BridgeProcess, FluxControllers, Gitea
from tests.e2e.realk8s import ControlPlane

pytestmark = pytest.mark.e2e

ORG, REPO = "platform", "fleet"
EU, US = "eu-west", "us-east"
REGIONS = (EU, US)
FLEET = "flux/fleet"
KS = "apps"  # each region's Kustomization (in the region's namespace)


def settings_file(region: str) -> str:
    return f"clusters/{region}/settings.yaml"


def broken_file(region: str) -> str:
    return f"clusters/{region}/broken.yaml"


DEPLOY_TIMEOUT = 90.0  # push -> Kustomization Ready at the commit (usually a few seconds)
STATUS_TIMEOUT = 60.0


def context(region: str) -> str:
    """The region's Kustomization context (the default template; namespace = region)."""
    return e2e.status_context(region, "Kustomization", region, KS)


def source_context(region: str) -> str:
    return e2e.status_context(region, "GitRepository", region, "fleet")


configmap = e2e.configmap_yaml


def healthy_layout(release: str) -> dict[str, str]:
    return {settings_file(r): configmap("apps-settings", r, release=release) for r in REGIONS}


# -- the environment ---------------------------------------------------------------------------------


@dataclass
class Fleet(e2e.Waiting):
    plane: ControlPlane
    gitea: Gitea
    flux: FluxControllers
    bridges: dict[str, BridgeProcess]
    initial_sha: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    # -- Kubernetes ----------------------------------------------------------------------------------

    def suspend(self, region: str, suspended: bool) -> None:
        self.plane.request("PATCH", f"{e2e.collection('Kustomization', region)}/{KS}",
                           {"spec": {"suspend": suspended}},
                           content_type="application/merge-patch+json")

    def kustomization(self, region: str) -> dict[str, Any]:
        return e2e.get_object(self.plane, "Kustomization", region, KS)

    def deployed(self, region: str, sha: str) -> dict[str, Any] | None:
        """The region's Kustomization if it is Ready with `sha` applied, else None."""
        return e2e.applied_at(self.kustomization(region), f"main@sha1:{sha}")

    def failed(self, region: str, sha: str) -> dict[str, Any] | None:
        return e2e.failed_at(self.kustomization(region), f"main@sha1:{sha}")

    # -- Gitea ---------------------------------------------------------------------------------------

    def push(self, files: Mapping[str, str | None], message: str) -> str:
        return e2e.push(self.gitea, ORG, REPO, files, message)

    def history(self, sha: str, ctx: str) -> list[dict[str, Any]]:
        """Every status of `ctx` on `sha` (Gitea keeps them all), oldest first."""
        return e2e.context_history(self.gitea, ORG, REPO, sha, ctx)

    def combined(self, sha: str) -> dict[str, Any]:
        """Gitea's combined status of the commit (the latest per context)."""
        found: dict[str, Any] = self.gitea.api("GET", f"/repos/{ORG}/{REPO}/commits/{sha}/status")
        return found

    def wait_status(self, sha: str, ctx: str, state: str, description: str | None = None
                    ) -> list[dict[str, Any]]:
        """Until the newest status of `ctx` on `sha` is `state` (with `description`, when
        given); returns the context's whole history, oldest first."""
        return self.wait_state(self.gitea, ORG, REPO, sha, ctx, state, STATUS_TIMEOUT,
                               description)

    # -- waiting -------------------------------------------------------------------------------------

    def diagnostics(self) -> list[str]:
        return [*(f"--- bridge {r}\n{b.tail(25)}" for r, b in self.bridges.items()),
                self.flux.logs(15), self.gitea.tail(10)]


def _states(statuses: list[dict[str, Any]]) -> list[str]:
    return [str(s.get("status")) for s in statuses]


def _bridge_config(region: str, gitea: Gitea, events_token: str, home: Path
                   ) -> dict[str, Any]:
    return e2e.bridge_config(
        region, gitea, events_token, home, source_timeout=60, consumer_timeout=120,
        namespaces=[region],  # one cluster each: only its region's Flux objects
        statuses={"resync_interval_seconds": 30, "lease_duration_seconds": 15,
                  "fleet": {"enabled": True, "repositories": [f"{ORG}/{REPO}"],
                            "clusters": list(REGIONS), "context": FLEET}})


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    module_started = time.monotonic()
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("e2e-fleet")
    with e2e.stopping() as teardown:
        plane, gitea, flux = e2e.start_peers(workdir, teardown, timings, e2e.FLUX_NS, *REGIONS)
        gitea.create_org(ORG)
        gitea.create_repo(ORG, REPO, private=True)

        bridges: dict[str, BridgeProcess] = {}
        tokens: dict[str, dict[str, str]] = {}
        with e2e.timed(timings, "two bridges"):
            for region in REGIONS:
                home = workdir / f"bridge-{region}"
                home.mkdir()
                tokens[region] = {"webhook": secrets.token_hex(16),
                                  "events": secrets.token_hex(16)}
                bridges[region] = BridgeProcess(
                    _bridge_config(region, gitea, tokens[region]["events"], home),
                    plane.kubeconfig, home)
                bridges[region].start()
                teardown.append(bridges[region].stop)

        env = Fleet(plane, gitea, flux, bridges, timings=timings)
        with e2e.timed(timings, "initial deploy (both regions Ready)"):
            env.initial_sha = _make_regions(env, tokens)
        with e2e.timed(timings, "initial fleet success"):
            env.wait_status(env.initial_sha, FLEET, "success")
        timings["environment total"] = time.monotonic() - module_started
        yield env
        e2e.print_timings("e2e fleet timings", timings)
        print(f"  component start: control plane {plane.timings}, gitea {gitea.timings}, "
              f"flux {flux.timings}, bridges {[b.timings for b in bridges.values()]}")
        print(f"  module total {time.monotonic() - module_started:.1f}s")


def _make_regions(env: Fleet, tokens: dict[str, dict[str, str]]) -> str:
    """The repository's first layout, each region's Flux objects and webhook; waits until both
    regions deployed the first commit. Returns that commit."""
    sha = env.push(healthy_layout("1"), "fleet: eu-west and us-east")
    for region in REGIONS:
        bridge = env.bridges[region]
        plane = env.plane
        e2e.create_secret(plane, region, "gitea-auth", {"username": env.gitea.admin,
                                                        "password": env.gitea.token})
        e2e.create_secret(plane, region, "webhook-token", {"token": tokens[region]["webhook"]})
        e2e.alert_to_bridge(plane, region, f"{bridge.url}/events", tokens[region]["events"],
                            ["GitRepository", "Kustomization"])
        e2e.git_repository(plane, region, "fleet", env.gitea.clone_url(ORG, REPO))
        e2e.kustomization(plane, region, KS, f"./clusters/{region}",
                          source=("GitRepository", "fleet"))
        e2e.receiver(plane, region, "gitea", "github", "webhook-token",
                     [("GitRepository", "fleet"), ("Kustomization", KS)], events=["push"])
    for region in REGIONS:
        env.bridges[region].wait_receivers(1)
        hook = e2e.hook_path(tokens[region]["webhook"], "gitea", region)
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
        fleet.wait_status(sha, context(EU), "success")
        fleet.wait("eu-west Ready at the commit", lambda: fleet.deployed(EU, sha), DEPLOY_TIMEOUT)
        # us-east fetched the commit all the same: its GitRepository's `success` is on it, and
        # says fetched, not deployed.
        fleet.wait_status(sha, source_context(US), "success")
        # eu-west's bridge decides it from what Gitea shows: eu-west done, us-east not.
        fleet.wait_status(sha, FLEET, "pending", f"Deployed in 1 of 2 clusters; waiting for {US}")
        us_east = fleet.history(sha, context(US))
        assert "success" not in _states(us_east), e2e.shown(us_east)
        assert fleet.deployed(US, sha) is None, "us-east deployed while suspended"
        assert "success" not in _states(fleet.history(sha, FLEET))
    finally:
        fleet.suspend(US, False)

    # Resumed, kustomize-controller applies the commit in us-east; its events reach us-east's
    # bridge, whose post (and fleet check) turns the aggregate to success.
    started = time.monotonic()
    fleet.wait("us-east Ready at the commit", lambda: fleet.deployed(US, sha), DEPLOY_TIMEOUT)
    fleet.wait_status(sha, context(US), "success")
    history = fleet.wait_status(sha, FLEET, "success", "Deployed in all 2 clusters")
    fleet.timings["us-east resumed -> fleet success"] = time.monotonic() - started
    print(f"  {FLEET} on {sha[:12]}: {[(s, d) for _, s, d in e2e.shown(history)]}")
    states = _states(history)
    assert states.index("pending") < states.index("success"), states
    assert not {"failure", "error"} & set(states), e2e.shown(history)
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
        fleet.wait_status(sha, context(EU), "success")
        us_east = fleet.wait("us-east to fail at the commit", lambda: fleet.failed(US, sha),
                             DEPLOY_TIMEOUT)
        assert e2e.condition(us_east, "Ready")["reason"] == "BuildFailed", us_east["status"]
        fleet.wait_status(sha, context(US), "failure")
        history = fleet.wait_status(sha, FLEET, "failure", f"Failed in {US}")
        print(f"  {FLEET} on {sha[:12]}: {[(s, d) for _, s, d in e2e.shown(history)]}")
        assert "success" not in _states(history), e2e.shown(history)
        assert fleet.combined(sha)["state"] == "failure"
    finally:
        # Leave both regions healthy for whatever runs next.
        fixed = fleet.push({broken_file(US): None}, "us-east: remove the broken manifest")
        fleet.wait("us-east to recover", lambda: fleet.deployed(US, fixed), DEPLOY_TIMEOUT)
    fleet.wait_status(fixed, FLEET, "success")

