"""Pull-request previews with every component real: a pull request opened in Gitea -> its webhook
-> the bridge annotates flux-operator's ResourceSetInputProvider -> flux-operator lists the pull
request from Gitea -> its ResourceSet renders a GitRepository at the head commit and a
Kustomization -> both Ready -> the bridge's statuses on the head commit and its one comment on
the pull request in Gitea; a new commit edits that comment in place, closing the pull request
makes flux-operator delete the preview and the comment say so, and a broken manifest shows as
`failure` with its reason.

Two bridge replicas run behind a round-robin proxy (`tests.e2e.proxy_harness`, as a Service
without affinity): Gitea's webhook and notification-controller's events go through it, so
either replica takes any of them, and only the holder of the resync Lease writes comments:
every wait on a comment fails at once if the pull request ever shows two. The last test loses
the holder (SIGKILL) and the other replica, once it holds the Lease, edits the same comment.

The peers of the other whole-loop modules (etcd + kube-apiserver, Gitea, source-, kustomize-
and notification-controller, the bridge), plus flux-operator (`scripts/testbin.sh operator`)
run outside a cluster: the admin kubeconfig, leader election, metrics and web server off, and
FIPS mode on (it refuses to run without). Its CRDs come from its module; the Receiver CRD gets
ResourceSetInputProvider in its kinds, as flux-operator adds it when it installs Flux. The
bridge runs with the chart's ServiceAccount and RBAC, and the API server's audit log counts its
patches of the provider.

The provider polls every POLL_INTERVAL; the second test opens a pull request with the webhook
off, so the two tests print how long a preview takes with the bridge and by polling alone.
Each test opens pull requests of its own, so they pass in any order.

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
    metric_value,
)
from tests.e2e.e2e_harness import module_dir as component_dir
from tests.e2e.proxy_harness import RoundRobinProxy, nginx_binary
from tests.e2e.realk8s import (
    FLUX_GROUPS,
    ControlPlane,
    ControlPlaneError,
    audit_policy,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.e2e

ORG, REPO = "platform", "app"
CLUSTER = "eu-west"
NS = e2e.FLUX_NS
OPERATOR = "flux-operator"
OPERATOR_GROUP = "fluxcd.controlplane.io"
OPERATOR_API = f"{OPERATOR_GROUP}/v1"
PROVIDER = "app-prs"
# The provider's own polling interval (flux-operator's reconcileEvery annotation; its default
# is 10 minutes). The polling-only test waits for the next poll (half of this on average):
# 20 s keeps it short while the bridge's path, a few seconds, stays clearly the faster one.
POLL_INTERVAL = 20.0
PREVIEW_TIMEOUT = 120.0  # with the webhook: usually a few seconds
STATUS_TIMEOUT = 90.0
COMMENT_TIMEOUT = 120.0  # a change in the cluster -> the comment edited (coalesced, 2 s here)
TEARDOWN_TIMEOUT = 180.0  # closed -> flux-operator's next reconcile -> objects finalized
APP_FILE = "app/settings.yaml"
APP_NS = "previews"  # where the previews' ConfigMaps go (prefixed pr-<number>-)
REPLICAS = 2
RELEASE = "previews"  # the chart release whose ServiceAccount and RBAC the replicas run with
LEASE = "previews-resync"  # the resync Lease: its holder alone writes comments
MARKER = f"<!-- gitea-flux-bridge:preview cluster={CLUSTER} -->"
HOOK_EVENTS = ("pull_request", "pull_request_sync", "pull_request_label")


class TwoComments(ControlPlaneError):
    """A pull request showed two preview comments of the bridge: fails a wait at once (a
    ControlPlaneError is the one error `wait_until` does not retry)."""


def preview(number: int) -> str:
    return f"app-pr-{number}"


def preview_url(number: int) -> str:
    return f"https://pr-{number}.preview.example.com"


@dataclass
class Previews(e2e.BridgeEnv):
    operator: _EnvProcess
    webhook_token: str
    bridge_user: str
    replicas: list[BridgeProcess]  # `bridge` is one of them
    proxy: RoundRobinProxy
    bridge_config: dict[str, Any]
    kubeconfig: Path
    workdir: Path
    hook_id: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def diagnostics(self) -> list[str]:
        return [*super().diagnostics(), *(b.tail(20) for b in self.replicas[1:]),
                self.operator.tail(30)]

    def provider(self) -> dict[str, Any]:
        return self.plane.request("GET", _operator_path(PROVIDER, "resourcesetinputproviders"))

    def bridge_patches(self) -> int:
        """The bridge's patches of the provider, from the API server's audit log."""
        return self.plane.count_patches(self.bridge_user, OPERATOR_GROUP,
                                        "resourcesetinputproviders", NS, PROVIDER)

    def exported(self) -> list[dict[str, Any]]:
        return list((self.provider().get("status") or {}).get("exportedInputs") or [])

    def open_pull_request(self, branch: str, title: str, namespace: str = APP_NS
                          ) -> tuple[int, str]:
        """A branch with one commit off main (its ConfigMap in `namespace`) and a pull request
        of it; (number, head sha)."""
        sha = self.gitea.commit_files(ORG, REPO, {APP_FILE: e2e.configmap_yaml(
            "settings", namespace, branch=branch)}, f"{branch}: change", new_branch=branch)
        pull = self.gitea.api("POST", f"/repos/{ORG}/{REPO}/pulls",
                              {"head": branch, "base": "main", "title": title})
        return int(pull["number"]), sha

    def push_to(self, branch: str, **data: str) -> str:
        """A new commit on a pull request's branch; its sha."""
        return self.gitea.commit_files(ORG, REPO, {APP_FILE: e2e.configmap_yaml(
            "settings", APP_NS, branch=branch, **data)}, f"{branch}: more", branch=branch)

    def accepted(self, number: int) -> tuple[BridgeProcess, dict[str, Any]] | None:
        """The replica that accepted the pull request's webhook, and its log record."""
        for bridge in self.replicas:
            for record in bridge.records("push accepted"):
                if record.get("ref") == f"refs/pull/{number}/head":
                    return bridge, record
        return None

    def comments(self, number: int) -> list[dict[str, Any]]:
        """The bridge's preview comments on the pull request (its marker, its Gitea user)."""
        listed = self.gitea.api("GET", f"/repos/{ORG}/{REPO}/issues/{number}/comments")
        return [c for c in listed
                if MARKER in c["body"] and c["user"]["login"] == self.gitea.admin]

    def comment_saying(self, number: int, *texts: str, absent: tuple[str, ...] = ()
                       ) -> dict[str, Any] | None:
        """The pull request's one preview comment once it says every text (and none of
        `absent`); two comments fail at once."""
        found = self.comments(number)
        if len(found) > 1:
            raise TwoComments(f"#{number} shows {len(found)} preview comments: "
                              f"{[(c['id'], c['body'][:80]) for c in found]}")
        if not found:
            return None
        body = found[0]["body"]
        if all(t in body for t in texts) and not any(t in body for t in absent):
            return found[0]
        return None

    def wait_comment(self, number: int, what: str, *texts: str,
                     absent: tuple[str, ...] = ()) -> dict[str, Any]:
        return self.wait(f"#{number}'s comment {what}",
                         lambda: self.comment_saying(number, *texts, absent=absent),
                         COMMENT_TIMEOUT, lambda: f"comments: {self.comments(number)}")

    def comments_created(self) -> dict[str, float]:
        """Comments each replica created (its gfb_pr_comments_total, result created)."""
        return {b.url: metric_value(b.metrics(), "gfb_pr_comments_total",
                                    {"result": "created"}) for b in self.replicas}

    def leader(self) -> BridgeProcess | None:
        """The replica whose own gauge says it holds the Lease (the one writing comments)."""
        claims = [b for b in self.replicas
                  if metric_value(b.metrics(), "gfb_resync_leader") == 1]
        return claims[0] if len(claims) == 1 else None

    def spawn(self) -> BridgeProcess:
        """One more replica, behind the proxy once it is ready."""
        workdir = self.workdir / f"r{len(list(self.workdir.glob('r*'))) + 1}"
        workdir.mkdir()
        bridge = BridgeProcess(self.bridge_config, self.kubeconfig, workdir).start()
        bridge.wait_receivers(1)
        self.replicas.append(bridge)
        self.proxy.set_upstreams(b.port for b in self.replicas)
        return bridge

    def lease_holder(self) -> str:
        lease = self.plane.request(
            "GET", f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{LEASE}", ok=(200, 404))
        return str((lease.get("spec") or {}).get("holderIdentity") or "")

    def gone(self, path: str) -> bool:
        """The API server no longer has the object (not merely being deleted)."""
        found = self.plane.request("GET", path, ok=(200, 404))
        return found.get("kind") == "Status" and found.get("code") == 404

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
    nginx = nginx_binary()
    if nginx is None:
        pytest.fail("nginx is not installed (the round-robin proxy in front of the replicas; "
                    "Debian: apt-get install nginx)")
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("previews")
    with e2e.stopping() as teardown:
        with e2e.timed(timings, "flux-operator binary"):
            bin_dir, _ = e2e_peers((OPERATOR,), gitea=False)
        plane, gitea, flux = e2e.start_peers(
            workdir, teardown, timings, NS, APP_NS,
            audit_policy=audit_policy(groups=(*FLUX_GROUPS, OPERATOR_GROUP)))
        with e2e.timed(timings, "chart RBAC (the bridge's ServiceAccount)"):
            # The bridge runs with exactly what the chart grants it (one Lease, by name).
            bridge_user, bridge_token = chart_service_account(
                plane, RELEASE, NS, "--set", f"config.statuses.lease_name={LEASE}")
            kubeconfig = plane.write_kubeconfig(workdir / "bridge-kubeconfig.yaml",
                                                bridge_token, user=bridge_user)
        with e2e.timed(timings, "flux-operator (CRDs, start)"):
            _install_operator_crds(plane)
            operator = _start_operator(bin_dir, plane, workdir / "operator")
            teardown.append(operator.stop)
        gitea.create_org(ORG)
        gitea.create_repo(ORG, REPO, private=True)
        gitea.commit_files(ORG, REPO, {APP_FILE: e2e.configmap_yaml(
            "settings", APP_NS, branch="main")}, "app")
        tokens = {name: secrets.token_hex(16) for name in ("webhook", "events")}
        config = e2e.bridge_config(CLUSTER, gitea, tokens["events"], workdir, statuses={
            "lease_name": LEASE, "lease_duration_seconds": 15,
            "previews": {"comment_interval_seconds": 2}})
        with e2e.timed(timings, f"{REPLICAS} bridge replicas + nginx"):
            replicas: list[BridgeProcess] = []
            # Every replica the module ran (a test may replace one) is stopped at the end.
            teardown.append(lambda: [b.stop() for b in replicas])
            for number in range(1, REPLICAS + 1):
                (workdir / f"r{number}").mkdir()
                replicas.append(BridgeProcess(config, kubeconfig, workdir / f"r{number}"))
                replicas[-1].start()
            proxy = RoundRobinProxy(nginx, workdir / "nginx", [b.port for b in replicas])
            proxy.start()
            teardown.append(proxy.stop)
        env = Previews(plane, gitea, flux, replicas[0], operator, tokens["webhook"], bridge_user,
                       list(replicas), proxy, config, kubeconfig, workdir, timings=timings)
        replicas = env.replicas  # the teardown stops those running at the end
        _make_previews(env, tokens)
        e2e.print_timings("previews environment up", timings)
        yield env
        e2e.print_timings("previews timings", timings)


def _make_previews(env: Previews, tokens: dict[str, str]) -> None:
    """The provider, the ResourceSet rendering a preview per pull request, the Receiver listing
    the provider, the Alert to the bridge and Gitea's webhook."""
    env.secret("gitea-auth", {"username": env.gitea.admin, "password": env.gitea.token})
    env.secret("webhook-token", {"token": tokens["webhook"]})
    e2e.alert_to_bridge(env.plane, NS, f"{env.proxy.url}/events", tokens["events"],
                        ["GitRepository", "Kustomization"])
    env.plane.request("POST", f"/apis/{OPERATOR_API}/namespaces/{NS}/resourcesetinputproviders", {
        "apiVersion": OPERATOR_API, "kind": "ResourceSetInputProvider",
        "metadata": {"name": PROVIDER, "namespace": NS, "annotations": {
            "fluxcd.controlplane.io/reconcileEvery": f"{POLL_INTERVAL:g}s"}},
        "spec": {"type": "GiteaPullRequest", "url": f"{env.gitea.url}/{ORG}/{REPO}",
                 "secretRef": {"name": "gitea-auth"}}})
    clone = env.gitea.clone_url(ORG, REPO)
    # Flux's event annotations: the pull request, the head commit it should run, the URL the
    # comment links (notification-controller forwards them as event metadata).
    notes = {"event.toolkit.fluxcd.io/change_request": "<< inputs.id | quote >>",
             "event.toolkit.fluxcd.io/commit": "<< inputs.sha | quote >>",
             "event.toolkit.fluxcd.io/preview-url": "https://pr-<< inputs.id >>.preview.example.com"}
    env.plane.request("POST", f"/apis/{OPERATOR_API}/namespaces/{NS}/resourcesets", {
        "apiVersion": OPERATOR_API, "kind": "ResourceSet",
        "metadata": {"name": "app-previews", "namespace": NS},
        "spec": {
            "inputsFrom": [{"apiVersion": OPERATOR_API, "kind": "ResourceSetInputProvider",
                            "name": PROVIDER}],
            "resources": [
                {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
                 "metadata": {"name": "app-pr-<< inputs.id >>", "namespace": NS,
                              "annotations": notes},
                 "spec": {"interval": "1h", "url": clone, "secretRef": {"name": "gitea-auth"},
                          "ref": {"commit": "<< inputs.sha >>"}}},
                {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                 "metadata": {"name": "app-pr-<< inputs.id >>", "namespace": NS,
                              "annotations": notes},
                 "spec": {"interval": "1h", "path": "./app", "prune": True, "timeout": "2m",
                          "namePrefix": "pr-<< inputs.id >>-",
                          "sourceRef": {"kind": "GitRepository",
                                        "name": "app-pr-<< inputs.id >>"}}},
            ]}})
    env.create("Receiver", "previews", {
        "type": "github", "secretRef": {"name": "webhook-token"},
        "resources": [{"apiVersion": OPERATOR_API, "kind": "ResourceSetInputProvider",
                       "name": PROVIDER}]})
    for bridge in env.replicas:
        bridge.wait_receivers(1)
    env.wait("flux-operator to list no pull request yet", lambda: e2e.condition(
        env.provider(), "Ready").get("status") == "True", 120)
    hook = e2e.hook_path(tokens["webhook"], "previews", NS)
    env.hook_id = env.gitea.create_hook(
        ORG, REPO, f"{env.proxy.url}{hook}", tokens["webhook"],
        events=HOOK_EVENTS)


# -- the tests -----------------------------------------------------------------------------------


def test_a_pull_request_opened_becomes_a_ready_preview_through_the_bridge(
        previews: Previews) -> None:
    before = previews.provider()["metadata"].get("annotations", {}).get(e2e.RECONCILE)
    patches = previews.bridge_patches()
    created = sum(previews.comments_created().values())
    opened = time.monotonic()
    number, sha = previews.open_pull_request("feature-1", "Feature one")
    # Gitea's webhook reaches a replica through the proxy, which annotates the provider
    # (flux-operator's own poll may come first; the audit log counts what the bridge asked).
    previews.wait("the provider annotated by the bridge", lambda: (
        previews.provider()["metadata"].get("annotations", {}).get(e2e.RECONCILE)
        not in (None, before)) or None, 30)
    assert previews.bridge_patches() == patches + 1
    # The delivery a client can follow: ready once flux-operator handled the request.
    taker, accepted = previews.wait("a replica to accept the pull request",
                                    lambda: previews.accepted(number), 30)
    settled = previews.follow(accepted["id"], previews.webhook_token, 60, at=taker)[-1]
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
    assert previews.bridge_patches() == patches + 1
    history = previews.wait_state(previews.gitea, ORG, REPO, sha, e2e.status_context(
        CLUSTER, "Kustomization", NS, preview(number)), "success", STATUS_TIMEOUT)
    print(f"  statuses on {sha[:12]}: {e2e.described(history)}")
    # kustomize-controller's Progressing event (objects created) first, then Ready.
    states = [s for s, _ in e2e.described(history)]
    assert states[-1] == "success" and "failure" not in states, history
    assert "pending" in states[:-1], history
    # The one comment on the pull request: the preview URL, the head commit, all ready.
    comment = previews.wait_comment(
        number, "ready at the head commit", f"#{number} on cluster `{CLUSTER}`: success",
        preview_url(number), f"/commit/{sha}", f"Kustomization `{NS}/{preview(number)}`",
        f"GitRepository `{NS}/{preview(number)}`")
    previews.timings["PR opened -> comment success"] = time.monotonic() - opened
    made = previews.comments_created()
    print(f"  comment {comment['id']} on #{number}; created by replica: {made}; "
          f"Lease held by {previews.lease_holder()}")
    assert sum(made.values()) == created + 1, made
    assert [c["id"] for c in previews.comments(number)] == [comment["id"]]


def test_without_the_bridge_a_preview_waits_for_the_providers_poll(previews: Previews) -> None:
    previews.gitea.set_hook_active(ORG, REPO, previews.hook_id, False, events=HOOK_EVENTS)
    try:
        patches = previews.bridge_patches()
        annotated = previews.provider()["metadata"].get("annotations", {}).get(e2e.RECONCILE)
        opened = time.monotonic()
        number, sha = previews.open_pull_request("feature-2", "Feature two")
        seconds = previews.time_to_preview(number, sha, opened,
                                           POLL_INTERVAL * 2 + PREVIEW_TIMEOUT)
        previews.timings["PR opened -> preview Ready (polling only)"] = seconds
        print(f"  PR #{number} opened -> preview Ready by polling alone: {seconds:.1f}s "
              f"(provider polls every {POLL_INTERVAL:g}s)")
        # Nothing requested this reconcile: the bridge was not told.
        assert previews.provider()["metadata"].get("annotations", {}).get(
            e2e.RECONCILE) == annotated
        assert previews.bridge_patches() == patches
        # The comment comes from the watch alone (no webhook reached the bridge).
        previews.wait_comment(number, "ready at the head commit", ": success",
                              preview_url(number), f"/commit/{sha}")
    finally:
        previews.gitea.set_hook_active(ORG, REPO, previews.hook_id, True, events=HOOK_EVENTS)
    hook = previews.gitea.api("GET", f"/repos/{ORG}/{REPO}/hooks/{previews.hook_id}")
    assert hook["active"] and set(HOOK_EVENTS) <= set(hook["events"]), hook


def test_a_new_commit_edits_the_one_comment_and_closing_tears_the_preview_down(
        previews: Previews) -> None:
    number, first = previews.open_pull_request("feature-3", "Feature three")
    ctx = e2e.status_context(CLUSTER, "Kustomization", NS, preview(number))
    previews.wait_state(previews.gitea, ORG, REPO, first, ctx, "success", PREVIEW_TIMEOUT)
    comment = previews.wait_comment(number, "ready at the first commit", ": success",
                                    preview_url(number), f"/commit/{first}")

    # A new commit on the branch: Gitea's pull_request synchronized -> the provider lists
    # the new head -> the ResourceSet moves the preview to it; the same comment follows.
    patches = previews.bridge_patches()
    pushed = time.monotonic()
    second = previews.push_to("feature-3", serial="2")
    previews.wait("the bridge to ask flux-operator for the new head",
                  lambda: previews.bridge_patches() >= patches + 1 or None, 60)
    history = previews.wait_state(previews.gitea, ORG, REPO, second, ctx, "success",
                                  PREVIEW_TIMEOUT)
    states = [s for s, _ in e2e.described(history)]
    print(f"  statuses on {second[:12]}: {e2e.described(history)}")
    assert "pending" in states[:-1] and "failure" not in states, history
    assert previews.get("GitRepository", preview(number))["spec"]["ref"] == {"commit": second}
    edited = previews.wait_comment(number, "edited to the new commit", ": success",
                                   preview_url(number), f"/commit/{second}",
                                   absent=(first,))
    previews.timings["new commit -> comment edited"] = time.monotonic() - pushed
    assert edited["id"] == comment["id"]

    # Closed: flux-operator lists it no more and deletes what the ResourceSet rendered for
    # it; the Kustomization's pruning takes its ConfigMap along.
    closed = time.monotonic()
    previews.gitea.api("PATCH", f"/repos/{ORG}/{REPO}/pulls/{number}", {"state": "closed"})
    previews.wait("the bridge to ask flux-operator to list the pull requests again",
                  lambda: previews.bridge_patches() >= patches + 2 or None, 60)
    paths = {
        "GitRepository": f"{e2e.collection('GitRepository', NS)}/{preview(number)}",
        "Kustomization": f"{e2e.collection('Kustomization', NS)}/{preview(number)}",
        "ConfigMap": f"/api/v1/namespaces/{APP_NS}/configmaps/pr-{number}-settings"}
    for what, path in paths.items():
        previews.wait(f"{what} of #{number} gone from the API server",
                      functools.partial(previews.gone, path), TEARDOWN_TIMEOUT)
    assert not [i for i in previews.exported() if str(i.get("id")) == str(number)]
    gone = previews.wait_comment(number, "torn down", f"#{number} on cluster `{CLUSTER}`: "
                                 "torn down", absent=(preview_url(number),))
    previews.timings["PR closed -> comment torn down"] = time.monotonic() - closed
    assert gone["id"] == comment["id"]
    assert [c["id"] for c in previews.comments(number)] == [comment["id"]]
    # One reconcile request per change of the pull request (synchronized, closed).
    assert previews.bridge_patches() == patches + 2


def test_a_broken_preview_shows_failure_and_its_reason(previews: Previews) -> None:
    # Its ConfigMap names a namespace the cluster does not have: the apply fails.
    number, sha = previews.open_pull_request("broken-4", "Broken four", "no-such-namespace")
    ctx = e2e.status_context(CLUSTER, "Kustomization", NS, preview(number))
    history = previews.wait_state(previews.gitea, ORG, REPO, sha, ctx, "failure",
                                  PREVIEW_TIMEOUT)
    print(f"  statuses on {sha[:12]}: {e2e.described(history)}")
    ready = e2e.condition(previews.get("Kustomization", preview(number)), "Ready")
    assert ready.get("status") == "False" and "no-such-namespace" in ready.get("message", ""), \
        ready
    comment = previews.wait_comment(
        number, "failing with the reason", f"#{number} on cluster `{CLUSTER}`: failure",
        "no-such-namespace", f"/commit/{sha}", preview_url(number))
    print(f"  comment on #{number}: " + " / ".join(
        line for line in comment["body"].splitlines() if "Kustomization" in line))
    assert "\u274c failure" in comment["body"]


def test_after_a_lease_handover_the_new_holder_edits_the_same_comment(previews: Previews) -> None:
    """The replica writing comments is lost (SIGKILL: its Lease is not given back); the other
    takes the Lease once it expires and, remembering nothing of the comment, finds it on the
    pull request and edits it: still one comment, the same id."""
    number, first = previews.open_pull_request("feature-5", "Feature five")
    comment = previews.wait_comment(number, "ready at the first commit", ": success",
                                    preview_url(number), f"/commit/{first}")
    holder = previews.wait("one replica to hold the Lease", previews.leader, 60)
    survivor = next(b for b in previews.replicas if b is not holder)
    created = metric_value(survivor.metrics(), "gfb_pr_comments_total", {"result": "created"})
    # The Service's endpoints drop the lost pod: the webhook and Flux's events go to the other.
    previews.replicas.remove(holder)
    previews.bridge = survivor
    previews.proxy.set_upstreams([survivor.port])
    holder.kill()
    lost = time.monotonic()
    try:
        second = previews.push_to("feature-5", serial="2")
        previews.wait_state(previews.gitea, ORG, REPO, second, e2e.status_context(
            CLUSTER, "Kustomization", NS, preview(number)), "success", PREVIEW_TIMEOUT)
        previews.wait("the other replica to take the Lease",
                      lambda: previews.leader() is survivor or None, 120)
        edited = previews.wait_comment(number, "edited by the new holder", ": success",
                                       f"/commit/{second}", absent=(first,))
        previews.timings["holder lost -> comment edited by the new one"] = \
            time.monotonic() - lost
        assert edited["id"] == comment["id"]
        assert [c["id"] for c in previews.comments(number)] == [comment["id"]]
        # It found the comment: it created none.
        assert metric_value(survivor.metrics(), "gfb_pr_comments_total",
                            {"result": "created"}) == created
    finally:
        holder.stop()  # reaped
        previews.spawn()  # back to REPLICAS for the other tests
