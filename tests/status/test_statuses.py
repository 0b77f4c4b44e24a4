"""The pure status mapping: table, text, templates, repositories, instances, live state."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.flux.objects import FluxObject
from receiver.giturls import normalise_host, normalise_repo_url
from receiver.status.decisions import (
    IGNORED,
    MAPPED,
    NO_COMMIT,
    UNMAPPED,
    DesiredStatus,
    desired_after_timeout,
    desired_from_event,
    desired_from_object,
    helm_commit,
    pending_for_push,
    plan_repairs,
    resync_schedule,
    settles,
)
from receiver.status.descriptions import (
    DESCRIPTION_LIMIT,
    ELLIPSIS,
    ERROR,
    FAILURE,
    PENDING,
    SKIPPED,
    STATE_TABLE,
    SUCCESS,
    WARNING,
    comparable,
    describe,
    gitea_state,
    reason_words,
    truncate,
)
from receiver.status.flux_events import parse_event
from receiver.status.repos import instance_hosts, instances_for, repo_ref
from receiver.status.shown import (
    Seen,
    is_fresh,
    latest_per_context,
    needs_post,
    recall,
    recall_for_event,
    same_status,
)
from receiver.templates import CONTEXT_FIELDS, TARGET_URL_FIELDS, StatusTemplates, check_template, render

EVENTS = Path(__file__).parent.parent / "fixtures" / "events"
SHA = "5394cb7f48ab9fd33a7a95f6ee1f7b9c4b2b8a3e"
OLD = "1111111111111111111111111111111111111111"
ALIASES = {"gitea-http.gitea.svc.cluster.local:3000": "gitea.example.com"}
T = StatusTemplates(cluster="eu-west")


def normalise(url: str) -> str | None:
    return normalise_repo_url(url, ALIASES)


def gitrepo(url: str = "https://gitea.example.com/Team/WebApp.git", revision: str = "",
            ready: str = "True", kind: str = "GitRepository") -> FluxObject:
    raw: dict[str, Any] = {
        "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": kind,
        "metadata": {"name": "webapp", "namespace": "flux-system", "generation": 1},
        "spec": {"url": url, "ref": {"branch": "main"}}, "status": {"conditions": [
            {"type": "Ready", "status": ready, "reason": "Succeeded", "message": "stored"}]},
    }
    if revision:
        raw["status"]["artifact"] = {"revision": revision}
    return FluxObject(raw)


def kustomization(status: dict[str, Any] | None = None, **spec: Any) -> FluxObject:
    return FluxObject({
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
        "metadata": {"name": "webapp", "namespace": "apps", "generation": 1},
        "spec": {"sourceRef": {"kind": "GitRepository", "name": "webapp",
                               "namespace": "flux-system"}, "path": "./apps", **spec},
        "status": status or {},
    })


def helmrelease(status: dict[str, Any] | None = None,
                annotations: dict[str, str] | None = None) -> FluxObject:
    return FluxObject({
        "apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease",
        "metadata": {"name": "podinfo", "namespace": "apps", "annotations": annotations or {}},
        "spec": {"chart": {"spec": {"chart": "./charts/podinfo", "reconcileStrategy": "Revision",
                                    "sourceRef": {"kind": "GitRepository", "name": "webapp",
                                                  "namespace": "flux-system"}}}},
        "status": status or {},
    })


def ready(status: str, reason: str, message: str = "") -> list[dict[str, str]]:
    return [{"type": "Ready", "status": status, "reason": reason, "message": message}]


# -- the table -------------------------------------------------------------------------------


@pytest.mark.parametrize("reason, severity, state", [
    ("Progressing", "info", PENDING),
    ("DependencyNotReady", "info", PENDING),
    ("ReconciliationSucceeded", "info", SUCCESS),
    ("NewArtifact", "info", SUCCESS),
    ("Succeeded", "info", SUCCESS),
    ("InstallSucceeded", "info", SUCCESS),
    ("UpgradeSucceeded", "info", SUCCESS),
    ("BuildFailed", "error", FAILURE),
    ("HealthCheckFailed", "error", FAILURE),
    ("ReconciliationFailed", "error", FAILURE),
    ("UpgradeFailed", "error", FAILURE),
    ("RollbackSucceeded", "info", FAILURE),
    ("ArtifactFailed", "error", ERROR),
    ("AccessDenied", "error", ERROR),
    ("HealthCheckCanceled", "error", WARNING),
    ("SomethingNew", "error", FAILURE),
    ("SomethingNew", "info", None),
    ("DriftDetected", "info", None),
    ("ReconciliationSucceeded", "trace", None),
])
def test_state_table(reason: str, severity: str, state: str | None) -> None:
    assert gitea_state(reason, severity) == state


def test_table_only_names_gitea_states() -> None:
    swagger = json.loads((Path(__file__).parent.parent / "fixtures" / "gitea" / "swagger.v1.json")
                         .read_text())
    gitea_states = set(swagger["definitions"]["CreateStatusOption"]["properties"]["state"]["enum"])
    assert "success" in gitea_states
    for info, error in STATE_TABLE.values():
        assert {info, error} - {None} <= gitea_states


# -- text -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reason, words", [
    ("ReconciliationSucceeded", "Reconciliation succeeded"),
    ("HealthCheckFailed", "Health check failed"),
    ("NewArtifact", "New artifact"),
    ("CELError", "Cel error"),
    ("Progressing", "Progressing"),
])
def test_reason_words(reason: str, words: str) -> None:
    assert reason_words(reason) == words


def test_description_drops_volatile_messages() -> None:
    a = describe("ReconciliationSucceeded", "Reconciliation finished in 1.2s, next run in 10m0s")
    b = describe("ReconciliationSucceeded", "Reconciliation finished in 3s, next run in 1h0m0s")
    c = describe("ReconciliationSucceeded", f"Applied revision: main@sha1:{SHA}")
    assert a == b == c == "Reconciliation succeeded"


def test_description_joins_lines_and_truncates() -> None:
    text = describe("BuildFailed", "kustomize build failed:\n  line 3: `<nil>` & " + "x" * 300)
    assert text.startswith("Build failed: kustomize build failed: line 3: `<nil>` & xxx")
    assert len(text) == DESCRIPTION_LIMIT and text.endswith(ELLIPSIS)


def test_comparable_masks_go_durations() -> None:
    assert comparable("health check failed after 5m0.012s: timeout") == comparable(
        "health check failed after 5m3.2s: timeout")
    assert comparable("v1.2.3 in 250ms") == "v1.2.3 in <d>"


@given(st.text(max_size=500), st.text(alphabet=st.characters(categories=["Lu", "Ll"]),
                                      max_size=40))
def test_description_is_bounded_and_one_line(message: str, reason: str) -> None:
    text = describe(reason, message)
    assert len(text) <= DESCRIPTION_LIMIT
    assert "\n" not in text and "\r" not in text


# -- templates ------------------------------------------------------------------------------


def test_context_default_names_cluster_kind_namespace_name() -> None:
    status = pending_for_push(kustomization(), gitrepo(), SHA, T, normalise)
    assert status is not None
    assert status.context == "flux/eu-west/kustomization/apps/webapp"
    assert status.target_url == ""


def test_target_url_template() -> None:
    templates = StatusTemplates("eu-west", "deploy/{cluster}/{name}",
                                "https://ui.example.com/{cluster}/{kind}/{namespace}/{name}"
                                "?sha={sha}&repo={repo}")
    status = pending_for_push(kustomization(), gitrepo(), SHA, templates, normalise)
    assert status is not None and status.context == "deploy/eu-west/webapp"
    assert status.target_url == (
        f"https://ui.example.com/eu-west/kustomization/apps/webapp?sha={SHA}&repo=team/webapp")


def test_template_checks() -> None:
    assert check_template("flux/{cluster}/{name}", CONTEXT_FIELDS) is None
    assert "sha" in (check_template("flux/{sha}", CONTEXT_FIELDS) or "")
    assert check_template("{repo}/{sha}", TARGET_URL_FIELDS) is None
    assert check_template("flux/{cluster", CONTEXT_FIELDS) is not None
    assert check_template("{name!r}", CONTEXT_FIELDS) is not None
    assert check_template("{0}", CONTEXT_FIELDS) is not None


def test_render_never_raises() -> None:
    assert render("a/{unknown}/{name}", {"name": "n"}) == "a/{unknown}/n"
    assert render("broken {", {}) == "broken {"


# -- repositories and instances -------------------------------------------------------------


def test_repo_ref_keeps_sub_path_and_splits_owner() -> None:
    ref = repo_ref(normalise("https://git.example.com/gitea/Org/Repo.git"))
    assert ref is not None
    assert (ref.key, ref.host, ref.owner, ref.name) == (
        "git.example.com/gitea/org/repo", "git.example.com", "org", "repo")
    assert repo_ref(None) is None and repo_ref("host/only") is None


def test_repository_comes_from_the_git_source_through_aliases() -> None:
    source = gitrepo("http://gitea-http.gitea.svc.cluster.local:3000/team/webapp")
    status = pending_for_push(kustomization(), source, SHA, T, normalise)
    assert status is not None
    assert (status.repo_key, status.owner, status.repo) == (
        "gitea.example.com/team/webapp", "team", "webapp")


def test_oci_and_missing_sources_map_to_nothing() -> None:
    oci = gitrepo("oci://ghcr.io/team/webapp", kind="OCIRepository")
    assert pending_for_push(kustomization(), oci, SHA, T, normalise) is None
    assert pending_for_push(kustomization(), None, SHA, T, normalise) is None


def test_every_instance_hosting_the_repo_gets_it() -> None:
    table = instance_hosts([
        ("eu", "https://gitea-eu.example.com/", ["gitea.example.com", "gitea.example.com:443"]),
        ("us", "https://gitea-us.example.com/sub", ["gitea.example.com"]),
        ("other", "https://other.example.com:8443/git", []),
    ], lambda h: normalise_host(h))
    assert instances_for("gitea.example.com/team/webapp", table) == ("eu", "us")
    assert instances_for("other.example.com:8443/a/b", table) == ("other",)
    assert instances_for("nowhere.example.com/a/b", table) == ()


# -- events --------------------------------------------------------------------------------


def from_fixture(name: str, obj: FluxObject | None, source: FluxObject | None) -> Any:
    return desired_from_event(parse_event((EVENTS / name).read_bytes()), obj, source, T,
                              normalise)


@pytest.mark.parametrize("name, state, description", [
    ("kustomization-succeeded.json", SUCCESS, "Reconciliation succeeded"),
    ("kustomization-succeeded-prefixed.json", SUCCESS, "Reconciliation succeeded"),
    ("kustomization-progressing.json", PENDING,
     "Progressing: Deployment/apps/webapp configured Service/apps/webapp unchanged"),
    ("kustomization-health-check-failed.json", FAILURE,
     "Health check failed: health check failed after 5m0.012s: timeout waiting for: "
     "[Deployment/apps/webapp status: 'InProgress']"),
])
def test_kustomization_events(name: str, state: str, description: str) -> None:
    mapping = from_fixture(name, kustomization(), gitrepo())
    assert mapping.outcome == MAPPED and mapping.status is not None
    assert (mapping.status.state, mapping.status.sha) == (state, SHA)
    assert mapping.status.description == description
    assert mapping.status.key == ("gitea.example.com/team/webapp", SHA,
                                  "flux/eu-west/kustomization/apps/webapp")


def test_build_failure_keeps_angle_brackets_in_description() -> None:
    mapping = from_fixture("kustomization-build-failed.json", kustomization(), gitrepo())
    assert mapping.status is not None and mapping.status.state == FAILURE
    assert "`<nil>`" in mapping.status.description


def test_gitrepository_event_uses_its_own_url() -> None:
    mapping = from_fixture("gitrepository-new-artifact.json", gitrepo(), None)
    assert mapping.status is not None
    assert mapping.status.state == SUCCESS
    assert mapping.status.context == "flux/eu-west/gitrepository/flux-system/webapp"
    assert mapping.status.description.startswith("New artifact: stored artifact for commit")


def test_helmrelease_events() -> None:
    with_commit = from_fixture("helmrelease-with-commit.json", helmrelease(), gitrepo())
    assert with_commit.status is not None and with_commit.status.state == SUCCESS
    # A chart version names a prefix: resolved against the source's artifact, if it matches.
    fetched = gitrepo(revision=f"main@sha1:{SHA}")
    resolved = from_fixture("helmrelease-chart-revision.json", helmrelease(), fetched)
    assert resolved.status is not None
    assert (resolved.status.sha, resolved.status.state) == (SHA, FAILURE)
    moved_on = gitrepo(revision=f"main@sha1:{OLD}")
    assert from_fixture("helmrelease-chart-revision.json", helmrelease(), moved_on).outcome == (
        NO_COMMIT)
    assert from_fixture("helmrelease-without-commit.json", helmrelease(), gitrepo()).outcome == (
        NO_COMMIT)


def test_unmapped_and_ignored_events() -> None:
    assert from_fixture("kustomization-succeeded.json", None, None).outcome == UNMAPPED
    assert from_fixture("kustomization-succeeded.json", kustomization(), None).outcome == UNMAPPED
    ev = parse_event((EVENTS / "kustomization-succeeded.json").read_bytes()
                     .replace(b"ReconciliationSucceeded", b"DriftDetected"))
    assert desired_from_event(ev, kustomization(), gitrepo(), T, normalise).outcome == IGNORED


# -- live state (resync) ----------------------------------------------------------------------


def test_ready_at_applied_is_success() -> None:
    obj = kustomization({"lastAppliedRevision": f"main@sha1:{SHA}",
                         "lastAttemptedRevision": f"main@sha1:{SHA}",
                         "conditions": ready("True", "ReconciliationSucceeded",
                                             f"Applied revision: main@sha1:{SHA}")})
    status = desired_from_object(obj, gitrepo(), T, normalise)
    assert status is not None
    assert (status.sha, status.state, status.description) == (
        SHA, SUCCESS, "Reconciliation succeeded")
    # The same words as the event: a resync after the event posts nothing new.
    event = from_fixture("kustomization-succeeded.json", kustomization(), gitrepo()).status
    assert status == event


def test_failed_at_attempted_is_failure_or_error() -> None:
    base = {"lastAppliedRevision": f"main@sha1:{OLD}", "lastAttemptedRevision": f"main@sha1:{SHA}"}
    failed = kustomization({**base, "conditions": ready("False", "BuildFailed", "boom")})
    status = desired_from_object(failed, gitrepo(), T, normalise)
    assert status is not None and (status.sha, status.state) == (SHA, FAILURE)
    broken = kustomization({**base, "conditions": ready("False", "ArtifactFailed", "gone")})
    status = desired_from_object(broken, gitrepo(), T, normalise)
    assert status is not None and status.state == ERROR


def test_reconciling_a_new_commit_is_pending_but_never_downgrades() -> None:
    progressing = [{"type": "Ready", "status": "Unknown", "reason": "Progressing",
                    "message": "Reconciliation in progress"},
                   {"type": "Reconciling", "status": "True", "reason": "Progressing"}]
    new = kustomization({"lastAppliedRevision": f"main@sha1:{OLD}",
                         "lastAttemptedRevision": f"main@sha1:{SHA}", "conditions": progressing})
    status = desired_from_object(new, gitrepo(), T, normalise)
    assert status is not None and (status.sha, status.state) == (SHA, PENDING)
    rerun = kustomization({"lastAppliedRevision": f"main@sha1:{SHA}",
                           "lastAttemptedRevision": f"main@sha1:{SHA}", "conditions": progressing})
    assert desired_from_object(rerun, gitrepo(), T, normalise) is None
    waiting = kustomization({"lastAppliedRevision": f"main@sha1:{SHA}",
                             "lastAttemptedRevision": f"main@sha1:{SHA}",
                             "conditions": ready("False", "DependencyNotReady", "waiting")})
    assert desired_from_object(waiting, gitrepo(), T, normalise) is None


def test_stalled_and_suspended_and_unknown() -> None:
    stalled = kustomization({"lastAttemptedRevision": f"main@sha1:{SHA}", "conditions": [
        *ready("False", "ReconciliationFailed", "x"),
        {"type": "Stalled", "status": "True", "reason": "AccessDenied", "message": "denied"}]})
    status = desired_from_object(stalled, gitrepo(), T, normalise)
    assert status is not None and status.state == ERROR
    suspended = kustomization({"lastAppliedRevision": f"main@sha1:{SHA}",
                               "conditions": ready("True", "ReconciliationSucceeded")},
                              suspend=True)
    assert desired_from_object(suspended, gitrepo(), T, normalise) is None
    assert desired_from_object(kustomization(), gitrepo(), T, normalise) is None
    assert desired_from_object(gitrepo(), None, T, normalise) is None


def test_helmrelease_live_state() -> None:
    chart = f"6.5.0+{SHA[:12]}"
    deployed = helmrelease({"history": [{"chartVersion": chart, "status": "deployed"}],
                            "lastAttemptedRevision": chart,
                            "conditions": ready("True", "UpgradeSucceeded", "Helm upgrade ok")})
    status = desired_from_object(deployed, gitrepo(revision=f"main@sha1:{SHA}"), T, normalise)
    assert status is not None and (status.sha, status.state) == (SHA, SUCCESS)
    assert desired_from_object(deployed, gitrepo(revision=f"main@sha1:{OLD}"), T,
                               normalise) is None
    annotated = helmrelease({"history": [{"chartVersion": "6.5.0"}], "conditions": ready(
        "True", "UpgradeSucceeded")}, annotations={"event.toolkit.fluxcd.io/commit": SHA})
    status = desired_from_object(annotated, gitrepo(), T, normalise)
    assert status is not None and status.sha == SHA


def test_helm_commit() -> None:
    fetched = gitrepo(revision=f"main@sha1:{SHA}")
    assert helm_commit(f"1.0.0+{SHA[:12]}", helmrelease(), fetched) == SHA
    assert helm_commit(f"1.0.0+{SHA[:12]}.3", helmrelease(), fetched) == SHA
    assert helm_commit(f"1.0.0+{OLD[:12]}", helmrelease(), fetched) is None
    assert helm_commit("1.0.0", helmrelease(), fetched) is None


def test_skipped_only_when_superseded_else_error() -> None:
    obj = kustomization({"lastAppliedRevision": f"main@sha1:{OLD}",
                         "conditions": ready("True", "ReconciliationSucceeded")})
    source = gitrepo(revision=f"main@sha1:{OLD}")
    superseded = desired_after_timeout(obj, source, SHA, T, normalise, superseded_by=OLD)
    assert superseded is not None and superseded.state == SKIPPED
    assert OLD[:12] in superseded.description
    # The same source at another commit, but nothing says Flux went past ours: it may be the
    # commit before, never fetched. Gitea must not count that as a success.
    never_fetched = desired_after_timeout(obj, source, SHA, T, normalise)
    assert never_fetched is not None and never_fetched.state == ERROR
    stuck = kustomization({"lastAppliedRevision": f"main@sha1:{OLD}",
                           "conditions": ready("False", "DependencyNotReady", "dep not ready")})
    failing_source = gitrepo(revision=f"main@sha1:{OLD}", ready="False")
    status = desired_after_timeout(stuck, failing_source, SHA, T, normalise)
    assert status is not None and status.state == ERROR
    assert status.description == ("Flux did not deploy this commit in time "
                                  "(dependency not ready: dep not ready)")


def test_same_status() -> None:
    a = (SUCCESS, "Health check failed after 1.5s", "")
    b = (SUCCESS, "Health check failed after 2s", "")
    assert same_status(a, b, state_only=False)
    assert not same_status(a, (SUCCESS, "other", ""), state_only=False)
    assert same_status(a, (SUCCESS, "other", "u"), state_only=True)
    assert not same_status(a, (FAILURE, a[1], ""), state_only=True)


def test_inputs_are_not_mutated() -> None:
    raw = kustomization({"lastAppliedRevision": f"main@sha1:{SHA}",
                         "conditions": ready("True", "ReconciliationSucceeded")}).raw
    before = copy.deepcopy(raw)
    desired_from_object(FluxObject(raw), gitrepo(), T, normalise)
    assert raw == before


def test_descriptions_of_repeated_build_failures_do_not_differ_by_temp_dir() -> None:
    from receiver.status.descriptions import describe

    first = describe("BuildFailed", "kustomize build failed: /tmp/kustomization-3186746475/apps/x.yaml: bad")
    again = describe("BuildFailed", "kustomize build failed: /tmp/kustomization-99/apps/x.yaml: bad")
    assert first == again
    assert "apps/x.yaml" in first


# -- what Gitea shows, and what differs --------------------------------------------------------


@dataclass(frozen=True)
class Listed:
    context: str
    state: str
    id: int = 0
    description: str = ""
    target_url: str = ""


def test_observations_are_believed_for_the_window_only() -> None:
    assert is_fresh(10.0, 10.0, 5.0) and is_fresh(10.0, 14.9, 5.0)
    assert not is_fresh(10.0, 15.0, 5.0)
    assert not is_fresh(10.0, 10.0, 0.0)  # window 0: never believed, always ask Gitea
    assert not is_fresh(10.0, 9.0, 5.0)  # from the future (a clock reset): not believed


def test_recall_prefers_a_fresh_observation_then_a_fresh_complete_listing() -> None:
    posted = (SUCCESS, "Reconciliation succeeded", "")
    assert recall(Seen(posted, 100.0), None, 103.0, 5.0) == (True, posted)
    assert recall(Seen(None, 100.0), None, 103.0, 5.0) == (True, None)
    # Stale observation, fresh complete listing that did not refresh it: no status shown.
    assert recall(Seen(posted, 90.0), 100.0, 103.0, 5.0) == (True, None)
    assert recall(None, 100.0, 103.0, 5.0) == (True, None)
    # Everything stale: unknown, however sure we once were.
    assert recall(Seen(posted, 90.0), 95.0, 103.0, 5.0) == (False, None)
    assert recall(None, None, 103.0, 5.0) == (False, None)


def test_needs_post_only_skips_what_gitea_shows_already() -> None:
    wanted = (SUCCESS, "Reconciliation succeeded", "")
    assert needs_post(None, wanted, state_only=False)
    assert not needs_post(wanted, wanted, state_only=False)
    assert needs_post((FAILURE, wanted[1], ""), wanted, state_only=False)
    assert needs_post((SUCCESS, "other words", ""), wanted, state_only=False)
    assert not needs_post((SUCCESS, "other words", ""), wanted, state_only=True)
    assert needs_post((FAILURE, "x", ""), wanted, state_only=True)


def test_latest_per_context_by_id_in_any_order() -> None:
    newest_first = [Listed("a", SUCCESS, 9), Listed("b", FAILURE, 8), Listed("a", FAILURE, 3)]
    oldest_first = list(reversed(newest_first))
    for items in (newest_first, oldest_first):
        assert latest_per_context(items) == {"a": (SUCCESS, "", ""), "b": (FAILURE, "", "")}
    # Without ids the first listed wins (we ask Gitea for newest first); blanks are skipped.
    no_ids = [Listed("a", PENDING, description="new"), Listed("a", SUCCESS), Listed("", SUCCESS),
              Listed("c", "")]
    assert latest_per_context(no_ids) == {"a": (PENDING, "new", "")}


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from([PENDING, SUCCESS, FAILURE])),
                max_size=30), st.randoms())
def test_latest_per_context_is_the_last_posted(posts: list[tuple[str, str]], rnd: Any) -> None:
    listed = [Listed(c, state, i + 1) for i, (c, state) in enumerate(posts)]
    rnd.shuffle(listed)
    expected = {c: (state, "", "") for c, state in posts}  # later posts overwrite earlier
    assert latest_per_context(listed) == expected


def desired_status(context: str, state: str, sha: str = SHA) -> DesiredStatus:
    return DesiredStatus("gitea.example.com/team/webapp", "team", "webapp", sha, context, state,
                         f"{state} in words")


def test_plan_repairs_compares_the_state_with_what_gitea_shows() -> None:
    desired = [desired_status("a", SUCCESS), desired_status("b", FAILURE),
               desired_status("c", PENDING)]
    shown = {"a": (SUCCESS, "an event's own wording", ""), "b": (SUCCESS, "stale", "")}
    assert plan_repairs(desired, shown) == desired[1:]  # b differs, c is missing
    assert plan_repairs(desired[:1], shown) == []


def test_resync_schedule_is_round_robin_from_the_cursor() -> None:
    eu = [("eu", "r", s) for s in "abcd"]
    us = [("us", "r", s) for s in "xy"]
    assert resync_schedule(eu + us, {}) == [eu[0], us[0], eu[1], us[1], eu[2], eu[3]]
    # Carry on after the last commit checked, wrapping around.
    assert resync_schedule(eu, {"eu": eu[1]}) == [eu[2], eu[3], eu[0], eu[1]]
    # A cursor whose commit is gone (deployed on) still places the next run.
    assert resync_schedule(eu, {"eu": ("eu", "r", "bb")}) == [eu[2], eu[3], eu[0], eu[1]]
    assert resync_schedule([], {"eu": eu[0]}) == []


@given(st.sets(st.sampled_from([("eu", r, s) for r in "rs" for s in "abcdef"]), max_size=12),
       st.integers(min_value=1, max_value=5))
def test_resync_schedule_covers_everything_in_enough_runs(
        commits: set[tuple[str, str, str]], per_run: int) -> None:
    cursors: dict[str, tuple[str, str, str]] = {}
    seen: set[tuple[str, str, str]] = set()
    runs = -(-len(commits) // per_run)  # ceil
    for _ in range(runs):
        for commit in resync_schedule(commits, cursors)[:per_run]:
            seen.add(commit)
            cursors[commit[0]] = commit
    assert seen == commits


# -- descriptions carry no control characters --------------------------------

_CONTROLS = ["\x00", "\x1b", "\x07", "\x7f", "\x85", "\x9b", "\u061c", "\u200e", "\u200f",
             "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068",
             "\u2069", "\ud800"]


def test_description_strips_control_and_bidi_characters() -> None:
    text = describe("Build\x1bFailed", "kustomize\x00 build \x1b[31mfailed\x1b[0m: "
                    "\u202eevil\u202c <b>tag</b>\x9b")
    assert not any(c in text for c in _CONTROLS)
    assert text == "Build failed: kustomize build failed: evil <b>tag</b>"


@settings(deadline=None)
@given(st.text(alphabet=st.sampled_from(_CONTROLS + list("ab <>&\n\t[3m")), max_size=300),
       st.text(alphabet=st.sampled_from(_CONTROLS + list("AbC")), max_size=20))
def test_no_description_holds_a_control_character(message: str, reason: str) -> None:
    for text in (describe(reason, message), truncate(message)):
        assert not any(c in text for c in _CONTROLS)
        assert len(text) <= 140
        text.encode()


def test_a_new_event_believes_only_what_gitea_showed_after_it_arrived() -> None:
    posted = (FAILURE, "Health check failed", "")
    mine = Seen(posted, 100.0, origin="event-1")
    # A redelivery of the very event this replica posted: an exact repeat.
    assert recall_for_event(mine, None, 101.0, 5.0, "event-1", 101.0) == (True, posted)
    # A new event with the same words: another replica may have posted since; ask Gitea.
    assert recall_for_event(mine, None, 101.0, 5.0, "event-2", 101.0) == (False, None)
    # What Gitea showed after the new event arrived may be believed (a shared listing).
    read = Seen((SUCCESS, "ok", ""), 102.0)
    assert recall_for_event(read, None, 102.5, 5.0, "event-2", 101.0) == (True, read.fields)
    assert recall_for_event(None, 102.0, 102.5, 5.0, "event-2", 101.0) == (True, None)
    assert recall_for_event(None, 100.0, 102.5, 5.0, "event-2", 101.0) == (False, None)


def test_which_delivery_outcomes_post_a_status() -> None:
    from receiver.status.decisions import outcome_to_post

    assert outcome_to_post("ready", "") == "ready"
    assert outcome_to_post("failed", "BuildFailed") == "failed"
    assert outcome_to_post("timed_out", "Timeout") == "timed_out"
    # Flux went past the commit: it ends as a push Flux never deployed, not as pending.
    assert outcome_to_post("skipped", "Superseded") == "superseded"
    assert outcome_to_post("skipped", "NotFollowed") is None
    for going in ("queued", "annotated", "reconciling"):
        assert outcome_to_post(going, "") is None


# -- an event's pending, once the live state moved on ---------------------------------------


def _status(state: str, sha: str = "a" * 40, context: str = "flux/c/kustomization/ns/app"
            ) -> DesiredStatus:
    return DesiredStatus("gitea.example.com/team/app", "team", "app", sha, context, state,
                         f"{state} described")


@pytest.mark.parametrize("live_state", ["success", "failure", "error"])
def test_the_live_outcome_at_the_same_commit_follows_a_pending(live_state: str) -> None:
    live = _status(live_state)
    assert settles(_status("pending"), live) == live


@pytest.mark.parametrize("live", [
    None,  # the live state implies nothing (yet)
    _status("pending"),  # still running
    _status("success", sha="b" * 40),  # the outcome of another commit
    _status("success", context="flux/c/kustomization/ns/other"),  # of another object
])
def test_a_pending_stands_while_the_live_state_says_nothing_later_about_it(
        live: DesiredStatus | None) -> None:
    assert settles(_status("pending"), live) is None
