"""The whole loop with every component real: Gitea push -> bridge -> Flux -> events -> bridge ->
Gitea commit status.

One environment serves the module: etcd + kube-apiserver (`tests.e2e.realk8s`), Gitea with SQLite,
source-, kustomize- and notification-controller, and the bridge as `gitea-flux-bridge serve`
(`tests.e2e.e2e_harness`), all on 127.0.0.1. Gitea holds `platform/fleet`, a small multi-region
fleet; the GitRepository clones it over HTTP with the admin's token; two Kustomizations apply
ConfigMaps from `clusters/eu-west/apps` and `clusters/eu-west/infra` (no Pods: there is no
kubelet). A github-type Receiver's hook URL on the bridge is the repository's Gitea webhook; a
generic-hmac Provider and an Alert send every GitRepository and Kustomization event to the
bridge's /events. Intervals are 1h, so only the bridge's annotations and new artifacts move
Flux.

The tests run in file order and build on each other's commits, as one story.

    python -m pytest tests/e2e/test_e2e_loop.py -q -x -s     (-s shows the timings)
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.delivery.marks import DELIVERIES_ANNOTATION
from tests.e2e import e2e_env as e2e
from tests.e2e.e2e_harness import BridgeProcess, metric_value, rss_kib
from tests.e2e.realk8s import ROOT

pytestmark = pytest.mark.e2e

ORG, REPO = "platform", "fleet"
CLUSTER = "eu-west"
NS = e2e.FLUX_NS
APPS_NS, INFRA_NS = "eu-west-apps", "eu-west-infra"
APPS_PATH, INFRA_PATH = "clusters/eu-west/apps", "clusters/eu-west/infra"
APPS_FILE, INFRA_FILE = f"{APPS_PATH}/settings.yaml", f"{INFRA_PATH}/settings.yaml"
BROKEN_FILE = f"{INFRA_PATH}/broken.yaml"
NOTIFY = ROOT / ".gitea" / "actions" / "notify-flux" / "notify.sh"

DEPLOY_TIMEOUT = 120.0  # push -> Kustomization Ready at the commit (usually a few seconds)
STATUS_TIMEOUT = 90.0


def context(name: str) -> str:
    return e2e.status_context(CLUSTER, "Kustomization", NS, name)


configmap = e2e.configmap_yaml


# -- the environment ---------------------------------------------------------------------------------


@dataclass
class Loop(e2e.BridgeEnv):
    workdir: Path
    webhook_token: str
    actions_token: str
    hook_id: int = 0
    initial_sha: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)  # what a test pushed, for later ones
    promotion: dict[str, Any] = field(default_factory=dict)  # the pull request, once made

    # -- Kubernetes ----------------------------------------------------------------------------------

    def configmap_data(self, namespace: str, name: str) -> dict[str, str]:
        found = self.plane.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}",
                                   ok=(200, 404))
        return dict(found.get("data") or {})

    def deployed(self, name: str, sha: str) -> dict[str, Any] | None:
        """The Kustomization if it is Ready with `sha` applied, else None."""
        return e2e.applied_at(self.get("Kustomization", name), f"main@sha1:{sha}")

    def failed(self, name: str, sha: str) -> dict[str, Any] | None:
        return e2e.failed_at(self.get("Kustomization", name), f"main@sha1:{sha}")

    def source_at(self, sha: str) -> dict[str, Any] | None:
        return e2e.artifact_at(self.get("GitRepository", "fleet"), f"main@sha1:{sha}")

    # -- Gitea ---------------------------------------------------------------------------------------

    def push(self, files: dict[str, str | None], message: str) -> str:
        return e2e.push(self.gitea, ORG, REPO, files, message)

    def statuses(self, sha: str, name: str) -> list[dict[str, Any]]:
        return e2e.context_history(self.gitea, ORG, REPO, sha, context(name))

    def wait_status(self, sha: str, name: str, state: str, timeout: float = STATUS_TIMEOUT
                    ) -> list[dict[str, Any]]:
        """Until the newest status of the Kustomization's context on `sha` is `state`; returns
        the context's whole history, oldest first."""
        return self.wait_state(self.gitea, ORG, REPO, sha, context(name), state, timeout)


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    module_started = time.monotonic()
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("e2e")
    with e2e.stopping() as teardown:
        plane, gitea, flux = e2e.start_peers(workdir, teardown, timings, NS, APPS_NS, INFRA_NS)
        gitea.create_org(ORG)
        gitea.create_repo(ORG, REPO, private=True)

        tokens = {name: secrets.token_hex(16) for name in ("webhook", "actions", "events")}
        with e2e.timed(timings, "bridge"):
            bridge = BridgeProcess(e2e.bridge_config(
                CLUSTER, gitea, tokens["events"], workdir,
                # Few attempts, so a status lost while Gitea is down is repaired by the resync
                # (every 5 s), not by a late retry.
                statuses={"resync_interval_seconds": 5, "max_attempts": 3,
                          "lease_duration_seconds": 15}), plane.kubeconfig, workdir)
            bridge.start()
            teardown.append(bridge.stop)

        env = Loop(plane, gitea, flux, bridge, workdir, tokens["webhook"], tokens["actions"],
                   timings=timings)
        with e2e.timed(timings, "initial deploy (objects -> both Kustomizations Ready)"):
            env.initial_sha = _make_fleet(env, tokens)
        with e2e.timed(timings, "initial success statuses in Gitea"):
            for name in ("apps", "infra"):
                env.wait_status(env.initial_sha, name, "success")
        timings["environment total"] = time.monotonic() - module_started
        e2e.print_timings("e2e environment up", timings)
        print(f"  component start: control plane {plane.timings}, gitea {gitea.timings}, "
              f"flux {flux.timings}, bridge {bridge.timings}")
        yield env
        e2e.print_timings("e2e timings", timings)
        rss = {"bridge": rss_kib(bridge.pid)} | {n: rss_kib(flux.pid(n)) for n in flux.processes}
        print("  RSS (MiB): " + ", ".join(f"{k} {v / 1024:.0f}" for k, v in rss.items()))
        print(f"  module total {time.monotonic() - module_started:.1f}s")


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
    e2e.alert_to_bridge(env.plane, NS, f"{env.bridge.url}/events", tokens["events"],
                        ["GitRepository", "Kustomization"])
    e2e.git_repository(env.plane, NS, "fleet", env.gitea.clone_url(ORG, REPO))
    for name, path in (("apps", APPS_PATH), ("infra", INFRA_PATH)):
        e2e.kustomization(env.plane, NS, name, f"./{path}", source=("GitRepository", "fleet"))
    resources = [("GitRepository", "fleet"), ("Kustomization", "apps"),
                 ("Kustomization", "infra")]
    e2e.receiver(env.plane, NS, "gitea", "github", "webhook-token", resources, events=["push"])
    e2e.receiver(env.plane, NS, "actions", "generic", "actions-token", resources)
    env.bridge.wait_receivers(2)
    for name in ("apps", "infra"):
        env.wait(f"first deploy of {name}", functools.partial(env.deployed, name, sha),
                 DEPLOY_TIMEOUT)
    hook = e2e.hook_path(tokens["webhook"], "gitea", NS)
    env.hook_id = env.gitea.create_hook(ORG, REPO, f"{env.bridge.url}{hook}", tokens["webhook"])
    return sha


# -- the tests -----------------------------------------------------------------------------------------


def test_push_annotates_the_source_and_the_touched_kustomization_only(loop: Loop) -> None:
    before = loop.annotations("GitRepository", "fleet").get(e2e.RECONCILE)
    assert e2e.RECONCILE not in loop.annotations("Kustomization", "infra")
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
        loop.annotations("GitRepository", "fleet").get(e2e.RECONCILE), before), 30)
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
    apps_value = loop.annotations("Kustomization", "apps").get(e2e.RECONCILE, "")
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
    assert e2e.RECONCILE not in loop.annotations("Kustomization", "infra")


def test_commit_statuses_pending_then_success_and_failure_with_flux_reason(loop: Loop) -> None:
    sha = loop.commits.get("apps-2") or loop.push(
        {APPS_FILE: configmap("apps-settings", APPS_NS, release="2b")}, "apps: release 2b")
    history = loop.wait_status(sha, "apps", "success")
    states = [s["status"] for s in history]
    print(f"  apps on {sha[:12]}: {e2e.described(history)}")
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
    print(f"  infra on {broken[:12]}: {e2e.described(history)}")
    reason = e2e.condition(infra, "Ready")["reason"]
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
    print(f"  gitea down {down:.1f}s; apps on {sha[:12]}: {e2e.described(history)}")
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
    hook = e2e.hook_path(loop.actions_token, "actions", NS)
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



def _promotion(loop: Loop) -> dict[str, Any]:
    """A pull request promoting main into `production`, a branch protected by this cluster's
    Kustomization contexts (a glob), made once for the module around a deployed push of its own
    (the tests using it hold in any order). Returns the pull request and the contexts."""
    if not loop.promotion:
        # production starts one commit behind: the pull request holds that one push.
        before = loop.gitea.api("GET", f"/repos/{ORG}/{REPO}/branches/main")["commit"]["id"]
        head = loop.push({APPS_FILE: configmap("apps-settings", APPS_NS, release="5")},
                         "apps: release 5")
        contexts = [context("apps"), context("infra"),
                    e2e.status_context(CLUSTER, "GitRepository", NS, "fleet")]
        for name in contexts:
            loop.wait_state(loop.gitea, ORG, REPO, head, name, "success", STATUS_TIMEOUT)
        loop.gitea.api("POST", f"/repos/{ORG}/{REPO}/branches",
                       {"new_branch_name": "production", "old_ref_name": before})
        loop.gitea.api("POST", f"/repos/{ORG}/{REPO}/branch_protections", {
            "rule_name": "production", "enable_status_check": True,
            "status_check_contexts": [context("*")]})
        pull = loop.gitea.api("POST", f"/repos/{ORG}/{REPO}/pulls", {
            "head": "main", "base": "production", "title": "Promote main to production"})
        loop.promotion.update(pull=pull, contexts=contexts)
    return loop.promotion


@contextlib.contextmanager
def _public(loop: Loop) -> Iterator[None]:
    """The repository public meanwhile: what an anonymous reader (or browser) gets."""
    loop.gitea.api("PATCH", f"/repos/{ORG}/{REPO}", {"private": False})
    try:
        yield
    finally:
        loop.gitea.api("PATCH", f"/repos/{ORG}/{REPO}", {"private": True})


def test_gitea_shows_the_bridges_statuses_on_a_promotion_pull_request(loop: Loop) -> None:
    """What a reviewer sees in Gitea: the pull request's merge box lists the bridge's statuses
    of main's commit (Gitea's commit page shows them only in a hover pop-up), the branch
    protection's required contexts are met by them, and it can be merged."""
    promotion = _promotion(loop)
    with _public(loop), httpx.Client(trust_env=False, timeout=30) as client:
        page = client.get(promotion["pull"]["html_url"]).text
    panel = page[page.rindex("commit-status-panel"):]  # the merge box's (the last one)
    assert "All checks were successful" in panel[:2000], panel[:2000]
    for name in promotion["contexts"]:
        assert name in panel, name
    assert panel.count("Required") == 2, "the two Kustomization contexts are the required ones"
    merge = loop.gitea.api("GET", f"/repos/{ORG}/{REPO}/pulls/{promotion['pull']['number']}")
    assert merge["mergeable"], merge


def test_screenshot_of_the_statuses_in_gitea(loop: Loop, tmp_path: Path) -> None:
    """The pull request page as a browser shows it (headless Chromium), saved as a PNG in
    $GFBTEST_SCREENSHOTS when set (the README's picture is one), else in the test's temp dir."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    missing = []
    if chromium is None:
        missing.append("chromium is not installed (Debian: apt-get install chromium)")
    if not (loop.gitea.static_root / "public" / "assets" / ".vite" / "manifest.json").is_file():
        missing.append("the test Gitea has no built web frontend, so its pages have no style "
                       "(scripts/gitea-frontend.sh builds it)")
    if missing:
        # .ci/run installs both: there, a missing one is a broken CI, not a reason to skip.
        if os.environ.get("CI"):
            pytest.fail("; ".join(missing))
        pytest.skip("; ".join(missing))
    assert chromium is not None
    promotion = _promotion(loop)
    out = Path(os.environ.get("GFBTEST_SCREENSHOTS") or tmp_path) / "gitea-pull-statuses.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with _public(loop):
        shot = subprocess.run([
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-proxy-server", f"--user-data-dir={tmp_path / 'chromium'}",
            "--window-size=1000,1050", f"--screenshot={out}", promotion["pull"]["html_url"]],
            capture_output=True, text=True, timeout=120, check=False)
    assert out.is_file() and out.read_bytes().startswith(b"\x89PNG"), shot.stderr[-2000:]
    print(f"  screenshot of {promotion['pull']['html_url']}: {out} ({out.stat().st_size} bytes)")

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
