"""The fleet status, pure: contexts to clusters, and the aggregate of what Gitea shows."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.config import DEFAULT_CONTEXT
from receiver.gitea.api_types import CommitStatus
from receiver.status.fleet import Aggregate, Report, aggregate, classify, cluster_of, latest_reports
from receiver.templates import FleetTemplateError, cluster_parser

CLUSTERS = ["eu-west", "us-east", "ap-south"]
PARSER = cluster_parser(DEFAULT_CONTEXT, CLUSTERS)
FLEET = "flux/fleet"
NOW = 1_000_000.0
STALE = 600.0


def ctx(cluster: str, name: str = "webapp", kind: str = "kustomization") -> str:
    return f"flux/{cluster}/{kind}/apps/{name}"


def agg(shown: dict[str, Report], now: float = NOW) -> Aggregate | None:
    return aggregate(shown, PARSER, CLUSTERS, FLEET, now, STALE)


def test_contexts_parse_to_their_cluster() -> None:
    assert cluster_of(ctx("eu-west"), PARSER) == "eu-west"
    assert cluster_of("flux/eu-west/helmrelease/apps/a/b", PARSER) == "eu-west"
    assert cluster_of(ctx("elsewhere"), PARSER) is None
    assert cluster_of(FLEET, PARSER) is None
    assert cluster_of("ci/build", PARSER) is None


def test_cluster_names_with_separators_are_read_whole() -> None:
    parser = cluster_parser("{cluster}-{kind}-{name}", ["eu", "eu-west"])
    assert cluster_of("eu-west-kustomization-app", parser) == "eu-west"
    assert cluster_of("eu-kustomization-app", parser) == "eu"


def test_a_repeated_field_must_repeat_its_value() -> None:
    parser = cluster_parser("{cluster}/{kind}/{name}/{cluster}", ["a", "b"])
    assert cluster_of("a/kustomization/x/a", parser) == "a"
    assert cluster_of("a/kustomization/x/b", parser) is None


@pytest.mark.parametrize("template", ["{kind}/{name}/{uid8}", "flux/{kind}/{name}", "fixed"])
def test_a_template_without_cluster_is_refused(template: str) -> None:
    with pytest.raises(FleetTemplateError, match=r"no \{cluster\} placeholder"):
        cluster_parser(template, CLUSTERS)


@pytest.mark.parametrize("template", ["flux/{cluster}/{namespace}/{name}", "{cluster}"])
def test_a_template_without_kind_is_refused(template: str) -> None:
    with pytest.raises(FleetTemplateError, match=r"no \{kind\} placeholder"):
        cluster_parser(template, CLUSTERS)


def test_contexts_say_whether_they_deploy() -> None:
    assert classify(ctx("eu-west"), PARSER) == ("eu-west", True)
    assert classify(ctx("eu-west", kind="helmrelease"), PARSER) == ("eu-west", True)
    assert classify(ctx("us-east", "fleet", "gitrepository"), PARSER) == ("us-east", False)
    assert classify(ctx("elsewhere"), PARSER) is None


def test_a_fetched_source_is_not_a_deploy() -> None:
    # Seen against a real Gitea (tests/e2e/test_e2e_fleet.py): a cluster whose Kustomization is
    # suspended still fetches the commit, and its GitRepository's `success` is all it shows.
    fetched = {ctx(c, "fleet", "gitrepository"): Report("success", NOW) for c in CLUSTERS}
    assert agg(fetched) == Aggregate(
        "pending", "Deployed in 0 of 3 clusters; waiting for ap-south, eu-west, us-east")
    deployed = fetched | {ctx(c): Report("success", NOW) for c in ("eu-west", "us-east")}
    assert agg(deployed) == Aggregate(
        "pending", "Deployed in 2 of 3 clusters; waiting for ap-south")
    # A done cluster's source may still be working on a newer fetch; a failing source fails.
    every = deployed | {ctx("ap-south"): Report("success", NOW),
                        ctx("eu-west", "fleet", "gitrepository"): Report("pending", NOW)}
    assert agg(every) == Aggregate("success", "Deployed in all 3 clusters")
    broken = every | {ctx("ap-south", "fleet", "gitrepository"): Report("failure", NOW)}
    assert agg(broken) == Aggregate("failure", "Failed in ap-south")
    # A source's report is a sign of life: staleness counts from it.
    assert agg(fetched, NOW + STALE) == Aggregate(
        "error", "No report for 600s from ap-south, eu-west, us-east")


def test_latest_reports_take_the_highest_id_and_its_time() -> None:
    items = [CommitStatus("success", "", "", "a", id=3, at=30.0),
             CommitStatus("pending", "", "", "a", id=1, at=10.0),
             CommitStatus("failure", "", "", "b", id=2),
             CommitStatus("", "", "", "c", id=4)]
    assert latest_reports(items) == {"a": Report("success", 30.0), "b": Report("failure")}


def test_times_come_from_gitea_json() -> None:
    status = CommitStatus.from_json({"status": "success", "context": "a", "id": 1,
                                     "created_at": "2026-08-07T13:04:05Z",
                                     "updated_at": "2026-08-07T13:04:06+00:00"})
    assert status is not None and status.at == 1786107846.0
    zero = CommitStatus.from_json({"status": "success", "context": "a",
                                   "created_at": "0001-01-01T00:00:00Z"})
    assert zero is not None and zero.at is None
    assert CommitStatus.from_json({"status": "success", "context": "a",
                                   "created_at": "yesterday"}).at is None  # type: ignore[union-attr]


def test_the_walk_through() -> None:
    assert agg({}) is None
    assert agg({"ci/build": Report("success", NOW)}) is None
    first = {ctx("eu-west"): Report("success", NOW)}
    assert agg(first) == Aggregate(
        "pending", "Deployed in 1 of 3 clusters; waiting for ap-south, us-east")
    every = {ctx(c): Report("success", NOW) for c in CLUSTERS}
    assert agg(every) == Aggregate("success", "Deployed in all 3 clusters")
    failed = every | {ctx("us-east", "api"): Report("failure", NOW)}
    assert agg(failed) == Aggregate("failure", "Failed in us-east")
    # Its own earlier value and clusters nobody expects do not count.
    assert agg(every | {FLEET: Report("failure", NOW), ctx("other"): Report("failure", NOW)}
               ) == Aggregate("success", "Deployed in all 3 clusters")


def test_stale_clusters_make_it_error_with_their_names() -> None:
    reported = {ctx("eu-west"): Report("success", NOW), ctx("us-east"): Report("pending", NOW)}
    assert agg(reported, NOW + STALE - 1).state == "pending"  # type: ignore[union-attr]
    assert agg(reported, NOW + STALE) == Aggregate(
        "error", "No report for 600s from ap-south, us-east")
    # A cluster that is done is never stale; a failure outranks staleness.
    done = {ctx(c): Report("success", NOW) for c in CLUSTERS}
    assert agg(done, NOW + 10 * STALE) == Aggregate("success", "Deployed in all 3 clusters")
    failing = reported | {ctx("eu-west", "api"): Report("error", NOW)}
    assert agg(failing, NOW + STALE).state == "failure"  # type: ignore[union-attr]
    # Without times from Gitea nothing can be called stale.
    untimed = {ctx("eu-west"): Report("success")}
    assert agg(untimed, NOW + 10 * STALE).state == "pending"  # type: ignore[union-attr]


STATES = st.sampled_from(["pending", "success", "failure", "error", "warning", "skipped"])
KINDS = st.sampled_from(["kustomization", "helmrelease", "gitrepository", "ocirepository"])
SHOWN = st.dictionaries(
    st.tuples(st.sampled_from([*CLUSTERS, "other"]), st.sampled_from(["webapp", "api", "db"]),
              KINDS),
    st.tuples(STATES, st.none() | st.floats(NOW - 3 * STALE, NOW)), max_size=12,
).map(lambda d: {ctx(c, n, k): Report(s, t) for (c, n, k), (s, t) in d.items()})


def by_cluster(shown: dict[str, Report], *, deploying_only: bool = False
               ) -> dict[str, list[Report]]:
    out: dict[str, list[Report]] = {}
    for context, report in shown.items():
        _, cluster, kind, *_ = context.split("/")
        if cluster in CLUSTERS and (not deploying_only
                                    or kind in ("kustomization", "helmrelease")):
            out.setdefault(cluster, []).append(report)
    return out


def not_done(shown: dict[str, Report]) -> list[str]:
    """The expected clusters not done: no deploying context, or one that is not `success`."""
    deploys = by_cluster(shown, deploying_only=True)
    return [c for c in CLUSTERS
            if not (c in deploys and all(r.state == "success" for r in deploys[c]))]


@given(SHOWN)
def test_failure_dominates(shown: dict[str, Report]) -> None:
    result = agg(shown)
    failed = any(r.state in ("failure", "error") for rs in by_cluster(shown).values() for r in rs)
    assert (result is not None and result.state == "failure") == failed


@given(SHOWN)
def test_success_only_when_every_cluster_deployed_everywhere(shown: dict[str, Report]) -> None:
    result = agg(shown)
    failed = any(r.state in ("failure", "error") for rs in by_cluster(shown).values() for r in rs)
    everywhere = not failed and not not_done(shown)
    assert (result is not None and result.state == "success") == everywhere


@given(SHOWN, st.floats(0, 3 * STALE))
def test_otherwise_pending_or_error_when_stale(shown: dict[str, Report], later: float) -> None:
    result = agg(shown, NOW + later)
    clusters = by_cluster(shown)
    if not clusters:
        assert result is None
        return
    assert result is not None and len(result.description) <= 140
    if result.state in ("failure", "success"):
        return
    assert result.state in ("pending", "error")
    waiting = not_done(shown)
    assert waiting
    if result.state == "error":
        named = result.description.split(" from ", 1)[1].split(", ")
        assert named and set(named) <= set(waiting)
    else:
        assert all(c in result.description for c in waiting)


@given(SHOWN)
def test_old_failures_or_successes_are_not_stale(shown: dict[str, Report]) -> None:
    result = agg(shown, NOW + 100 * STALE)
    if result is not None and result.state == "error":
        assert "No report" in result.description
