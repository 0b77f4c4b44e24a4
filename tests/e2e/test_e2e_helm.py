"""HelmReleases end to end with every component real: Gitea -> bridge -> source-controller ->
helm-controller -> events -> bridge -> Gitea commit status, and `GET /deliveries/{id}?wait=`.

One environment serves the module: etcd + kube-apiserver (`tests.e2e.realk8s`), Gitea with SQLite
and its container registry on the same loopback port, source-, notification- and
helm-controller (the HelmRelease CRD from helm-controller's own module) and the bridge
(`tests.e2e.e2e_harness`). helm-controller installs with the admin kubeconfig into `helm-apps`;
the charts render ConfigMaps only (there is no kubelet, so nothing else would ever be ready).

Two HelmReleases, one per way a chart reaches the cluster:
- `web-git`: chart `./charts/web` of `platform/fleet` through the GitRepository `fleet`, with
  `reconcileStrategy: Revision`, so every commit is a chart version `0.1.0+<commit[:12]>` and
  the release's status names the commit. The github-type Receiver `gitea` (push events) lists
  the GitRepository and the HelmRelease; its hook URL on the bridge is the repository's webhook.
- `web-oci`: chart `greeter` from the HelmRepository `gitea-charts` of type `oci`
  (`oci://<gitea>/platform`, plain HTTP, anonymous pulls: `platform` is public), versions
  `>=1.0.0 <2.0.0`. `helm push` puts a chart into Gitea's registry; Gitea sends a `package`
  event to the organisation's webhook, the Receiver `gitea-packages`, which lists the
  HelmRepository, the HelmChart helm-controller generates (`flux-system-web-oci`) and the
  HelmRelease. Intervals are 1h, so only the bridge's annotations move the chart.
A generic-hmac Provider and an Alert send the GitRepository's and the HelmReleases' events to
the bridge's /events.

Each test pushes content of its own and waits for its own delivery, so they pass in any order.

    python -m pytest tests/e2e/test_e2e_helm.py -q -s     (-s shows the timings)
"""

from __future__ import annotations

import functools
import itertools
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from receiver.delivery.marks import DELIVERIES_ANNOTATION
from tests.e2e import e2e_env as e2e
from tests.e2e.e2e_harness import FLUX_BINARIES, HELM_CONTROLLER, BridgeProcess, child_env

pytestmark = pytest.mark.e2e

ORG, REPO = "platform", "fleet"
CLUSTER = "eu-west"
NS, APPS_NS = e2e.FLUX_NS, "helm-apps"
GIT_RELEASE, OCI_RELEASE = "web-git", "web-oci"
CHART_DIR = "charts/web"
GIT_CHART_VERSION = "0.1.0"
OCI_CHART = "greeter"
OCI_RANGE = ">=1.0.0 <2.0.0"
GENERATED_CHART = f"{NS}-{OCI_RELEASE}"  # the HelmChart helm-controller makes for web-oci
GIT_RECEIVER, PACKAGE_RECEIVER = "gitea", "gitea-packages"
# Only what this module needs: kustomize-controller has nothing to apply here.
CONTROLLERS = (*(n for n in FLUX_BINARIES if n != "kustomize-controller"), HELM_CONTROLLER)

DEPLOY_TIMEOUT = 120.0  # push -> release upgraded (usually a few seconds)
HOOK_TIMEOUT = 30.0
STATUS_TIMEOUT = 90.0


def context(release: str) -> str:
    return e2e.status_context(CLUSTER, "HelmRelease", NS, release)


# -- the charts ------------------------------------------------------------------------------------


def chart_files(name: str, version: str, release: str, *, broken: bool = False
                ) -> dict[str, str]:
    """A chart rendering one ConfigMap, `<release name>-settings`, with `release` and the chart
    version. `broken`: the ConfigMap's name is not a valid object name, so the API server
    refuses it and the install or upgrade fails."""
    cm_name = "Broken_Name" if broken else "{{ .Release.Name }}-settings"
    return {
        "Chart.yaml": f"apiVersion: v2\nname: {name}\nversion: {version}\ntype: application\n",
        "values.yaml": f'release: "{release}"\n',
        "templates/configmap.yaml": (
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n"
            f"  name: {cm_name}\n"
            "data:\n"
            "  release: {{ .Values.release | quote }}\n"
            "  chart: {{ .Chart.Version | quote }}\n"),
    }


def in_repo(files: dict[str, str]) -> dict[str, str | None]:
    return {f"{CHART_DIR}/{path}": text for path, text in files.items()}


# -- the environment ---------------------------------------------------------------------------------


@dataclass
class HelmEnv(e2e.BridgeEnv):
    workdir: Path
    webhook_token: str
    timings: dict[str, float] = field(default_factory=dict)
    minor: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    # -- Kubernetes ----------------------------------------------------------------------------------

    def configmap_data(self, release: str) -> dict[str, str]:
        found = self.plane.request(
            "GET", f"/api/v1/namespaces/{APPS_NS}/configmaps/{release}-settings", ok=(200, 404))
        return dict(found.get("data") or {})

    def release(self, name: str) -> dict[str, Any]:
        return self.get("HelmRelease", name)

    def released(self, name: str, chart_version: str) -> dict[str, Any] | None:
        """The HelmRelease if it is Ready with `chart_version` deployed (its newest history
        snapshot), else None."""
        hr = self.release(name)
        latest = latest_snapshot(hr)
        if (e2e.condition(hr, "Ready").get("status") == "True"
                and latest.get("chartVersion") == chart_version
                and latest.get("status") == "deployed"):
            return hr
        return None

    # -- Gitea and its registry ----------------------------------------------------------------------

    def push(self, files: dict[str, str | None], message: str) -> str:
        return e2e.push(self.gitea, ORG, REPO, files, message)

    def helm(self, *args: str, stdin: str | None = None) -> str:
        """The real helm CLI (testbin's), with its config, cache and registry logins here."""
        home = self.workdir / "helm-home"
        env = child_env(HOME=str(home), HELM_CONFIG_HOME=str(home / "config"),
                        HELM_CACHE_HOME=str(home / "cache"), HELM_DATA_HOME=str(home / "data"))
        out = subprocess.run([str(self.plane.bin_dir / "helm"), *args], input=stdin,
                             capture_output=True, text=True, env=env, cwd=self.workdir,
                             timeout=120, check=False)
        assert out.returncode == 0, f"helm {args[0]} {args[1] if len(args) > 1 else ''} " \
                                    f"failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        return out.stdout + out.stderr

    @property
    def registry(self) -> str:
        return f"127.0.0.1:{self.gitea.port}"

    def push_chart(self, version: str, release: str) -> None:
        """`helm package` a `greeter` chart and `helm push` it to Gitea's registry
        (`oci://<gitea>/platform/greeter:<version>`)."""
        src = self.workdir / "charts" / f"{OCI_CHART}-{version}"
        for path, text in chart_files(OCI_CHART, version, release).items():
            (src / path).parent.mkdir(parents=True, exist_ok=True)
            (src / path).write_text(text)
        out_dir = self.workdir / "packaged"
        out_dir.mkdir(exist_ok=True)
        started = time.monotonic()
        self.helm("package", str(src), "--destination", str(out_dir))
        pushed = self.helm("push", str(out_dir / f"{OCI_CHART}-{version}.tgz"),
                           f"oci://{self.registry}/{ORG}", "--plain-http")
        print(f"  helm push {OCI_CHART}:{version} in {time.monotonic() - started:.2f}s")
        assert f"{ORG}/{OCI_CHART}:{version}" in pushed, pushed

    def push_chart_through_the_bridge(self) -> tuple[str, dict[str, Any], float]:
        """`helm push` a new version of the chart; then Gitea's package event for its tag
        reached the bridge (Gitea also sends one for the manifest digest, which moves no tag),
        which routed it HelmRepository -> HelmChart -> HelmRelease. (version, the accepted
        record, when the push started)."""
        version = f"1.{next(self.minor)}.0"
        seen = len(self.accepted(PACKAGE_RECEIVER))
        started = time.monotonic()
        self.push_chart(version, f"oci-{version}")
        ref = f"oci://{self.registry}/{ORG}/{OCI_CHART}:{version}"
        record = self.next_accepted(PACKAGE_RECEIVER, seen, ref)
        assert record["targets"] == 3, record
        routed = self.delivery(record["id"], self.webhook_token)
        assert [(t["kind"], t["role"]) for t in routed["targets"]] == [
            ("HelmRepository", "annotate"), ("HelmChart", "annotate"),
            ("HelmRelease", "annotate")], routed
        return version, record, started

    def wait_status(self, sha: str, release: str, state: str) -> list[dict[str, Any]]:
        return self.wait_state(self.gitea, ORG, REPO, sha, context(release), state,
                               STATUS_TIMEOUT)

    # -- the bridge ----------------------------------------------------------------------------------

    def accepted(self, receiver: str) -> list[dict[str, Any]]:
        """The bridge's "push accepted" records of one Receiver, oldest first."""
        return [r for r in self.bridge.records("push accepted")
                if r.get("receiver") == f"{NS}/{receiver}"]

    def next_accepted(self, receiver: str, seen: int, ref: str | None = None
                      ) -> dict[str, Any]:
        """The first delivery of `receiver` after the first `seen` ones (with `ref`, the first
        of that ref), once the bridge has logged it."""
        def check() -> dict[str, Any] | None:
            later = self.accepted(receiver)[seen:]
            return next((r for r in later if ref in (None, r.get("ref"))), None)

        return self.wait(f"Gitea's webhook to reach {receiver} on the bridge", check,
                         HOOK_TIMEOUT)

    def lead_time_count(self) -> float:
        return self.metric("gfb_push_to_ready_seconds_count", cluster=CLUSTER)


def latest_snapshot(hr: dict[str, Any]) -> dict[str, Any]:
    """helm-controller's newest release snapshot (`status.history[0]`), or {}."""
    history = (hr.get("status") or {}).get("history") or []
    return dict(history[0]) if history else {}


def git_chart_version(sha: str) -> str:
    """The chart version source-controller builds from commit `sha` (reconcileStrategy
    Revision): the chart's version with the commit's first 12 hex as build metadata."""
    return f"{GIT_CHART_VERSION}+{sha[:12]}"


def targets(delivery: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A delivery's targets by `Kind/name`."""
    return {f"{t['kind']}/{t['name']}": t for t in delivery["targets"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HelmEnv]:
    module_started = time.monotonic()
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("e2e-helm")
    with e2e.stopping() as teardown:
        plane, gitea, flux = e2e.start_peers(workdir, teardown, timings, NS, APPS_NS,
                                             flux_names=CONTROLLERS)
        gitea.create_org(ORG)
        gitea.create_repo(ORG, REPO, private=True)
        tokens = {name: secrets.token_hex(16) for name in ("webhook", "events")}
        with e2e.timed(timings, "bridge"):
            # Deliveries settle in seconds here; short timeouts keep a stuck one cheap.
            bridge = BridgeProcess(e2e.bridge_config(CLUSTER, gitea, tokens["events"], workdir,
                                                     source_timeout=30, consumer_timeout=60),
                                   plane.kubeconfig, workdir)
            bridge.start()
            teardown.append(bridge.stop)
        env = HelmEnv(plane, gitea, flux, bridge, workdir, tokens["webhook"], timings)
        with e2e.timed(timings, "first releases (objects -> both HelmReleases Ready)"):
            _first_releases(env, tokens)
        timings["environment total"] = time.monotonic() - module_started
        e2e.print_timings("e2e Helm environment up", timings)
        print(f"  component start: control plane {plane.timings}, gitea {gitea.timings}, "
              f"flux {flux.timings}, bridge {bridge.timings}")
        yield env
        e2e.print_timings("e2e Helm timings", timings)
        print(f"  module total {time.monotonic() - module_started:.1f}s")


def _first_releases(env: HelmEnv, tokens: dict[str, str]) -> None:
    """The chart in Git and in the registry, the Flux objects, the Receivers and the webhooks;
    waits until helm-controller installed both releases."""
    sha = env.push(in_repo(chart_files("web", GIT_CHART_VERSION, "initial")), "web: chart")
    env.helm("registry", "login", env.registry, "--username", env.gitea.admin,
             "--password-stdin", "--plain-http", stdin=env.gitea.token)
    env.push_chart("1.0.0", "initial")

    env.secret("gitea-auth", {"username": env.gitea.admin, "password": env.gitea.token})
    env.secret("webhook-token", {"token": tokens["webhook"]})
    e2e.alert_to_bridge(env.plane, NS, f"{env.bridge.url}/events", tokens["events"],
                        ["GitRepository", "HelmRelease"])
    e2e.git_repository(env.plane, NS, "fleet", env.gitea.clone_url(ORG, REPO))
    env.create("HelmRepository", "gitea-charts", {
        "type": "oci", "interval": "1h", "insecure": True,
        "url": f"oci://{env.registry}/{ORG}"})
    common = {"interval": "1h", "targetNamespace": APPS_NS,
              "install": {"remediation": {"retries": 0}},
              "upgrade": {"remediation": {"retries": 0}}, "timeout": "1m"}
    for name, chart in ((GIT_RELEASE, {
            "chart": f"./{CHART_DIR}", "reconcileStrategy": "Revision", "interval": "1h",
            "sourceRef": {"kind": "GitRepository", "name": "fleet"}}),
                        (OCI_RELEASE, {
            "chart": OCI_CHART, "version": OCI_RANGE, "interval": "1h",
            "sourceRef": {"kind": "HelmRepository", "name": "gitea-charts"}})):
        env.create("HelmRelease", name, {**common, "releaseName": name,
                                          "chart": {"spec": chart}})
    e2e.receiver(env.plane, NS, GIT_RECEIVER, "github", "webhook-token",
                 [("GitRepository", "fleet"), ("HelmRelease", GIT_RELEASE)], events=["push"])
    e2e.receiver(env.plane, NS, PACKAGE_RECEIVER, "github", "webhook-token",
                 [("HelmRepository", "gitea-charts"), ("HelmChart", GENERATED_CHART),
                  ("HelmRelease", OCI_RELEASE)], events=["package"])
    env.bridge.wait_receivers(2)
    env.wait("helm-controller to install web-git", functools.partial(
        env.released, GIT_RELEASE, git_chart_version(sha)), DEPLOY_TIMEOUT)
    env.wait("helm-controller to install web-oci", functools.partial(
        env.released, OCI_RELEASE, "1.0.0"), DEPLOY_TIMEOUT)
    assert env.configmap_data(GIT_RELEASE) == {"release": "initial",
                                               "chart": git_chart_version(sha)}
    hook = env.bridge.url + e2e.hook_path(tokens["webhook"], GIT_RECEIVER, NS)
    env.gitea.create_hook(ORG, REPO, hook, tokens["webhook"])
    packages = env.bridge.url + e2e.hook_path(tokens["webhook"], PACKAGE_RECEIVER, NS)
    env.gitea.create_org_hook(ORG, packages, tokens["webhook"])


# -- the tests -----------------------------------------------------------------------------------------


def test_chart_commit_is_released_and_reported_at_that_commit(env: HelmEnv) -> None:
    release = f"git-{secrets.token_hex(3)}"
    lead_before = env.lead_time_count()
    seen = len(env.accepted(GIT_RECEIVER))
    started = time.monotonic()
    sha = env.push(in_repo(chart_files("web", GIT_CHART_VERSION, release)),
                   f"web: release {release}")
    record = env.next_accepted(GIT_RECEIVER, seen)
    assert record["commit"] == sha, record

    # The CI gate's wait: the stream ends `ready` ...
    lines = env.follow(record["id"], env.webhook_token, DEPLOY_TIMEOUT)
    env.timings["git push -> delivery ready (?wait=)"] = time.monotonic() - started
    # ... and by then helm-controller has really upgraded the release to the commit's chart:
    # its newest snapshot is that chart version, deployed, and the ConfigMap it renders holds
    # the pushed values.
    hr = env.release(GIT_RELEASE)
    final = lines[-1]
    print(f"  delivery {final['outcome']} after {len(lines)} line(s); "
          f"targets {[(t['kind'], t['state']) for t in final['targets']]}")
    assert final["outcome"] == "ready" and final["final"], final
    snapshot = latest_snapshot(hr)
    assert snapshot.get("chartVersion") == git_chart_version(sha), hr["status"]
    assert snapshot.get("status") == "deployed", hr["status"]
    assert e2e.condition(hr, "Ready")["status"] == "True", hr["status"]
    assert env.configmap_data(GIT_RELEASE) == {"release": release,
                                               "chart": git_chart_version(sha)}
    found = targets(final)
    assert set(found) == {"GitRepository/fleet", f"HelmRelease/{GIT_RELEASE}"}, final
    assert found[f"HelmRelease/{GIT_RELEASE}"]["state"] == "ready", final

    # Gitea shows the commit pending, then success, for the HelmRelease's context.
    history = env.wait_status(sha, GIT_RELEASE, "success")
    env.timings["git push -> success status"] = time.monotonic() - started
    print(f"  {context(GIT_RELEASE)} on {sha[:12]}: {e2e.described(history)}")
    states = [s["status"] for s in history]
    assert "pending" in states[:-1], history
    assert "failure" not in states and "error" not in states, history

    # The delivery's one consumer, the HelmRelease, became Ready: one lead-time observation.
    assert env.lead_time_count() >= lead_before + 1


def test_chart_pushed_to_gitea_registry_upgrades_the_release(env: HelmEnv) -> None:
    version, record, started = env.push_chart_through_the_bridge()
    # The delivery follows the HelmChart and the HelmRelease to Ready ...
    def chart_and_release_ready() -> dict[str, Any] | None:
        found = env.delivery(record["id"], env.webhook_token)
        states = {key: t["state"] for key, t in targets(found).items()}
        return found if (states[f"HelmChart/{GENERATED_CHART}"], states[
            f"HelmRelease/{OCI_RELEASE}"]) == ("ready", "ready") else None

    delivery = env.wait("the HelmChart and the HelmRelease ready in the delivery",
                        chart_and_release_ready, DEPLOY_TIMEOUT)
    env.timings["helm push -> HelmRelease ready in the delivery"] = time.monotonic() - started
    print(f"  delivery {delivery['outcome']}: "
          f"{[(t['kind'], t['state'], t.get('detail')) for t in delivery['targets']]}")
    # ... and by then source-controller has fetched the pushed chart and helm-controller has
    # really upgraded the release to it: the status says so, and the ConfigMap it renders has
    # the pushed content.
    chart = env.get("HelmChart", GENERATED_CHART)
    assert (chart.get("status") or {}).get("artifact", {}).get("revision") == version, chart
    hr = env.release(OCI_RELEASE)
    snapshot = latest_snapshot(hr)
    assert (snapshot.get("chartName"), snapshot.get("chartVersion"), snapshot.get("status")) \
        == (OCI_CHART, version, "deployed"), hr["status"]
    assert e2e.condition(hr, "Ready")["status"] == "True", hr["status"]
    assert env.configmap_data(OCI_RELEASE) == {"release": f"oci-{version}", "chart": version}
    # The bridge asked for it: its request on the HelmRelease names this delivery.
    marks = env.annotations("HelmRelease", OCI_RELEASE).get(DELIVERIES_ANNOTATION, "")
    assert record["mark"] in marks, (marks, record)


def test_chart_pushed_to_gitea_registry_settles_the_delivery_ready(env: HelmEnv) -> None:
    version, record, _ = env.push_chart_through_the_bridge()
    lines = env.follow(record["id"], env.webhook_token, DEPLOY_TIMEOUT)
    final = lines[-1]
    print(f"  delivery {final['outcome']}: "
          f"{[(t['kind'], t['state'], t.get('detail')) for t in final['targets']]}")
    # The release is upgraded (as the test above shows) ...
    assert latest_snapshot(env.release(OCI_RELEASE)).get("chartVersion") == version
    # ... so the CI gate's wait must say so.
    assert final["outcome"] == "ready", final


def test_broken_chart_upgrade_fails_the_delivery_and_the_commit(env: HelmEnv) -> None:
    seen = len(env.accepted(GIT_RECEIVER))
    release = f"broken-{secrets.token_hex(3)}"
    sha = env.push(in_repo(chart_files("web", GIT_CHART_VERSION, release, broken=True)),
                   "web: a ConfigMap the API server refuses")
    record = env.next_accepted(GIT_RECEIVER, seen)
    lines = env.follow(record["id"], env.webhook_token, DEPLOY_TIMEOUT)
    final = lines[-1]
    hr = env.release(GIT_RELEASE)
    ready = e2e.condition(hr, "Ready")
    print(f"  delivery {final['outcome']}: {targets(final)[f'HelmRelease/{GIT_RELEASE}']}")
    print("  HelmRelease conditions: " + ", ".join(
        f"{c['type']}={c['status']} {c['reason']}" for c in hr["status"]["conditions"]))

    # helm-controller attempted this commit's chart and failed the upgrade ...
    assert hr["status"].get("lastAttemptedRevision") == git_chart_version(sha), hr["status"]
    assert ready["status"] == "False" and ready["reason"] == "UpgradeFailed", hr["status"]
    assert "Broken_Name" in ready["message"], ready
    # ... nothing it rendered changed ...
    assert env.configmap_data(GIT_RELEASE).get("release") != release
    # ... and the delivery says so, with helm-controller's reason.
    assert final["outcome"] == "failed", final
    target = targets(final)[f"HelmRelease/{GIT_RELEASE}"]
    assert target["state"] == "failed", final
    # The cause, whether the bridge saw the release fail before or after helm-controller also
    # marked it Stalled (RetriesExceeded: "Failed to upgrade after 1 attempt(s)").
    assert target["detail"]["reason"] == "UpgradeFailed", target
    assert "Broken_Name" in target["detail"]["message"], target

    # Gitea shows failure on the commit for the HelmRelease's context, never success.
    history = env.wait_status(sha, GIT_RELEASE, "failure")
    print(f"  {context(GIT_RELEASE)} on {sha[:12]}: {e2e.described(history)}")
    assert "success" not in [s["status"] for s in history], history
    assert history[-1]["description"].startswith("Upgrade failed"), history[-1]
