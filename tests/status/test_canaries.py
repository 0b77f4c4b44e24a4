"""Flagger canaries, pure: which commit a canary analyses, what its phase says, which check an
event names; canaries in the fleet and environment aggregates; promotion gates."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.config import DEFAULT_CONTEXT
from receiver.flux.canary import PHASES, owner_of, target_of
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.status.canaries import (
    Found,
    Unknown,
    analysed_commit,
    canary_verdict,
    decided_for,
    failed_check,
    progress_words,
)
from receiver.status.decisions import applied_commit
from receiver.status.descriptions import DESCRIPTION_LIMIT
from receiver.status.fleet import Report, aggregate, environment_aggregates
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
    assert decided_for(_phase_at("Progressing", "2026-12-07T10:00:00Z"), owner)
    assert decided_for(_phase_at("Failed", "2026-12-07T10:05:00Z"), owner)
    # An owner that does not say when it applied: the phase is taken as it is.
    assert decided_for(_phase_at("Succeeded", "2026-12-07T09:59:00Z"),
                       FluxObject(kustomization()))


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
    from receiver.config import load_settings

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


def _stamp(at: int) -> str:
    return f"2026-12-07T{10 + at // 3600:02d}:{at // 60 % 60:02d}:{at % 60:02d}Z"


class CanaryOverTime(RuleBasedStateMachine):
    """Flux applies commits, Flagger changes phases and rewrites its status, seconds pass, in
    any order. What the bridge would post on the commit Flux applied last must be a verdict
    Flagger reached after that commit was applied, never an earlier commit's."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.commit = 0
        self.applied_at = 0
        self.phase, self.phase_at, self.written_at = "Initialized", -10, -10
        # Phases Flagger entered after the current commit was applied (whole seconds).
        self.since_deploy: list[str] = []

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

    @rule(seconds=st.integers(1, 30))
    def time_passes(self, seconds: int) -> None:
        self.now += seconds

    @rule()
    def flux_applies_a_new_commit(self) -> None:
        self.now += 1  # Flux's apply and Flagger's write are not the same instant
        self.commit += 1
        self.applied_at = self.now
        self.since_deploy = []

    @rule(phase=st.sampled_from(["Progressing", "WaitingPromotion", "Promoting", "Finalising",
                                 "Succeeded", "Failed"]))
    def flagger_changes_the_phase(self, phase: str) -> None:
        if phase != self.phase:
            self.phase, self.phase_at = phase, self.now
            self.since_deploy.append(phase)
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


TestCanaryOverTime = CanaryOverTime.TestCase
