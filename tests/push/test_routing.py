"""Routing over a multi-region fleet fixture, with pushes shaped as Gitea sends them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import ObjectKey
from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import Push, parse_actions_body, parse_gitea_push
from receiver.giturls import normalise_repo_url
from receiver.push.routing import PHASE_SOURCE, Plan, plan_push, ref_match
from tests import gitea_payloads as gp

FLEET = Path(__file__).parent.parent / "fixtures" / "fleet"
ALIASES = {"gitea-http.gitea.svc.cluster.local:3000": "gitea.example.com"}


@pytest.fixture(scope="module")
def store() -> ObjectStore:
    s = ObjectStore(lambda url: normalise_repo_url(url, ALIASES))
    MemoryCluster.from_directory(s, FLEET)
    return s


def receiver(store: ObjectStore, ns: str = "flux-system", name: str = "gitea") -> Any:
    obj = store.get(ObjectKey("Receiver", ns, name))
    assert obj is not None
    return obj


def names(targets: Any) -> list[str]:
    return [f"{t.kind}/{t.namespace}/{t.name}" for t in targets]


def route(store: ObjectStore, doc: dict[str, Any], rcv: str = "gitea",
          ns: str = "flux-system") -> Plan:
    return plan_push(receiver(store, ns, rcv), parse_gitea_push(doc), store)


def changed(*paths: str, full_name: str = "platform/fleet", ref: str = "refs/heads/main",
            total: int | None = None) -> dict[str, Any]:
    return gp.push(full_name, ref, [gp.commit(full_name, "c", modified=list(paths))], total=total)


SRC = "GitRepository/flux-system/flux-system"
# reconcileStrategy Revision: every commit is a new chart version, so every push touches it.
CANARY = "HelmRelease/flux-system/podinfo-canary"
PLATFORM = ["infrastructure", "apps", "monitoring"]

CASES: list[tuple[str, dict[str, Any], list[str], list[str]]] = [
    (
        "one app path changed",
        changed("clusters/eu-west/apps/podinfo/release.yaml"),
        [SRC, "Kustomization/flux-system/apps"],
        [CANARY, "Kustomization/flux-system/apps"],
    ),
    (
        "extra path from the annotation (shared base listed by apps)",
        changed("bases/apps/deployment.yaml"),
        [SRC, "Kustomization/flux-system/apps"],
        [CANARY, "Kustomization/flux-system/apps"],
    ),
    (
        "another region's path: nothing listed is touched, the us-east consumer is tracked",
        changed("clusters/us-east/apps/x.yaml"),
        [SRC],
        [CANARY, "Kustomization/flux-system/apps-us-east"],
    ),
    (
        "helm values file counts as the release's path",
        changed("clusters/eu-west/values/podinfo.yaml"),
        [SRC, "HelmRelease/flux-system/podinfo"],
        # annotated, but not followed: its ChartVersion status never names the commit
        [CANARY],
    ),
]


@pytest.mark.parametrize(("title", "doc", "targets", "tracked"), CASES, ids=[c[0] for c in CASES])
def test_table(store: ObjectStore, title: str, doc: dict[str, Any], targets: list[str],
               tracked: list[str]) -> None:
    plan = route(store, doc)
    assert names(plan.targets) == targets
    assert names(plan.tracked) == tracked


def test_shared_base_outside_every_path_touches_all_consumers(store: ObjectStore) -> None:
    plan = route(store, changed("bases/monitoring/alerts.yaml"))
    assert names(plan.targets) == [
        SRC,
        "HelmRelease/flux-system/podinfo",
        "Kustomization/flux-system/apps",
        "Kustomization/flux-system/infrastructure",
        "Kustomization/flux-system/monitoring",
    ]
    skipped = {f"{t.kind}/{t.namespace}/{t.name}": t.reason for t in plan.skipped}
    assert skipped["Kustomization/flux-system/legacy"] == "suspended"
    # tracked covers unlisted consumers too; the suspended one is not followed
    assert "Kustomization/flux-system/apps-us-east" in names(plan.tracked)
    assert "Kustomization/flux-system/legacy" not in names(plan.tracked)


def test_truncated_commit_list_touches_every_consumer(store: ObjectStore) -> None:
    doc = changed("clusters/eu-west/apps/a.yaml", total=7)
    assert len(doc["commits"]) == 1
    plan = route(store, doc)
    assert {t.name for t in plan.consumers} == {"apps", "infrastructure", "monitoring", "podinfo"}
    assert all("incomplete" in t.reason for t in plan.consumers)


def test_sources_come_first_and_every_target_has_a_reason(store: ObjectStore) -> None:
    plan = route(store, changed("bases/other/x.yaml"))
    phases = [t.phase for t in plan.targets]
    assert phases == sorted(phases, key=lambda p: p != "source")
    assert all(t.reason for t in (*plan.targets, *plan.tracked, *plan.skipped))


def test_other_branch_matches_nothing_listed(store: ObjectStore) -> None:
    plan = route(store, changed("clusters/staging/apps/x.yaml", ref="refs/heads/staging"))
    assert plan.targets == ()
    assert names(plan.tracked) == ["Kustomization/flux-system/staging-apps"]
    reasons = {t.name: t.reason for t in plan.skipped}
    assert reasons["flux-system"] == "branch main does not take refs/heads/staging"
    assert reasons["fleet-pinned"].startswith("pinned to a commit")


def test_semver_tag_in_range(store: ObjectStore) -> None:
    plan = route(store, gp.tag_push("platform/fleet", "v1.3.0", gp.sha_for("v1.3.0")))
    assert names(plan.targets) == [
        "GitRepository/flux-system/fleet-releases", "Kustomization/flux-system/releases"]
    assert parse_gitea_push(gp.tag_push("platform/fleet", "v1.3.0", "a" * 40)).sha == "a" * 40


@pytest.mark.parametrize("tag", ["v2.0.0", "v1.4.0-rc.1", "v1.4", "nightly"])
def test_semver_tag_out_of_range_or_not_semver(store: ObjectStore, tag: str) -> None:
    plan = route(store, gp.tag_push("platform/fleet", tag, gp.sha_for(tag)))
    assert plan.targets == ()


def test_full_ref_name_and_url_case_and_trailing_slash(store: ObjectStore) -> None:
    plan = route(store, changed("anything.txt", ref="refs/heads/hotfix"))
    assert names(plan.targets) == [
        "GitRepository/flux-system/fleet-by-name", "Kustomization/flux-system/hotfix"]


def test_included_repository_is_annotated_before_its_includer(store: ObjectStore) -> None:
    plan = route(store, changed("lib/x.py", full_name="platform/shared-lib"))
    sources = [t for t in plan.targets if t.phase == PHASE_SOURCE]
    assert names(sources) == ["GitRepository/flux-system/shared-lib", SRC]
    assert {t.name for t in plan.consumers} == {"apps", "infrastructure", "monitoring", "podinfo"}


def test_unrelated_repository_annotates_nothing(store: ObjectStore) -> None:
    plan = route(store, changed("x", full_name="someone/else"))
    assert plan.targets == () and plan.tracked == ()
    listed = {t.name: t.reason for t in plan.all_skipped(store)}
    assert listed["flux-system"] == "not a source of the pushed repository"
    assert plan.as_dict()["skipped_unrelated"] == len(plan.unrelated) > 0


def test_branch_deletion_is_skipped(store: ObjectStore) -> None:
    doc = changed("x", ref="refs/heads/main")
    doc["after"], doc["commits"], doc["head_commit"], doc["total_commits"] = gp.ZERO, [], None, 0
    plan = route(store, doc)
    assert plan.targets == ()
    assert any(t.reason == "the push deletes the ref" for t in plan.skipped)


def test_host_alias_matches_in_cluster_url(store: ObjectStore) -> None:
    doc = gp.push("platform/fleet", "refs/heads/main",
                  [gp.commit("platform/fleet", "c", modified=["clusters/eu-west/apps/a"],
                             root="http://gitea-http.gitea.svc.cluster.local:3000/")],
                  root="http://gitea-http.gitea.svc.cluster.local:3000/")
    assert names(route(store, doc).targets) == [SRC, "Kustomization/flux-system/apps"]


def test_force_push_routes_like_any_push(store: ObjectStore) -> None:
    # Gitea sends no `forced` flag: `before` is simply not an ancestor of `after`.
    doc = changed("clusters/eu-west/infrastructure/x.yaml")
    doc["before"] = gp.sha_for("rewritten history")
    assert names(route(store, doc).targets) == [SRC, "Kustomization/flux-system/infrastructure"]


def test_cross_namespace_consumer_via_actions_body(store: ObjectStore) -> None:
    body = {"repository": "https://gitea.example.com/teams/apps", "ref": "production",
            "sha": "b" * 40, "paths": ["policies/limits.yaml"]}
    plan = plan_push(receiver(store, "apps", "actions"), parse_actions_body(body), store)
    assert names(plan.targets) == [
        "GitRepository/apps/team-apps", "Kustomization/flux-system/team-apps-policies"]
    denied = plan_push(receiver(store, "apps", "actions"), parse_actions_body(body), store,
                       allow_cross_namespace=False)
    assert "Kustomization/flux-system/team-apps-policies" not in names(denied.targets)
    assert any("cross-namespace" in t.reason for t in denied.skipped)


def test_no_push_details_reconciles_listed_resources_sources_first(store: ObjectStore) -> None:
    plan = plan_push(receiver(store, "apps", "actions"), None, store)
    assert names(plan.targets) == [
        "GitRepository/apps/team-apps", "Kustomization/apps/team-apps",
        "Kustomization/flux-system/team-apps-policies"]


@pytest.mark.parametrize(
    ("spec_ref", "ref", "expected"),
    [
        (None, "refs/heads/master", True),
        (None, "refs/heads/main", False),
        ({"branch": "main", "tag": "v1.0.0"}, "refs/tags/v1.0.0", True),  # tag beats branch
        ({"tag": "v1.0.0", "semver": "*"}, "refs/tags/v2.0.0", False),  # tag beats semver
        ({"name": "refs/tags/v1"}, "refs/tags/v1", True),
        ({"name": "refs/heads/main", "commit": "a" * 40}, "refs/heads/main", False),
        ({"semver": "not a constraint!"}, "refs/tags/v1.0.0", False),
    ],
)
def test_ref_precedence(spec_ref: Any, ref: str, expected: bool) -> None:
    push = Push(repo_urls=("x",), full_name="", ref=ref, sha="a" * 40)
    assert ref_match(spec_ref, push)[0] is expected
