"""Issue 13, end to end with every component real: a Flux OCI artifact pushed to Gitea's own
package registry -> Gitea's `package` webhook -> bridge -> source-controller pulls it from Gitea
-> kustomize-controller applies it.

One environment serves the module: etcd + kube-apiserver (`tests.e2e.realk8s`), Gitea with SQLite
and its container registry on the same loopback port (`ROOT_URL` is that address, so the
registry's token realm is too), source-, kustomize- and notification-controller and the bridge
(`tests.e2e.e2e_harness`). Gitea holds `platform/fleet`, whose commits the artifacts are built from;
the tests push artifacts as `flux push artifact` does (`tests.e2e.oci_client`: Flux's media types,
`org.opencontainers.image.source` = the repository's clone URL and
`org.opencontainers.image.revision` = `main@sha1:<commit>`).

Two feeds (`Feed`: an image in Gitea's registry, and an OCIRepository and a Kustomization of
one name that deploy its ConfigMap), both read over plain HTTP (`insecure: true`):
- `apps`: `oci://127.0.0.1:<gitea>/platform/apps`, tags in `SEMVER`, pulled anonymously
  (`platform` is a public organisation);
- `private-apps`: `.../private-team/apps`, tag `latest` (re-pushed), pulled with a
  dockerconfigjson Secret holding a `read:package` token (`private-team` is private).
Intervals are 1h, so once the first artifacts are in, only the bridge's annotation makes a
source look at the registry again. One github-type Receiver with `events: [package]` lists the
four objects; its hook URL on the bridge is both organisations' webhook for `package` events
(Gitea sends those to the package owner's webhooks, not to a repository's). A generic-hmac
Provider and an Alert send the OCIRepositories' and Kustomizations' events to the bridge's
/events.

Each test pushes versions of its own (a counter), so they pass in any order and alone.

    python -m pytest tests/e2e/test_e2e_oci.py -q -s     (-s shows the timings)
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from receiver.delivery.marks import DELIVERIES_ANNOTATION
from tests.e2e import e2e_env as e2e
from tests.e2e.e2e_harness import BridgeProcess
from tests.e2e.oci_client import (
    REVISION_ANNOTATION,
    SOURCE_ANNOTATION,
    OCIClient,
    Pushed,
    RegistryError,
)

pytestmark = pytest.mark.e2e

ORG, PRIVATE_ORG, REPO = "platform", "private-team", "fleet"
CLUSTER = "eu-west"
NS, APPS_NS = e2e.FLUX_NS, "apps"
SEMVER = ">=1.0.0 <2.0.0"
RECEIVER = "gitea-packages"

DEPLOY_TIMEOUT = 90.0  # package push -> Kustomization Ready at it (usually a few seconds)
HOOK_TIMEOUT = 30.0
STATUS_TIMEOUT = 60.0


@dataclass(frozen=True)
class Feed:
    """An image in Gitea's registry, and the OCIRepository and Kustomization (both `name`)
    that deploy the ConfigMap `<name>-settings` it holds."""

    owner: str
    name: str
    ref: tuple[str, str]  # the OCIRepository's spec.ref: (field, value)
    secret: str | None = None  # the OCIRepository's secretRef
    image: str = "apps"

    @property
    def repository(self) -> str:
        return f"{self.owner}/{self.image}"

    @property
    def context(self) -> str:
        """The commit status context of its Kustomization: as for a Git-sourced one."""
        return e2e.status_context(CLUSTER, "Kustomization", NS, self.name)

    def configmap(self, release: str) -> str:
        return (f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {self.name}-settings\n"
                f"  namespace: {APPS_NS}\ndata:\n  release: \"{release}\"\n")


PUBLIC = Feed(ORG, "apps", ("semver", SEMVER))
PRIVATE = Feed(PRIVATE_ORG, "private-apps", ("tag", "latest"), secret="registry-auth")
FEEDS = (PUBLIC, PRIVATE)


# -- the environment ---------------------------------------------------------------------------------


@dataclass
class Env(e2e.BridgeEnv):
    registry: OCIClient
    webhook_token: str
    timings: dict[str, float] = field(default_factory=dict)
    minor: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    # -- Kubernetes ----------------------------------------------------------------------------------

    def artifact(self, feed: Feed) -> dict[str, Any]:
        source = self.get("OCIRepository", feed.name)
        return dict((source.get("status") or {}).get("artifact") or {})

    def configmap_data(self, feed: Feed) -> dict[str, str]:
        found = self.plane.request(
            "GET", f"/api/v1/namespaces/{APPS_NS}/configmaps/{feed.name}-settings",
            ok=(200, 404))
        return dict(found.get("data") or {})

    def deployed(self, feed: Feed, pushed: Pushed) -> dict[str, Any] | None:
        """The feed's Kustomization if it is Ready with this artifact applied, else None."""
        return e2e.applied_at(self.get("Kustomization", feed.name), revision(pushed))

    # -- Gitea and its registry ----------------------------------------------------------------------

    def commit(self, feed: Feed, release: str) -> str:
        """A commit in platform/fleet: the ConfigMap the feed's next artifact is built from."""
        return self.gitea.commit_files(ORG, REPO, {f"{feed.name}/settings.yaml":
                                                   feed.configmap(release)},
                                       f"{feed.name}: release {release}")

    def push_artifact(self, feed: Feed, tag: str, sha: str, release: str) -> Pushed:
        """`flux push artifact oci://<gitea>/<owner>/apps:<tag> --path=<feed.name>
        --source=<clone url of platform/fleet> --revision=main@sha1:<sha>`."""
        started = time.monotonic()
        pushed = self.registry.push_flux_artifact(
            feed.repository, tag, {"settings.yaml": feed.configmap(release)},
            source=self.gitea.clone_url(ORG, REPO), revision=f"main@sha1:{sha}")
        print(f"  pushed {feed.repository}:{tag} ({pushed.digest[:19]}, commit {sha[:12]}) "
              f"in {time.monotonic() - started:.2f}s")
        return pushed

    def statuses(self, feed: Feed, sha: str) -> list[dict[str, Any]]:
        """Every status of the feed's context on `sha` in platform/fleet, oldest first."""
        return e2e.context_history(self.gitea, ORG, REPO, sha, feed.context)

    def wait_status(self, feed: Feed, sha: str, state: str) -> list[dict[str, Any]]:
        """Until the newest status of the feed's context on `sha` is `state`; its history."""
        return self.wait_state(self.gitea, ORG, REPO, sha, feed.context, state, STATUS_TIMEOUT)

    # -- the bridge ----------------------------------------------------------------------------------

    def package_deliveries(self) -> list[dict[str, Any]]:
        """The bridge's "push accepted" records of the package Receiver (only Gitea's package
        events reach it), oldest first."""
        return [r for r in self.bridge.records("push accepted")
                if r.get("receiver") == f"{NS}/{RECEIVER}"]

    # -- waiting -------------------------------------------------------------------------------------

    def next_delivery(self, seen: int) -> dict[str, Any]:
        """The package delivery after the first `seen` ones, once the bridge has logged it."""
        return self.wait("the package webhook to reach the bridge", lambda: (
            found[seen] if len(found := self.package_deliveries()) > seen else None),
            HOOK_TIMEOUT)

    def deploys_through_the_bridge(self, feed: Feed, tag: str, release: str
                                   ) -> tuple[str, Pushed, dict[str, Any]]:
        """Commit, push the artifact built from it; then, in order: the package webhook reached
        the bridge, the bridge annotated the OCIRepository, source-controller pulled the
        artifact with its annotations, kustomize-controller applied the ConfigMap, the
        delivery settled Ready, and the commit shows pending then success in Gitea. Returns
        (commit, artifact, the settled delivery)."""
        sha = self.commit(feed, release)
        before = self.annotations("OCIRepository", feed.name).get(e2e.RECONCILE)
        seen = len(self.package_deliveries())
        accepted_before = self.metric("gfb_hook_requests_total", outcome="accepted")
        started = time.monotonic()
        pushed = self.push_artifact(feed, tag, sha, release)

        # 1. Gitea's package webhook reached the bridge, which planned the source and its
        # consumer.
        record = self.next_delivery(seen)
        assert record["targets"] == 2, record
        assert self.metric("gfb_hook_requests_total", outcome="accepted") == accepted_before + 1

        # 2. The bridge annotated the OCIRepository (its mark, written in the same patch, names
        # this delivery); source-controller pulled the artifact from Gitea's registry, with the
        # manifest's annotations as its metadata.
        self.wait(f"OCIRepository {feed.name} annotated by the bridge", lambda: (
            value if (value := self.annotations("OCIRepository", feed.name).get(e2e.RECONCILE))
            != before else None), HOOK_TIMEOUT)
        marks = self.annotations("OCIRepository", feed.name).get(DELIVERIES_ANNOTATION, "")
        assert marks.startswith(record["mark"] + "@"), (marks, record)
        artifact = self.wait("source-controller to pull the artifact", lambda: (
            found if (found := self.artifact(feed)).get("revision") == revision(pushed)
            else None), DEPLOY_TIMEOUT, lambda: f"artifact: {self.artifact(feed)}")
        metadata = artifact.get("metadata") or {}
        assert metadata.get(SOURCE_ANNOTATION) == self.gitea.clone_url(ORG, REPO), artifact
        assert metadata.get(REVISION_ANNOTATION) == f"main@sha1:{sha}", artifact

        # 3. kustomize-controller applied it: the ConfigMap has the pushed content, and the
        # Kustomization names the Git commit the artifact was built from.
        ks = self.wait("kustomize-controller to apply it",
                       lambda: self.deployed(feed, pushed), DEPLOY_TIMEOUT)
        self.timings[f"{feed.name}: package push -> Kustomization Ready"] = (
            time.monotonic() - started)
        assert ks["status"].get("lastAppliedOriginRevision") == f"main@sha1:{sha}", ks["status"]
        assert self.configmap_data(feed) == {"release": release}

        # The delivery the bridge followed: both objects annotated, settled Ready.
        delivery = self.wait("the delivery to settle", lambda: (
            found if (found := self.delivery(record["id"], self.webhook_token)).get("final") else None), 60)
        assert delivery["outcome"] == "ready", delivery
        annotated = {(t["kind"], t["name"]) for t in delivery["targets"]
                     if t["role"] == "annotate"}
        assert annotated == {("OCIRepository", feed.name), ("Kustomization", feed.name)}, \
            delivery

        # 4. The Git commit the artifact names shows pending, then success, in Gitea (which
        # keeps every status posted, so a pending soon overwritten is still in the history).
        history = self.wait_status(feed, sha, "success")
        self.timings[f"{feed.name}: package push -> success status"] = time.monotonic() - started
        print(f"  {feed.context} on {sha[:12]}: {e2e.described(history)}")
        states = [s["status"] for s in history]
        assert "pending" in states[:-1], history
        return sha, pushed, delivery


def revision(pushed: Pushed) -> str:
    """source-controller's `status.artifact.revision` for a tag: `<tag>@sha256:<hex>`."""
    return f"{pushed.tag}@{pushed.digest}"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    module_started = time.monotonic()
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("e2e-oci")
    with e2e.stopping() as teardown:
        plane, gitea, flux = e2e.start_peers(workdir, teardown, timings, NS, APPS_NS)
        gitea.create_org(ORG)
        gitea.create_org(PRIVATE_ORG, visibility="private")
        gitea.create_repo(ORG, REPO, private=True)

        tokens = {name: secrets.token_hex(16) for name in ("webhook", "events")}
        with e2e.timed(timings, "bridge"):
            bridge = BridgeProcess(e2e.bridge_config(CLUSTER, gitea, tokens["events"], workdir),
                                   plane.kubeconfig, workdir)
            bridge.start()
            teardown.append(bridge.stop)

        registry = OCIClient(gitea.url, gitea.admin, gitea.token)
        env = Env(plane, gitea, flux, bridge, registry, tokens["webhook"], timings)
        with e2e.timed(timings, "first artifacts deployed (objects -> Kustomizations Ready)"):
            _first_deploy(env, tokens)
        timings["environment total"] = time.monotonic() - module_started
        e2e.print_timings("e2e OCI environment up", timings)
        yield env
        e2e.print_timings("e2e OCI timings", timings)
        print(f"  module total {time.monotonic() - module_started:.1f}s")


def _first_deploy(env: Env, tokens: dict[str, str]) -> None:
    """The first artifacts, the Flux objects, the Receiver and the organisation webhooks; waits
    until both Kustomizations applied their artifact."""
    first = {PUBLIC: "1.0.0", PRIVATE: "latest"}
    pushed = {feed: env.push_artifact(feed, tag, env.commit(feed, "initial"), "initial")
              for feed, tag in first.items()}
    host = f"127.0.0.1:{env.gitea.port}"
    pull_token = env.gitea.create_token("registry-pull", ["read:package"])
    login = f"{env.gitea.admin}:{pull_token}"
    env.secret("registry-auth", {".dockerconfigjson": json.dumps({"auths": {host: {
        "username": env.gitea.admin, "password": pull_token,
        "auth": base64.b64encode(login.encode()).decode()}}})},
        "kubernetes.io/dockerconfigjson")
    env.secret("webhook-token", {"token": tokens["webhook"]})
    e2e.alert_to_bridge(env.plane, NS, f"{env.bridge.url}/events", tokens["events"],
                        ["OCIRepository", "Kustomization"])
    resources: list[tuple[str, str]] = []
    for feed in FEEDS:
        spec: dict[str, Any] = {"interval": "1h", "timeout": "60s", "insecure": True,
                                "url": f"oci://{host}/{feed.repository}", "ref": dict([feed.ref])}
        if feed.secret:
            spec["secretRef"] = {"name": feed.secret}
        env.create("OCIRepository", feed.name, spec)
        e2e.kustomization(env.plane, NS, feed.name, "./", source=("OCIRepository", feed.name))
        resources += [("OCIRepository", feed.name), ("Kustomization", feed.name)]
    e2e.receiver(env.plane, NS, RECEIVER, "github", "webhook-token", resources, events=["package"])
    env.bridge.wait_receivers(1)
    for feed in FEEDS:
        env.wait(f"first deploy of {feed.name}", functools.partial(
            env.deployed, feed, pushed[feed]), DEPLOY_TIMEOUT)
    hook = env.bridge.url + e2e.hook_path(tokens["webhook"], RECEIVER, NS)
    for org in (ORG, PRIVATE_ORG):
        env.gitea.create_org_hook(org, hook, tokens["webhook"])


# -- the tests -----------------------------------------------------------------------------------------


def test_package_push_reconciles_the_oci_source_and_deploys_it(env: Env) -> None:
    version = f"1.{next(env.minor)}.0"
    env.deploys_through_the_bridge(PUBLIC, version, version)


def test_package_push_the_ref_does_not_select_annotates_nothing(env: Env) -> None:
    # 2.x is outside the OCIRepository's semver range: the registry has it, Flux would not
    # take it, so the bridge reconciles nothing.
    version = f"2.{next(env.minor)}.0"
    sha = env.commit(PUBLIC, version)
    before = {(kind, feed.name): env.annotations(kind, feed.name).get(e2e.RECONCILE)
              for kind in ("OCIRepository", "Kustomization") for feed in FEEDS}
    artifact_before = env.artifact(PUBLIC).get("revision")
    annotated_before = env.metric("gfb_targets_annotated_total")
    seen = len(env.package_deliveries())
    pushed = env.push_artifact(PUBLIC, version, sha, version)

    record = env.next_delivery(seen)
    assert record["targets"] == 0 and record["tracked"] == 0, record
    delivery = env.delivery(record["id"], env.webhook_token)
    assert delivery["targets"] == [], delivery
    assert env.metric("gfb_targets_annotated_total") == annotated_before
    assert {key: env.annotations(*key).get(e2e.RECONCILE) for key in before} == before
    assert env.artifact(PUBLIC).get("revision") == artifact_before != revision(pushed)
    # Nothing deploys it, so its commit shows nothing in Gitea.
    env.wait("the bridge's status queue to drain",
             lambda: env.metric("gfb_status_queue_depth") == 0, STATUS_TIMEOUT)
    assert env.gitea.statuses(ORG, REPO, sha) == []


def test_private_owner_artifact_is_pulled_with_a_package_token(env: Env) -> None:
    # Re-pushing the tag `latest` sends Gitea's package event again (a new version id).
    release = f"private-{next(env.minor)}"
    _, pushed, _ = env.deploys_through_the_bridge(PRIVATE, "latest", release)
    # The organisation is private: without the Secret's token the registry refuses the pull.
    anonymous = OCIClient(env.gitea.url, "", "")
    with pytest.raises(RegistryError, match="HTTP 401"):
        anonymous.manifest(PRIVATE.repository, pushed.digest)
