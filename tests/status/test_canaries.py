"""Flagger canaries, pure: which commit a canary analyses, what its phase says, which check an
event names; canaries in the fleet and environment aggregates; promotion gates."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.config import DEFAULT_CONTEXT
from receiver.flux.canary import PHASES, owner_of, target_of, workload_changed_at
from receiver.flux.objects import FluxObject, ObjectKey, slim
from receiver.status.canaries import (
    WAITING_FOR_FLAGGER,
    Found,
    Unknown,
    analysed_commit,
    applied_at,
    canary_verdict,
    commit_verdict,
    decided_for,
    failed_check,
    progress_words,
    waits_for_flagger,
)
from receiver.status.decisions import applied_commit
from receiver.status.descriptions import DESCRIPTION_LIMIT
from receiver.status.fleet import Report, aggregate, environment_aggregates, with_local
from receiver.status.gates import answer
from receiver.templates import cluster_parser

SHA = "5394cb7f48ab9fd33a7a95f6ee1f7b9c4b2b8a3e"
KS_LABELS = {"kustomize.toolkit.fluxcd.io/name": "apps",
             "kustomize.toolkit.fluxcd.io/namespace": "flux-system"}
HR_LABELS = {"helm.toolkit.fluxcd.io/name": "podinfo",
             "helm.toolkit.fluxcd.io/namespace": "apps"}
GIT = {"kind": "GitRepository", "metadata": {"name": "repo", "namespace": "flux-system"},
       "spec": {"url": "https://gitea.example.com/team/app.git"},
       "status": {"artifact": {"revision": f"main@sha1:{SHA}"}}}


def canary(phase: str = "Progressing", target: str = "podinfo", kind: str = "Deployment",
           analysis: dict[str, Any] | None = None, **status: Any) -> FluxObject:
    return FluxObject({
        "apiVersion": "flagger.app/v1beta1", "kind": "Canary",
        "metadata": {"name": "podinfo", "namespace": "apps"},
        "spec": {"targetRef": {"apiVersion": "apps/v1", "kind": kind, "name": target},
                 "analysis": analysis if analysis is not None else
                 {"interval": "1m", "threshold": 5, "maxWeight": 50, "stepWeight": 10}},
        "status": {"phase": phase, **status}})


def deployment(labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "podinfo", "namespace": "apps", "labels": labels}}


def kustomization(revision: str = f"main@sha1:{SHA}") -> dict[str, Any]:
    return {"kind": "Kustomization", "metadata": {"name": "apps", "namespace": "flux-system"},
            "spec": {"sourceRef": {"kind": "GitRepository", "name": "repo"}},
            "status": {"lastAppliedRevision": revision}}


def helm_release(chart_version: str) -> dict[str, Any]:
    return {"kind": "HelmRelease", "metadata": {"name": "podinfo", "namespace": "apps"},
            "spec": {"chart": {"spec": {"chart": "./charts/podinfo", "reconcileStrategy":
                                        "Revision", "sourceRef": {"kind": "GitRepository",
                                                                  "name": "repo",
                                                                  "namespace": "flux-system"}}}},
            "status": {"history": [{"chartVersion": chart_version}]}}


def find(c: FluxObject, *docs: dict[str, Any]) -> Found | Unknown:
    objects = {o.key: o for o in map(FluxObject, [GIT, *docs])}
    sources = {ObjectKey("Kustomization", "flux-system", "apps"):
               ObjectKey("GitRepository", "flux-system", "repo"),
               ObjectKey("HelmRelease", "apps", "podinfo"):
               ObjectKey("GitRepository", "flux-system", "repo")}

    def source_of(key: ObjectKey) -> FluxObject | None:
        found = sources.get(key)
        return objects.get(found) if found else None

    return analysed_commit(c, objects.get, source_of, applied_commit)


# -- which commit ---------------------------------------------------------------------------

def test_a_kustomization_owner_names_the_commit() -> None:
    found = find(canary(), deployment(KS_LABELS), kustomization())
    assert isinstance(found, Found)
    assert found.sha == SHA and found.owner.key == ObjectKey("Kustomization", "flux-system", "apps")


def test_a_helm_release_owner_names_the_commit_through_its_chart_version() -> None:
    found = find(canary(), deployment(HR_LABELS), helm_release(f"6.5.0+{SHA[:12]}"))
    assert isinstance(found, Found)
    assert found.sha == SHA and found.owner.kind == "HelmRelease"


def test_helm_labels_win_over_kustomize_labels() -> None:
    workload = FluxObject(deployment({**KS_LABELS, **HR_LABELS}))
    assert owner_of(workload) == ObjectKey("HelmRelease", "apps", "podinfo")


def test_a_target_without_flux_labels_is_said_not_guessed() -> None:
    found = find(canary(), deployment({"app": "podinfo"}), kustomization())
    assert isinstance(found, Unknown)
    assert "no kustomize.toolkit.fluxcd.io or helm.toolkit.fluxcd.io" in found.reason


def test_a_label_without_its_namespace_counts_as_missing() -> None:
    half = {"kustomize.toolkit.fluxcd.io/name": "apps"}
    assert isinstance(find(canary(), deployment(half), kustomization()), Unknown)


@pytest.mark.parametrize("revision", ["", "main@sha1:nothex", "v1.0.0"])
def test_an_unknown_revision_is_said(revision: str) -> None:
    found = find(canary(), deployment(KS_LABELS), kustomization(revision))
    assert isinstance(found, Unknown)
    assert "names no commit" in found.reason


def test_a_helm_chart_version_of_another_commit_is_unknown() -> None:
    found = find(canary(), deployment(HR_LABELS), helm_release("6.5.0+aaaaaaaaaaaa"))
    assert isinstance(found, Unknown)


def test_a_missing_target_or_owner_is_said() -> None:
    missing_target = find(canary(), kustomization())
    assert isinstance(missing_target, Unknown) and "not in the cache" in missing_target.reason
    missing_owner = find(canary(), deployment(KS_LABELS))
    assert isinstance(missing_owner, Unknown)
    assert "Kustomization/flux-system/apps" in missing_owner.reason


def test_a_target_kind_flagger_rolls_out_but_not_a_workload_is_unknown() -> None:
    assert target_of(canary(kind="Service")) is None
    assert isinstance(find(canary(kind="Service"), deployment(KS_LABELS), kustomization()),
                      Unknown)
    assert target_of(canary(kind="DaemonSet")) == ObjectKey("DaemonSet", "apps", "podinfo")


def _phase_at(phase: str, at: str) -> FluxObject:
    return canary(phase, conditions=[{"type": "Promoted", "reason": phase, "status": "True",
                                      "lastUpdateTime": at, "lastTransitionTime": at}],
                  lastTransitionTime="2026-12-07T12:00:00Z")


def test_a_verdict_from_before_the_owner_applied_is_not_this_commits() -> None:
    owner = FluxObject({**kustomization(), "status": {
        "lastAppliedRevision": f"main@sha1:{SHA}", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-12-07T10:00:00Z"}]}})
    # Promoted at the last release; the status was rewritten since, the phase was not.
    assert not decided_for(_phase_at("Succeeded", "2026-12-07T09:59:00Z"), owner)
    # A phase stamped in the second the owner became Ready may be from before it.
    assert not decided_for(_phase_at("Progressing", "2026-12-07T10:00:00Z"), owner)
    assert decided_for(_phase_at("Progressing", "2026-12-07T10:00:01Z"), owner)
    assert decided_for(_phase_at("Failed", "2026-12-07T10:05:00Z"), owner)
    # An owner that does not say when it applied: the phase is taken as it is.
    assert decided_for(_phase_at("Succeeded", "2026-12-07T09:59:00Z"),
                       FluxObject(kustomization()))


def _workload(*entries: tuple[str, str, str]) -> FluxObject:
    """A cached Deployment whose managedFields hold (manager, subresource, time) entries."""
    return FluxObject(slim({**deployment(KS_LABELS), "spec": {"replicas": 1}, "metadata": {
        **deployment(KS_LABELS)["metadata"], "managedFields": [
            {"manager": m, "operation": "Apply", "time": t, "fieldsType": "FieldsV1",
             "fieldsV1": {"f:spec": {}}, **({"subresource": sub} if sub else {})}
            for m, sub, t in entries]}}))


def test_the_workload_changed_when_a_flux_controller_last_changed_it() -> None:
    workload = _workload(("kustomize-controller", "", "2026-12-07T10:00:00Z"),
                         ("helm-controller", "", "2026-12-07T10:02:00Z"),
                         ("helm-controller", "scale", "2026-12-07T10:03:00Z"),
                         ("flagger", "", "2026-12-07T10:05:00Z"),
                         ("kube-controller-manager", "", "2026-12-07T10:06:00Z"),
                         ("kube-controller-manager", "status", "2026-12-07T10:06:00Z"))
    assert workload_changed_at(workload) == "2026-12-07T10:02:00Z"
    assert "fieldsV1" not in str(workload.raw)  # the cache keeps who and when, not the fields
    assert workload_changed_at(FluxObject(deployment(KS_LABELS))) == ""


def _applied(at: str) -> FluxObject:
    return FluxObject({**kustomization(), "status": {
        "lastAppliedRevision": f"main@sha1:{SHA}", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": at}]}})


def test_a_commit_waits_for_flagger_until_it_changes_the_phase_after_the_apply() -> None:
    at = applied_at(_applied("2026-12-07T10:00:00Z"))
    changed = _workload(("kustomize-controller", "", "2026-12-07T09:59:58Z"))
    promoted = _phase_at("Succeeded", "2026-12-07T09:00:00Z")  # the last release's
    assert commit_verdict(promoted, changed, at) == WAITING_FOR_FLAGGER
    assert commit_verdict(_phase_at("Progressing", "2026-12-07T10:00:10Z"), changed, at) == \
        canary_verdict(_phase_at("Progressing", "2026-12-07T10:00:10Z"))
    # Nothing says when the workload changed: wait for Flagger all the same.
    assert commit_verdict(promoted, FluxObject(deployment(KS_LABELS)), at) == \
        WAITING_FOR_FLAGGER
    # A canary Flagger has not initialized yet waits too; one going away says nothing.
    assert commit_verdict(canary(phase=""), changed, None) == WAITING_FOR_FLAGGER
    assert commit_verdict(_phase_at("Terminating", "2026-12-07T10:00:10Z"), changed, at) is None


def test_an_apply_that_left_the_workload_keeps_flaggers_verdict() -> None:
    """A re-reconcile, or a commit that changed something else: Flagger runs no analysis, and
    its phase since the workload's last change is about the workload this commit deploys."""
    at = applied_at(_applied("2026-12-07T10:00:00Z"))
    earlier = _workload(("kustomize-controller", "", "2026-12-07T08:00:00Z"))
    progressing = _phase_at("Progressing", "2026-12-07T09:00:00Z")
    assert commit_verdict(progressing, earlier, at) == canary_verdict(progressing)
    # A phase in the same second as the change may be from just before it: wait.
    same = _workload(("kustomize-controller", "", "2026-12-07T09:00:00Z"))
    assert commit_verdict(progressing, same, at) == WAITING_FOR_FLAGGER


def test_a_flux_event_queues_the_wait_only_for_an_apply_the_cache_has_not_shown() -> None:
    older = "1" * 40
    assert waits_for_flagger(None, None, SHA, 1000.0)
    assert waits_for_flagger(older, 900.0, SHA, 1000.0)  # the cache has not caught up
    assert waits_for_flagger(older, 1000.5, SHA, 1000.0)  # whole seconds: the same one
    assert waits_for_flagger(older, 900.0, SHA, None)
    assert not waits_for_flagger(SHA, 900.0, SHA, 1000.0)  # the cache decides
    # A late or redelivered event of an earlier apply: that commit's status is settled.
    assert not waits_for_flagger(SHA, 1100.0, older, 1000.0)


# -- what the phase says -----------------------------------------------------------------------

def test_progress_reads_weight_and_check() -> None:
    verdict = canary_verdict(canary(canaryWeight=30, iterations=0))
    assert verdict is not None and verdict.state == "pending"
    assert verdict.description == "canary 30%, check 3/5"


def test_blue_green_progress_counts_iterations() -> None:
    c = canary(iterations=3, analysis={"iterations": 10, "threshold": 2})
    assert progress_words(c) == "check 3/10"
    failing = canary(iterations=4, failedChecks=1, analysis={"iterations": 10, "threshold": 2})
    assert progress_words(failing) == "check 4/10, 1 failed of 2 allowed"


def test_waiting_promotion_succeeded_and_failed() -> None:
    assert canary_verdict(canary("WaitingPromotion")) is not None
    waiting = canary_verdict(canary("WaitingPromotion"))
    assert waiting is not None and (waiting.state, "waiting for promotion" in waiting.description) \
        == ("pending", True)
    done = canary_verdict(canary("Succeeded"))
    assert done is not None and done.state == "success"
    failed = canary_verdict(canary("Failed"), "load-test")
    assert failed is not None
    assert (failed.state, failed.description) == ("failure", "Canary rolled back: load-test")
    unnamed = canary_verdict(canary("Failed"))
    assert unnamed is not None and unnamed.description.startswith("Canary rolled back")


status_values = st.one_of(st.none(), st.integers(-5, 500), st.text(max_size=5), st.booleans())


@given(phase=st.sampled_from([*PHASES, "", "Bogus"]), weight=status_values,
       iterations=status_values, failed=status_values, check=st.text(max_size=300),
       analysis=st.dictionaries(
           st.sampled_from(["iterations", "stepWeight", "maxWeight", "threshold",
                            "stepWeights"]),
           st.one_of(status_values, st.lists(st.integers(0, 100), max_size=5)), max_size=5))
def test_the_verdict_follows_the_phase_alone(phase: str, weight: Any, iterations: Any,
                                            failed: Any, check: str,
                                            analysis: dict[str, Any]) -> None:
    c = canary(phase, analysis=analysis, canaryWeight=weight, iterations=iterations,
               failedChecks=failed)
    verdict = canary_verdict(c, check)
    expected = {"Succeeded": "success", "Initialized": "success", "Failed": "failure",
                "Progressing": "pending", "WaitingPromotion": "pending", "Promoting": "pending",
                "Finalising": "pending", "Initializing": "pending", "Waiting": "pending"}
    if phase not in expected:
        assert verdict is None
        return
    assert verdict is not None and verdict.state == expected[phase]
    assert 0 < len(verdict.description) <= DESCRIPTION_LIMIT
    if phase == "Failed":
        assert "rolled back" in verdict.description
    if phase == "Progressing" and isinstance(weight, int) and not isinstance(weight, bool):
        assert verdict.description.startswith(f"canary {weight}%") or \
            verdict.description.startswith("check")


@pytest.mark.parametrize(("message", "check"), [
    ("Halt podinfo.apps advancement external check load-test failed Post error", "load-test"),
    ("Halt podinfo.apps advancement pre-rollout check smoke failed 403", "smoke"),
    ("Halt podinfo.apps advancement success rate 80.00% < 99%", "success rate"),
    ("Halt podinfo.apps advancement request duration 1.5s > 500ms", "request duration"),
    ("Halt podinfo.apps advancement latency 1.20 > 0.5", "latency"),
    ("Halt advancement no values found for prometheus metric error-rate probably", "error-rate"),
    ("Rolling back podinfo.apps progress deadline exceeded 60s", "progress deadline exceeded"),
    ("Rolling back podinfo.apps manual webhook invoked", "rollback webhook"),
    ("Halt podinfo.apps advancement waiting for approval gate", None),
    ("Rolling back podinfo.apps failed checks threshold reached 5", None),
    ("Advance podinfo.apps canary weight 20", None),
])
def test_event_messages_name_the_failed_check(message: str, check: str | None) -> None:
    assert failed_check(message) == check


@given(st.text(max_size=3000))
def test_any_message_is_read_without_error(message: str) -> None:
    found = failed_check(message)
    assert found is None or (found and len(found) < 2000)


# -- canaries in the fleet and the environments ----------------------------------------------

CLUSTERS = ["staging-eu", "prod-eu", "prod-us"]
PARSER = cluster_parser(DEFAULT_CONTEXT, CLUSTERS)
CANARY_PARSER = cluster_parser("flagger/{cluster}/{namespace}/{name}", CLUSTERS,
                               require_kind=False)


def ks(cluster: str) -> str:
    return f"flux/{cluster}/kustomization/flux-system/apps"


def flagger(cluster: str) -> str:
    return f"flagger/{cluster}/apps/podinfo"


def fleet(shown: dict[str, str]) -> str | None:
    verdict = aggregate({c: Report(s, 1000.0) for c, s in shown.items()}, PARSER, CLUSTERS,
                        "flux/fleet", 1000.0, 600.0, CANARY_PARSER)
    return None if verdict is None else verdict.state


def test_a_rollback_after_the_kustomization_success_fails_the_fleet() -> None:
    done = {ks(c): "success" for c in CLUSTERS}
    assert fleet(done) == "success"
    assert fleet({**done, flagger("prod-us"): "pending"}) == "pending"
    assert fleet({**done, flagger("prod-us"): "success"}) == "success"
    assert fleet({**done, flagger("prod-us"): "failure"}) == "failure"


def test_without_the_canary_parser_a_canary_is_ignored() -> None:
    shown = {**{ks(c): "success" for c in CLUSTERS}, flagger("prod-us"): "failure"}
    verdict = aggregate({c: Report(s, 1000.0) for c, s in shown.items()}, PARSER, CLUSTERS,
                        "flux/fleet", 1000.0, 600.0)
    assert verdict is not None and verdict.state == "success"


def test_environments_aggregate_their_own_clusters_in_order() -> None:
    envs = [("flux/env/staging", ["staging-eu"]), ("flux/env/production", ["prod-eu", "prod-us"])]
    shown = {ks("staging-eu"): "success", ks("prod-eu"): "success",
             flagger("prod-eu"): "failure", "flux/env/staging": "pending"}
    verdicts = environment_aggregates({c: Report(s, 1000.0) for c, s in shown.items()}, PARSER,
                                      envs, 1000.0, 600.0, CANARY_PARSER)
    assert [(c, a.state) for c, a in verdicts] == [("flux/env/staging", "success"),
                                                   ("flux/env/production", "failure")]
    only_staging = environment_aggregates({ks("staging-eu"): Report("pending", 1000.0)}, PARSER,
                                          envs, 1000.0, 600.0)
    assert [c for c, _ in only_staging] == ["flux/env/staging"]


def test_what_this_replica_queued_counts_before_gitea_shows_it() -> None:
    shown = {ks(c): Report("success", 900.0) for c in CLUSTERS}
    local = with_local(shown, {flagger("prod-us"): "pending"}, 1000.0)
    verdict = aggregate(local, PARSER, CLUSTERS, "flux/fleet", 1000.0, 600.0, CANARY_PARSER)
    assert verdict is not None and verdict.state == "pending"
    # A state Gitea already shows keeps Gitea's time (staleness counts from there).
    again = with_local({**shown, flagger("prod-us"): Report("pending", 100.0)},
                       {flagger("prod-us"): "pending"}, 1000.0)
    assert again[flagger("prod-us")] == Report("pending", 100.0)


# -- gates -------------------------------------------------------------------------------------

REQUIRE = ["flux/env/staging", "approve/production"]


def test_a_gate_opens_only_when_every_required_status_is_success() -> None:
    assert not answer("confirm", REQUIRE, {}, SHA).yes
    half = answer("confirm", REQUIRE, {"flux/env/staging": "success"}, SHA)
    assert not half.yes and "no status approve/production" in half.reason
    pending = answer("confirm", REQUIRE, {"flux/env/staging": "success",
                                          "approve/production": "pending"}, SHA)
    assert not pending.yes and "approve/production is pending" in pending.reason
    assert answer("confirm", REQUIRE, dict.fromkeys(REQUIRE, "success"), SHA).yes


def test_rollback_only_when_a_required_status_failed() -> None:
    assert not answer("rollback", REQUIRE, {}, SHA).yes
    assert not answer("rollback", REQUIRE, {"approve/production": "pending"}, SHA).yes
    rejected = answer("rollback", REQUIRE, {"approve/production": "failure"}, SHA)
    assert rejected.yes and "approve/production is failure" in rejected.reason


@given(st.dictionaries(st.sampled_from([*REQUIRE, "other"]),
                       st.sampled_from(["pending", "success", "failure", "error", "warning"])))
def test_confirm_and_rollback_never_both_say_yes(shown: dict[str, str]) -> None:
    go = answer("confirm", REQUIRE, shown, SHA)
    back = answer("rollback", REQUIRE, shown, SHA)
    assert not (go.yes and back.yes)
    assert go.yes == all(shown.get(c) == "success" for c in REQUIRE)


# -- configuration -------------------------------------------------------------------------------

def _settings(**statuses: Any) -> Any:
    from receiver.config_load import load_settings

    return load_settings(environ={}, overrides={"cluster_name": "staging-eu",
                                                "statuses": statuses})


@pytest.mark.parametrize(("statuses", "message"), [
    ({"fleet": {"enabled": True, "clusters": ["staging-eu"],
                "environments": [{"name": "staging", "clusters": ["elsewhere"]}]}},
     "not in clusters"),
    ({"fleet": {"enabled": True, "clusters": ["staging-eu"],
                "environments": [{"name": "a", "clusters": ["staging-eu"]},
                                 {"name": "a", "clusters": ["staging-eu"]}]}},
     "names must be unique"),
    ({"fleet": {"enabled": True, "clusters": ["staging-eu"]},
      "canaries": {"enabled": True, "context_template": "flagger/{namespace}/{name}"}},
     "no {cluster} placeholder"),
    ({"canaries": {"context_template": "flagger/{kind}/{name}"}}, "unknown placeholder"),
    ({"canaries": {"gates": {"production": {"require": []}}}}, "at least 1"),
])
def test_configuration_mistakes_stop_the_service_at_start(statuses: dict[str, Any],
                                                          message: str) -> None:
    from receiver.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        _settings(**statuses)


def test_a_valid_release_configuration_loads() -> None:
    found = _settings(fleet={"enabled": True, "clusters": ["staging-eu", "prod-eu"],
                             "environments": [{"name": "staging", "clusters": ["staging-eu"]},
                                              {"name": "production", "clusters": ["prod-eu"]}]},
                      canaries={"enabled": True, "gates": {"production": {
                          "require": ["flux/env/staging", "approve/production"]}}})
    assert [e.name for e in found.statuses.fleet.environments] == ["staging", "production"]
    assert found.statuses.canaries.gates["production"].require == [
        "flux/env/staging", "approve/production"]


# -- order: deploys, Flagger's phase changes and status rewrites, in any order ------------------

from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402

PROMOTED = frozenset({"Succeeded", "Initialized"})


def _stamp(at: int) -> str:
    return f"2026-12-07T{10 + at // 3600:02d}:{at // 60 % 60:02d}:{at % 60:02d}Z"


class CanaryOverTime(RuleBasedStateMachine):
    """Flux applies commits (changing the workload or not), Flagger changes phases and rewrites
    its status, seconds pass, in any order. What the bridge would post on the commit Flux
    applied last must be a verdict Flagger reached after that commit was applied, never an
    earlier commit's; and the fleet and environment aggregates over the Kustomizations'
    `success` and that canary status never read `success` before Flagger promoted what the
    commit deploys."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.commit = 0
        self.applied_at = 0
        # An earlier commit changed the workload at -20, Flagger initialized it at -10; the
        # commit applied at 0 left it as it was.
        self.changed_at = -20
        self.changed_by_commit = False
        self.phase, self.phase_at, self.written_at = "Initialized", -10, -10
        # Phases Flagger entered after the current commit was applied (whole seconds).
        self.since_deploy: list[str] = []
        # Phases Flagger entered after the workload last changed, with their time.
        self.since_change: list[tuple[str, int]] = [("Initialized", -10)]

    def _canary(self) -> FluxObject:
        return canary(self.phase, conditions=[{
            "type": "Promoted", "reason": self.phase, "status": "Unknown",
            "lastUpdateTime": _stamp(self.phase_at), "lastTransitionTime": _stamp(self.phase_at)}],
            lastTransitionTime=_stamp(self.written_at))

    def _owner(self) -> FluxObject:
        return FluxObject({**kustomization(), "status": {
            "lastAppliedRevision": f"main@sha1:{self.commit:040x}",
            "conditions": [{"type": "Ready", "status": "True",
                            "lastTransitionTime": _stamp(self.applied_at)}]}})

    def _workload(self) -> FluxObject:
        return FluxObject(slim({**deployment(KS_LABELS), "metadata": {
            **deployment(KS_LABELS)["metadata"], "managedFields": [
                {"manager": "kustomize-controller", "operation": "Apply",
                 "time": _stamp(self.changed_at)},
                {"manager": "flagger", "operation": "Update", "time": _stamp(self.phase_at)}]}}))

    @rule(seconds=st.integers(1, 30))
    def time_passes(self, seconds: int) -> None:
        self.now += seconds

    @rule(changes_workload=st.booleans())
    def flux_applies_a_new_commit(self, changes_workload: bool) -> None:
        self.now += 1  # Flux's apply and Flagger's write are not the same instant
        self.commit += 1
        self.applied_at = self.now
        self.since_deploy = []
        self.changed_by_commit = changes_workload
        if changes_workload:
            self.changed_at = self.now
            self.since_change = []

    @rule(phase=st.sampled_from(["Progressing", "WaitingPromotion", "Promoting", "Finalising",
                                 "Succeeded", "Failed"]))
    def flagger_changes_the_phase(self, phase: str) -> None:
        if phase != self.phase:
            self.phase, self.phase_at = phase, self.now
            self.since_deploy.append(phase)
            self.since_change.append((phase, self.now))
        self.written_at = self.now

    @rule()
    def flagger_rewrites_its_status(self) -> None:
        self.written_at = self.now

    @invariant()
    def a_posted_verdict_is_this_commits(self) -> None:
        c = self._canary()
        if not decided_for(c, self._owner()):
            return
        verdict = canary_verdict(c)
        assert verdict is not None
        assert self.phase in self.since_deploy, (self.phase, self.since_deploy)
        if verdict.state == "success":
            assert "Succeeded" in self.since_deploy
        if verdict.state == "failure":
            assert "Failed" in self.since_deploy

    def _aggregates(self) -> list[str]:
        verdict = commit_verdict(self._canary(), self._workload(), applied_at(self._owner()))
        shown = {ks(c): Report("success", 1000.0) for c in CLUSTERS}
        if verdict is not None:
            shown[flagger("prod-us")] = Report(verdict.state, 1000.0)
        envs = [("flux/env/staging", ["staging-eu"]),
                ("flux/env/production", ["prod-eu", "prod-us"])]
        found = aggregate(shown, PARSER, CLUSTERS, "flux/fleet", 1000.0, 600.0, CANARY_PARSER)
        assert found is not None
        prod = environment_aggregates(shown, PARSER, envs, 1000.0, 600.0, CANARY_PARSER)[1]
        return [found.state, prod[1].state]

    @invariant()
    def the_fleet_is_never_success_before_flagger_promoted_the_commit(self) -> None:
        states = self._aggregates()
        if "success" not in states:
            return
        # Never for a commit whose canary has not reached a phase after its apply...
        if self.changed_by_commit:
            assert self.since_deploy, (states, self.phase, self.since_deploy)
        # ...and only once Flagger promoted the workload as this commit leaves it.
        assert self.phase in PROMOTED, (states, self.phase)
        assert any(p in PROMOTED for p, _ in self.since_change), self.since_change

    @invariant()
    def a_commit_that_left_the_workload_keeps_a_promotion(self) -> None:
        if self.phase in PROMOTED and self.phase_at > self.changed_at:
            assert self._aggregates() == ["success", "success"]


TestCanaryOverTime = CanaryOverTime.TestCase
