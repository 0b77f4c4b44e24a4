"""Flux event or live object state -> the Gitea commit status it should produce. Pure.

One table (`STATE_TABLE`) decides the Gitea state from a Flux reason and severity; the rest
renders the context, description and target URL, finds the commit and the repository, and picks
the Gitea instances that host it. The shell (`receiver.status`) looks objects up and posts.

Descriptions are built so that the same outcome always reads the same: Flux repeats
`ReconciliationSucceeded` on every interval with a new duration in its message, and a status
derived from the live object (resync) must read like the one derived from the event, or every
resync would post again. Durations are masked when two statuses are compared.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from receiver.delivery.view import SUPERSEDED as SUPERSEDED_REASON
from receiver.flux.objects import CONSUMER_KINDS, FluxObject
from receiver.flux.origin import artifact_commit, consumer_commits, is_oci, source_url
from receiver.flux.origin import event_commit as oci_event_commit
from receiver.flux.revisions import FAILED, HELM_REVISION_META, READY, TIMED_OUT, applied_revision, commit_of
from receiver.flux.revisions import SKIPPED as SKIPPED_TARGET
from receiver.status.flux_events import FluxEvent
from receiver.templates import StatusTemplates, render

PENDING, SUCCESS, FAILURE, ERROR, WARNING, SKIPPED = (
    "pending", "success", "failure", "error", "warning", "skipped")

# Flux reason -> (state for an info event, state for an error event). None: post nothing.
# Rows are grouped by why they map as they do; `gitea_state` applies the defaults below them.
STATE_TABLE: dict[str, tuple[str | None, str | None]] = {
    # Still working, or waiting on something else: the verdict on the commit is not in yet.
    "Progressing": (PENDING, PENDING),
    "ProgressingWithRetry": (PENDING, FAILURE),  # as an error: the last attempt failed
    "DependencyNotReady": (PENDING, PENDING),
    "SourceNotReady": (PENDING, PENDING),
    # The commit is deployed (Kustomization, HelmRelease) or fetched (GitRepository).
    "ReconciliationSucceeded": (SUCCESS, None),
    "Succeeded": (SUCCESS, None),
    "NewArtifact": (SUCCESS, None),
    "InstallSucceeded": (SUCCESS, None),
    "UpgradeSucceeded": (SUCCESS, None),
    "TestSucceeded": (SUCCESS, None),
    # The commit's content failed: build, apply, health, Helm release, or a remediation after
    # one (a rollback that succeeded still means this commit's release failed).
    "BuildFailed": (FAILURE, FAILURE),
    "ReconciliationFailed": (FAILURE, FAILURE),
    "HealthCheckFailed": (FAILURE, FAILURE),
    "PruneFailed": (FAILURE, FAILURE),
    "ValidationFailed": (FAILURE, FAILURE),
    "InstallFailed": (FAILURE, FAILURE),
    "UpgradeFailed": (FAILURE, FAILURE),
    "TestFailed": (FAILURE, FAILURE),
    "RollbackSucceeded": (FAILURE, FAILURE),
    "RollbackFailed": (FAILURE, FAILURE),
    "UninstallSucceeded": (FAILURE, FAILURE),
    "UninstallFailed": (FAILURE, FAILURE),
    "RetriesExceeded": (FAILURE, FAILURE),
    "MissingRollbackTarget": (FAILURE, FAILURE),
    # Not the commit's fault: the source, credentials, permissions or Flux's own configuration.
    # (ArtifactFailed also covers a missing path; Flux cannot tell us which, so: error.)
    "ArtifactFailed": (ERROR, ERROR),
    "AccessDenied": (ERROR, ERROR),
    "AuthenticationFailed": (ERROR, ERROR),
    "FetchFailed": (ERROR, ERROR),
    "GitOperationFailed": (ERROR, ERROR),
    "StorageOperationFailed": (ERROR, ERROR),
    "DirectoryCreationFailed": (ERROR, ERROR),
    "InvalidCELExpression": (ERROR, ERROR),
    "FeatureGateDisabled": (ERROR, ERROR),
    "ValuesError": (ERROR, ERROR),
    "InvalidChartReference": (ERROR, ERROR),
    "ChartPullFailed": (ERROR, ERROR),
    "StateError": (ERROR, ERROR),
    # A newer revision cancelled the health check: no verdict, and none will come for this
    # commit. Not success, not the commit's failure; `warning` ends the pending.
    "HealthCheckCanceled": (WARNING, WARNING),
}
# Defaults: an unknown error reason is a failure (as Flux's own gitea Provider does); an
# unknown info reason says nothing about the commit (drift notices, change sets of other
# kinds) and is not posted. Trace events never reach a Provider.
_DEFAULT = (None, FAILURE)

DESCRIPTION_LIMIT = 140
ELLIPSIS = "\u2026"
PUSH_DESCRIPTION = "Push received, waiting for Flux"

# Messages that repeat what the status already says and change on every run.
_VOLATILE_MESSAGES = (
    re.compile(r"^Reconciliation finished in \S+, next run in \S+$"),
    re.compile(r"^Applied revision: \S+$"),
    re.compile(r"^Reconciliation in progress(?: for revision \S+)?$"),
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
# Go time.Duration strings: 1.2s, 10m0s, 250ms, 1h2m3.5s.
_UNIT = r"\d+(?:\.\d+)?(?:h|ms|m|s|us|µs|ns)"
_DURATION = re.compile(rf"\b{_UNIT}(?:{_UNIT})*\b")

# -- state and text ------------------------------------------------------------------------


def gitea_state(reason: str, severity: str) -> str | None:
    """The Gitea state for a Flux reason and severity (`STATE_TABLE`); None: post nothing."""
    if severity not in ("info", "error"):
        return None
    info, error = STATE_TABLE.get(reason, _DEFAULT)
    return info if severity == "info" else error


def reason_words(reason: str) -> str:
    """`HealthCheckFailed` -> `Health check failed` (Flux's gitea Provider lower-cases it)."""
    words = _CAMEL.sub(" ", reason.strip()).lower()
    return words[:1].upper() + words[1:]


# What a description must never carry: C0 and C1 control characters (NUL makes Gitea on
# PostgreSQL refuse the status; ESC starts terminal sequences), the bidirectional controls
# (U+061C, U+200E/F, U+202A-E, U+2066-9: they reorder what a reader sees) and lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                     "\ud800-\udfff]")


# A terminal escape sequence (ESC [ ... final byte) goes whole, not only its ESC.
_ANSI_CSI = re.compile("\x1b\\[[0-?]*[ -/]*[@-~]")


def _safe(text: str) -> str:
    return _UNSAFE.sub(" ", _ANSI_CSI.sub("", text))


def truncate(text: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """At most `limit` characters, controls replaced by spaces."""
    text = _safe(text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + ELLIPSIS


_BUILD_DIR = re.compile(r"/tmp/kustomization-\d+/")  # noqa: S108 - a pattern, not a path we use


def describe(reason: str, message: str) -> str:
    """A one-line description: reason in words, then the message unless it is noise."""
    words = " ".join(reason_words(_safe(reason)).split())
    # kustomize-controller builds in a fresh temp dir each run: drop it, or every repeat of
    # the same failure reads as a new description (and a new status post).
    text = " ".join(_BUILD_DIR.sub("", _safe(message)).split())
    if any(p.match(text) for p in _VOLATILE_MESSAGES):
        text = ""
    return truncate(f"{words}: {text}" if text and words else text or words)


def comparable(description: str) -> str:
    """A description with durations masked: `... after 5m0.3s` equals `... after 5m1.2s`."""
    return _DURATION.sub("<d>", description)


# -- repositories and instances -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RepoRef:
    key: str  # normalised host[:port][/sub-path]/owner/repo
    host: str
    owner: str
    name: str

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


def repo_ref(normalised: str | None) -> RepoRef | None:
    """Split a normalised repository key; the last two path segments are owner and name."""
    if not normalised:
        return None
    parts = normalised.strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        return None
    return RepoRef(normalised, parts[0], parts[-2], parts[-1])


Normaliser = Callable[[str], "str | None"]


def git_source_of(obj: FluxObject, source: FluxObject | None) -> FluxObject | None:
    """The GitRepository whose URL names the object's repository, if it has one."""
    if obj.kind == "GitRepository":
        return obj
    if obj.kind in CONSUMER_KINDS and source is not None and source.kind == "GitRepository":
        return source
    return None


def repo_of(obj: FluxObject, source: FluxObject | None, normalise: Normaliser) -> RepoRef | None:
    """The Gitea repository an object's statuses go to: its GitRepository's URL, or for a
    consumer of an OCIRepository the Git URL its artifact names (`origin.source_url`)."""
    git = git_source_of(obj, source)
    if git is not None:
        url = git.spec.get("url")
    elif obj.kind in CONSUMER_KINDS and source is not None and is_oci(source):
        url = source_url(source)
    else:
        return None
    return repo_ref(normalise(url)) if isinstance(url, str) and url else None


def source_commit(source: FluxObject | None) -> str | None:
    """The commit a source's current artifact holds (Git) or was built from (OCI)."""
    if source is None:
        return None
    return artifact_commit(source) if is_oci(source) else commit_of(applied_revision(source))


def instance_hosts(
    instances: Iterable[tuple[str, str, Iterable[str]]], host_key: Callable[[str], str]
) -> dict[str, tuple[str, ...]]:
    """(name, url, hosts) per instance -> {normalised repository host: instance names}.

    An instance serves the hosts it lists, or else the host of its own URL.
    """
    table: dict[str, list[str]] = {}
    for name, url, hosts in instances:
        served = [h for h in hosts if h] or [url.split("://", 1)[-1].split("/", 1)[0]]
        for host in served:
            names = table.setdefault(host_key(host), [])
            if name not in names:
                names.append(name)
    return {host: tuple(names) for host, names in table.items()}


def instances_for(repo_key: str, table: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Every instance that hosts the repository: mirrors in several regions all get it."""
    return table.get(repo_key.split("/", 1)[0], ())


# -- the desired status ----------------------------------------------------------------------

Fields = tuple[str, str, str]  # (state, description, target_url): what a status shows


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


def same_status(a: tuple[str, str, str], b: tuple[str, str, str], *, state_only: bool) -> bool:
    """(state, description, target_url) equality, durations masked; or the state alone."""
    if state_only:
        return a[0] == b[0]
    return a[0] == b[0] and comparable(a[1]) == comparable(b[1]) and a[2] == b[2]


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
    normalise: Normaliser,
) -> DesiredStatus | None:
    """Ends the `pending` of a push Flux never deployed within the delivery's wait.

    When the source is Ready at another commit, the branch moved on and Flux skipped ours:
    `skipped` (Gitea >= 1.25 counts it as success). Otherwise something is stuck: `error`.
    """
    repo = repo_of(obj, source_obj, normalise)
    if repo is None or obj.suspended:
        return None
    current = source_commit(source_obj)
    source_ready = source_obj is not None and _condition(source_obj, "Ready")[0] == "True"
    if source_ready and current and current != sha:
        state, text = SKIPPED, f"Superseded: Flux deployed {current[:12]} instead"
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
        return TIMED_OUT
    return None


def as_json(status: DesiredStatus) -> dict[str, Any]:
    """The status as plain data (logs, debugging)."""
    return {"repo": status.repo_key, "sha": status.sha, "context": status.context,
            "state": status.state, "description": status.description,
            "target_url": status.target_url}


# -- what Gitea shows, and what differs --------------------------------------------------------
#
# Several replicas post to one Gitea, so no replica's memory of its own posts is the truth.
# A replica may believe what it posted or read for `repeat_window` seconds (that suppresses an
# exact repeat, and lets one listing of a commit answer for all its contexts); after that it
# asks Gitea. A change is never suppressed: memory can only say "same", and "same" expires.


class ListedStatus(Protocol):
    """One status as a Gitea listing returns it, with the time Gitea stamped on it
    (`gitea.client.CommitStatus` fits)."""

    @property
    def state(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def target_url(self) -> str: ...
    @property
    def context(self) -> str: ...
    @property
    def id(self) -> int: ...
    @property
    def at(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class Seen:
    """What a replica saw Gitea show for one context at `at`: posted or read. None: nothing.
    `origin` names the event a post came from ("" for a read or a state-derived post)."""

    fields: Fields | None
    at: float
    origin: str = ""


def is_fresh(observed_at: float, now: float, window: float) -> bool:
    """An observation may be believed for `window` seconds, never longer (0: never)."""
    return 0 <= now - observed_at < window


def recall(
    seen: Seen | None, listed_at: float | None, now: float, window: float
) -> tuple[bool, Fields | None]:
    """(known, fields): what the replica may still believe Gitea shows for a context.

    A fresh post or read of the context answers. Otherwise a fresh *complete* listing of the
    commit answers "no status" (a listing records every context it shows, so a context it did
    not refresh was not in it). Anything older is unknown: ask Gitea.
    """
    if seen is not None and is_fresh(seen.at, now, window):
        return True, seen.fields
    if listed_at is not None and is_fresh(listed_at, now, window):
        return True, None
    return False, None


def recall_for_event(
    seen: Seen | None, listed_at: float | None, now: float, window: float, origin: str,
    arrived: float,
) -> tuple[bool, Fields | None]:
    """`recall` for a status that comes from a Flux event (`origin` identifies the event).

    Another replica may have posted since this one last looked, so only two things may be
    believed: our own post of this very event (a redelivery of it is an exact repeat), and what
    Gitea showed after the event arrived. A new event with the same words as an old one is not a
    repeat: failure, success (posted elsewhere), failure again must end showing failure.
    """
    if seen is not None and seen.origin == origin and is_fresh(seen.at, now, window):
        return True, seen.fields
    return recall(seen if seen is not None and seen.at >= arrived else None,
                  listed_at if listed_at is not None and listed_at >= arrived else None,
                  now, window)


def replaces_waiting(waiting: DesiredStatus, waiting_state_only: bool, new: DesiredStatus,
                     new_state_only: bool) -> bool:
    """Does a new job for a key replace the one still waiting to be posted?

    Yes, unless the waiting one carries an event's or a push's exact wording for the same state
    and the new one is only derived from live state: then the wording is kept. A job derived
    from live state that says another state is newer truth and wins: a `pending` still queued
    (Gitea down) when its push timed out must not be posted after the outcome.
    """
    return not (new_state_only and not waiting_state_only and waiting.state == new.state)


def needs_post(shown: Fields | None, wanted: Fields, *, state_only: bool) -> bool:
    """Post unless Gitea (as far as we may know) shows the same latest status already."""
    return shown is None or not same_status(shown, wanted, state_only=state_only)


Shown = TypeVar("Shown", bound=ListedStatus)


def latest_by_context(items: Iterable[Shown]) -> dict[str, Shown]:
    """Gitea's latest status per context from listed statuses, whatever order they came in.

    Gitea's ids grow with every status, so the highest id of a context is its latest; without
    ids the first listed wins (we ask for newest first). Empty states and contexts are skipped.
    """
    best: dict[str, tuple[tuple[int, int], Shown]] = {}
    for position, item in enumerate(items):
        if not item.state or not item.context:
            continue
        rank = (item.id, -position)
        current = best.get(item.context)
        if current is None or rank > current[0]:
            best[item.context] = (rank, item)
    return {context: item for context, (_, item) in best.items()}


def latest_per_context(items: Iterable[ListedStatus]) -> dict[str, Fields]:
    """What Gitea shows per context: the latest status's (state, description, target_url)."""
    return {context: (item.state, item.description, item.target_url)
            for context, item in latest_by_context(items).items()}


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
