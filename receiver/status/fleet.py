"""One status for the whole fleet (`statuses.fleet`). Pure.

Every region's bridge posts its clusters' statuses to every Gitea mirror, so the statuses of a
commit in Gitea are the shared record of where it is deployed. From them (the latest status per
context, with its time when Gitea gives one) this module decides the aggregate:

- `failure` as soon as one expected cluster shows `failure` or `error` on any of its contexts;
- else `error` when an expected cluster is stale: it shows a non-final status that has not
  changed for `stale_after` seconds, or nothing at all that long after the first report of
  any expected cluster on the commit;
- else `success` when every expected cluster is done: it shows at least one deploying context
  (a Kustomization's or a HelmRelease's) and `success` on every one of them;
- else `pending`, naming the clusters not done yet.

A source's `success` (a GitRepository that fetched the commit) says the commit reached the
cluster, not that it is deployed there, so it never makes a cluster done; a source's `failure`
still fails it, and any report counts as a sign of life against staleness.

A context belongs to a cluster when it parses with the context template and its `{cluster}`
field is one of the expected names; its `{kind}` field tells a deploying object from a source,
so the template needs both. Other contexts (other clusters, other tools, the aggregate itself)
are ignored, except a Flagger canary's (`canary_parser`): it counts as deploying, so a canary
still analysing keeps its cluster from being done, and one rolled back, even after the
Kustomization's `success`, fails it.

Environments (`environments`): the same aggregate over each environment's clusters, in order.

What this replica knows before Gitea shows it (`with_local`): the states it queued for its own
canaries on the commit stand in for what Gitea shows for those contexts, so a Kustomization's
`success` posted before its canary's `pending` never makes the cluster done.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from receiver.flux.objects import CONSUMER_KINDS
from receiver.status.descriptions import ERROR, FAILURE, PENDING, SUCCESS, truncate
from receiver.status.shown import ListedStatus, latest_by_context

DEFAULT_FLEET_CONTEXT = "flux/fleet"
FAILED_STATES = frozenset({FAILURE, ERROR})
# The `{kind}` values (lower-cased, as contexts render them) whose success means deployed.
DEPLOYING_KINDS = frozenset(kind.lower() for kind in CONSUMER_KINDS)


@dataclass(frozen=True, slots=True)
class Report:
    """The latest status of one context: its state and when Gitea says it was set (epoch
    seconds; None when Gitea gave no time)."""

    state: str
    at: float | None = None


@dataclass(frozen=True, slots=True)
class Aggregate:
    state: str
    description: str


def latest_reports(items: Iterable[ListedStatus]) -> dict[str, Report]:
    """The latest status per context (`statuses.latest_by_context`), with its time."""
    return {context: Report(item.state, item.at)
            for context, item in latest_by_context(items).items()}


def with_local(shown: Mapping[str, Report], local: Mapping[str, str],
               now: float) -> dict[str, Report]:
    """`shown`, with each context in `local` (context -> state this replica queued) at its
    queued state: Gitea's time when Gitea already shows that state, else `now`."""
    out = dict(shown)
    for context, state in local.items():
        seen = out.get(context)
        if seen is None or seen.state != state:
            out[context] = Report(state, now)
    return out


def classify(context: str, parser: re.Pattern[str]) -> tuple[str, bool] | None:
    """(its cluster, whether it is a deploying object's context) for an expected cluster's
    context; None for any other context."""
    match = parser.fullmatch(context)
    if match is None:
        return None
    return match["cluster"], match["kind"].lower() in DEPLOYING_KINDS


def classify_any(context: str, parser: re.Pattern[str],
                 canary_parser: re.Pattern[str] | None) -> tuple[str, bool] | None:
    """`classify`, and a canary's context (always deploying) when `canary_parser` is given."""
    found = classify(context, parser)
    if found is None and canary_parser is not None:
        match = canary_parser.fullmatch(context)
        if match is not None:
            return match["cluster"], True
    return found


def cluster_of(context: str, parser: re.Pattern[str]) -> str | None:
    found = classify(context, parser)
    return found[0] if found else None


def _names(clusters: Iterable[str]) -> str:
    return ", ".join(sorted(clusters))


def aggregate(
    shown: Mapping[str, Report], parser: re.Pattern[str], clusters: Sequence[str],
    fleet_context: str, now: float, stale_after: float,
    canary_parser: re.Pattern[str] | None = None,
) -> Aggregate | None:
    """The fleet status of a commit from what Gitea shows on it; None when no expected cluster
    has reported anything on it (nothing to say yet)."""
    per_cluster: dict[str, list[Report]] = {}
    deployed: dict[str, list[Report]] = {}  # the deploying contexts' reports only
    for context, report in shown.items():
        if context == fleet_context:
            continue
        found = classify_any(context, parser, canary_parser)
        if found is None:
            continue
        cluster, deploying = found
        per_cluster.setdefault(cluster, []).append(report)
        if deploying:
            deployed.setdefault(cluster, []).append(report)
    expected = sorted(set(clusters))
    if not any(c in per_cluster for c in expected):
        return None
    failed = [c for c in expected if any(r.state in FAILED_STATES for r in per_cluster.get(c, ()))]
    if failed:
        return Aggregate(FAILURE, truncate(f"Failed in {_names(failed)}"))
    done = [c for c in expected if c in deployed
            and all(r.state == SUCCESS for r in deployed[c])]
    waiting = [c for c in expected if c not in done]
    if not waiting:
        return Aggregate(SUCCESS, truncate(f"Deployed in all {len(expected)} clusters"))
    times = [r.at for c in expected for r in per_cluster.get(c, ()) if r.at is not None]
    first = min(times, default=None)
    stale = []
    for cluster in waiting:
        reports = per_cluster.get(cluster)
        if reports:
            known = [r.at for r in reports if r.at is not None]
            last = max(known) if len(known) == len(reports) else None
        else:
            last = first
        if last is not None and now - last >= stale_after:
            stale.append(cluster)
    if stale:
        return Aggregate(ERROR, truncate(
            f"No report for {stale_after:g}s from {_names(stale)}"))
    return Aggregate(PENDING, truncate(
        f"Deployed in {len(done)} of {len(expected)} clusters; waiting for {_names(waiting)}"))


def environment_aggregates(
    shown: Mapping[str, Report], parser: re.Pattern[str],
    environments: Sequence[tuple[str, Sequence[str]]], now: float, stale_after: float,
    canary_parser: re.Pattern[str] | None = None,
) -> list[tuple[str, Aggregate]]:
    """Each environment's (context, aggregate) over its own clusters, in the configured order;
    an environment none of whose clusters reported yet is left out. `environments`: (context,
    clusters) pairs."""
    out: list[tuple[str, Aggregate]] = []
    contexts = {context for context, _ in environments}
    others = {c: r for c, r in shown.items() if c not in contexts}
    for context, clusters in environments:
        verdict = aggregate(others, parser, clusters, context, now, stale_after, canary_parser)
        if verdict is not None:
            out.append((context, verdict))
    return out
