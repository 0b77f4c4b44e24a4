"""Flux event or live object state -> the Gitea commit status it should produce; which jobs
replace which, and what a resync repairs. Pure.

The wording and state come from `descriptions`, the repository from `repos`; the comparison with
what Gitea shows from `shown`. The shell (`receiver.status`) looks objects up and posts."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from receiver.delivery.view import SUPERSEDED as SUPERSEDED_REASON
from receiver.delivery.view import SUPERSEDED_OUTCOME
from receiver.flux.objects import CONSUMER_KINDS, FluxObject
from receiver.flux.origin import consumer_commits, is_oci
from receiver.flux.origin import event_commit as oci_event_commit
from receiver.flux.revisions import FAILED, HELM_REVISION_META, READY, TIMED_OUT, applied_revision, commit_of
from receiver.flux.revisions import SKIPPED as SKIPPED_TARGET
from receiver.status.descriptions import (
    ERROR,
    PENDING,
    PUSH_DESCRIPTION,
    SKIPPED,
    SUCCESS,
    describe,
    gitea_state,
    reason_words,
    truncate,
)
from receiver.status.flux_events import FluxEvent
from receiver.status.repos import Normaliser, RepoRef, repo_of
from receiver.status.shown import Fields, needs_post
from receiver.templates import StatusTemplates, render


@dataclass(frozen=True, slots=True)
class DesiredStatus:
    repo_key: str
    owner: str
    repo: str
    sha: str
    context: str
    state: str
    description: str
    target_url: str = ""

    @property
    def key(self) -> tuple[str, str, str]:
        """What Gitea keeps one latest status for (per instance)."""
        return (self.repo_key, self.sha, self.context)

    @property
    def fields(self) -> Fields:
        return (self.state, self.description, self.target_url)


def build_status(
    templates: StatusTemplates, obj_kind: str, namespace: str, name: str, repo: RepoRef,
    sha: str, state: str, description: str,
) -> DesiredStatus:
    values = {
        "cluster": templates.cluster, "kind": obj_kind.lower(), "namespace": namespace,
        "name": name, "sha": sha, "repo": repo.full_name, "owner": repo.owner, "host": repo.host,
        "uid8": templates.uid8,
    }
    context = render(templates.context, values)
    return DesiredStatus(
        repo_key=repo.key, owner=repo.owner, repo=repo.name, sha=sha,
        context=context.lower() if templates.lower else context, state=state,
        description=description, target_url=render(templates.target_url, values),
    )


def helm_commit(revision: str, obj: FluxObject, source: FluxObject | None) -> str | None:
    """The full commit a HelmRelease revision stands for, if it can be known.

    `x.y.z+<12hex>` (reconcileStrategy Revision) names a commit prefix: it is resolved only
    against the source's current artifact, the one commit we can vouch for. Otherwise the
    object's `event.toolkit.fluxcd.io/commit` annotation (RFC-0008) names it, if set.
    """
    match = HELM_REVISION_META.search(revision or "")
    if match is not None:
        found = commit_of(applied_revision(source)) if source is not None else None
        if found and found.startswith(match.group(1)):
            return found
        return None
    return commit_of(obj.annotations.get("event.toolkit.fluxcd.io/commit", ""))


def _commit_for(obj: FluxObject, source: FluxObject | None, revision: str) -> str | None:
    if obj.kind == "HelmRelease":
        return helm_commit(revision, obj, source)
    return commit_of(revision)


# Why an event produced no status; the shell counts these as `events{outcome}`.
MAPPED, IGNORED, NO_COMMIT, UNMAPPED = "mapped", "ignored", "no_commit", "unmapped"


@dataclass(frozen=True, slots=True)
class EventMapping:
    outcome: str
    status: DesiredStatus | None = None


def event_commit(event: FluxEvent, obj: FluxObject, source: FluxObject | None) -> str | None:
    if source is not None and is_oci(source) and obj.kind in CONSUMER_KINDS:
        return oci_event_commit(event.metadata, source)
    found = event.commit
    if found or event.involved.kind != "HelmRelease":
        return found
    return helm_commit(event.metadata.get("revision", ""), obj, source)


def desired_from_event(
    event: FluxEvent, obj: FluxObject | None, source: FluxObject | None,
    templates: StatusTemplates, normalise: Normaliser,
) -> EventMapping:
    """The status a Flux event asks for. `obj` is the involved object from the cache."""
    if obj is None:
        return EventMapping(UNMAPPED)
    repo = repo_of(obj, source, normalise)
    if repo is None:
        return EventMapping(UNMAPPED)
    state = gitea_state(event.reason, event.severity)
    if state is None:
        return EventMapping(IGNORED)
    sha = event_commit(event, obj, source)
    if sha is None:
        return EventMapping(NO_COMMIT)
    inv = event.involved
    return EventMapping(MAPPED, build_status(
        templates, inv.kind, inv.namespace, inv.name, repo, sha, state,
        describe(event.reason, event.message)))


def _condition(obj: FluxObject, type_: str) -> tuple[str, str, str]:
    cond = obj.condition(type_) or {}
    return (str(cond.get("status", "")), str(cond.get("reason", "")),
            str(cond.get("message", "")))


def _applied_and_attempted(
    obj: FluxObject, source: FluxObject | None
) -> tuple[str | None, str | None]:
    if source is not None and is_oci(source):
        return consumer_commits(obj, source)
    applied = _commit_for(obj, source, applied_revision(obj))
    attempted_rev = str(obj.status.get("lastAttemptedRevision", ""))
    attempted = _commit_for(obj, source, attempted_rev) if attempted_rev else applied
    return applied, attempted


def applied_commit(obj: FluxObject, source: FluxObject | None) -> str | None:
    """The commit a consumer last applied (a HelmRelease: its deployed chart's), if known."""
    return _applied_and_attempted(obj, source)[0]


def desired_from_object(
    obj: FluxObject, source_obj: FluxObject | None, templates: StatusTemplates,
    normalise: Normaliser,
) -> DesiredStatus | None:
    """The status a consumer's live state implies (resync), or None if it implies none.

    Ready True -> success at the last applied commit (a HelmRelease: its deployed chart
    version's commit); Ready False (or Stalled) -> its reason's state (`STATE_TABLE`, as an
    error) at the last attempted commit; still reconciling a new commit -> pending at it.
    A re-run at the applied commit never turns it back to pending, and a suspended object
    is left alone (its status is stale by design).
    """
    if obj.kind not in CONSUMER_KINDS or obj.suspended:
        return None
    repo = repo_of(obj, source_obj, normalise)
    if repo is None:
        return None
    applied, attempted = _applied_and_attempted(obj, source_obj)
    ready, reason, message = _condition(obj, "Ready")
    stalled, stalled_reason, stalled_message = _condition(obj, "Stalled")

    def status(sha: str | None, state: str | None, why: str, text: str) -> DesiredStatus | None:
        if sha is None or state is None:
            return None
        return build_status(templates, obj.kind, obj.namespace, obj.name, repo, sha, state,
                            describe(why, text))

    if stalled == "True":
        return status(attempted, gitea_state(stalled_reason, "error"), stalled_reason,
                      stalled_message)
    if ready == "True":
        return status(applied, SUCCESS, reason or "Succeeded", message)
    if ready == "False":
        state = gitea_state(reason, "error")
        if state == PENDING and attempted == applied:
            return None
        return status(attempted, state, reason, message)
    if attempted is not None and attempted != applied:
        return status(attempted, PENDING, "Progressing", message)
    return None


def pending_for_push(
    obj: FluxObject, source_obj: FluxObject | None, sha: str, templates: StatusTemplates,
    normalise: Normaliser,
) -> DesiredStatus | None:
    """`pending` on the pushed commit for a consumer the push touches (not for suspended ones)."""
    if not sha or obj.suspended:
        return None
    repo = repo_of(obj, source_obj, normalise)
    if repo is None:
        return None
    return build_status(templates, obj.kind, obj.namespace, obj.name, repo, sha.lower(), PENDING,
                        PUSH_DESCRIPTION)


def desired_after_timeout(
    obj: FluxObject, source_obj: FluxObject | None, sha: str, templates: StatusTemplates,
    normalise: Normaliser, superseded_by: str = "",
) -> DesiredStatus | None:
    """Ends the `pending` of a push Flux never deployed.

    `skipped` (Gitea >= 1.25 counts it as success) only when the delivery found it superseded:
    Flux went past it to `superseded_by`, after a later push. A push Flux simply did not deploy
    in time is `error`, whatever commit the source happens to hold: it may be the one before.
    """
    repo = repo_of(obj, source_obj, normalise)
    if repo is None or obj.suspended:
        return None
    if superseded_by:
        state, text = SKIPPED, f"Superseded: Flux deployed {superseded_by[:12]} instead"
    else:
        _, reason, message = _condition(obj, "Ready")
        detail = " ".join(f"{reason_words(reason).lower()}: {message}".split()) if reason else ""
        state, text = ERROR, "Flux did not deploy this commit in time" + (
            f" ({detail})" if detail else "")
    return build_status(templates, obj.kind, obj.namespace, obj.name, repo, sha, state,
                        truncate(text))


def outcome_to_post(state: str, reason: str) -> str | None:
    """What a pushed commit's delivery target, newly in `state`, posts: its live status once
    Ready or failed; a push Flux never deployed (`skipped` naming the deployed commit, or
    `error`) once timed out or superseded, so no `pending` stays; None while it goes on, or
    for a target skipped because its status never names a commit."""
    if state in (READY, FAILED, TIMED_OUT):
        return state
    if state == SKIPPED_TARGET and reason == SUPERSEDED_REASON:
        return SUPERSEDED_OUTCOME
    return None


def as_json(status: DesiredStatus) -> dict[str, Any]:
    """The status as plain data (logs, debugging)."""
    return {"repo": status.repo_key, "sha": status.sha, "context": status.context,
            "state": status.state, "description": status.description,
            "target_url": status.target_url}


def replaces_waiting(waiting: DesiredStatus, waiting_state_only: bool, new: DesiredStatus,
                     new_state_only: bool) -> bool:
    """Does a new job for a key replace the one still waiting to be posted?

    Yes, unless the waiting one carries an event's or a push's exact wording for the same state
    and the new one is only derived from live state: then the wording is kept. A job derived
    from live state that says another state is newer truth and wins: a `pending` still queued
    (Gitea down) when its push timed out must not be posted after the outcome.
    """
    return not (new_state_only and not waiting_state_only and waiting.state == new.state)


def settles(pending: DesiredStatus, live: DesiredStatus | None) -> DesiredStatus | None:
    """The live-state status to post after an event's `pending` for a consumer, once its live
    state has moved past it at the same commit and context; None while it has not.

    kustomize-controller reports a run's progress and its outcome milliseconds apart; behind a
    Service they reach different replicas, and the `pending` may be posted after the outcome.
    The live state is the later truth, so it gets the last word (compared as state only).
    """
    if live is None or live.state == PENDING or live.key != pending.key:
        return None
    return live


def plan_repairs(
    desired: Iterable[DesiredStatus], shown: Mapping[str, Fields]
) -> list[DesiredStatus]:
    """The live-state statuses Gitea does not show: missing, or another state (resync).

    The state alone is compared: an event's own wording of the same outcome stays.
    """
    return [d for d in desired
            if needs_post(shown.get(d.context), d.fields, state_only=True)]


CommitKey = tuple[str, str, str]  # (instance, repository key, sha): one listing in Gitea


def resync_schedule(
    commits: Iterable[CommitKey], cursors: Mapping[str, CommitKey]
) -> list[CommitKey]:
    """The order a resync reads commits in: round robin, carrying on where the last run stopped.

    Per instance, commits in sorted order starting after that instance's cursor (the last one
    checked), wrapping around; instances interleave, so a read budget is shared fairly and a
    large fleet is covered over several runs.
    """
    per_instance: dict[str, list[CommitKey]] = {}
    for commit in commits:
        per_instance.setdefault(commit[0], []).append(commit)
    rotated: list[Sequence[CommitKey]] = []
    for instance in sorted(per_instance):
        ordered = sorted(set(per_instance[instance]))
        cursor = cursors.get(instance)
        start = bisect_right(ordered, cursor) if cursor is not None else 0
        rotated.append(ordered[start:] + ordered[:start])
    out: list[CommitKey] = []
    for turn in range(max((len(r) for r in rotated), default=0)):
        out.extend(r[turn] for r in rotated if turn < len(r))
    return out
