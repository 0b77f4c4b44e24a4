"""A delivery's state: a pure function of (record, live objects, now).

`GET /deliveries/{id}` on any replica, the reconcile loop (which acts on it: consumer patches,
`pending` and final statuses, the lead-time metric) and the tests all call `evaluate`. Nothing
here depends on which replica accepted the push: what was annotated is read from the bridge's
mark on the objects (`delivery_marks`), progress from their status, time-outs from `now`.

The one input a replica may add is `local`: outcomes only it can know (a patch the API server
refused). Other replicas then report that target as timed out once its time is up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from receiver import delivery_marks
from receiver.delivery_record import ROLE_ANNOTATE, DeliveryRecord, RecordTarget
from receiver.flux.objects import (
    SOURCE_KINDS,
    FluxObject,
    ObjectKey,
    consumer_source,
    helm_chart_of,
)
from receiver.flux.revisions import (
    ANNOTATED,
    FAILED,
    FINAL_STATES,
    QUEUED,
    READY,
    RECONCILING,
    SKIPPED,
    TIMED_OUT,
    applied_revision,
    at_rest,
    attempted_revision,
    commit_of,
    followable,
    names_commit,
    progress_at,
    same_commit,
)
from receiver.origin import (
    artifact_commit,
    artifact_revision,
    consumer_at_artifact,
    consumer_commits,
    has_pushed_artifact,
    is_oci,
    package_tag,
)

Lookup = Callable[[ObjectKey], FluxObject | None]

# A delivery's verdicts. Only `ready` means "deployed"; `superseded` is final but is not
# success: Flux went to a later commit and never reported ours.
IN_PROGRESS = "in_progress"
SUPERSEDED_OUTCOME = "superseded"
OUTCOMES = (IN_PROGRESS, READY, FAILED, TIMED_OUT, SUPERSEDED_OUTCOME)
SUPERSEDED = "Superseded"  # the reason of a skipped target taken to a later commit
CONTAINED = "ContainsCommit"  # the reason of a target Ready at a later commit that holds ours
CHECKING = "CheckingHistory"  # while the shell asks Gitea whether a later commit holds ours

Contains = Callable[[FluxObject, str, str], "bool | None"]
"""`contains(source, ours, held)`: does commit `held` contain commit `ours` (ours is `held` or
one of its ancestors) in the repository `source` fetches? None while nobody knows yet: the shell
asks Gitea, caches the answer, and evaluates again (`receiver/ancestry.py`)."""


def never_known(source: FluxObject, ours: str, held: str) -> bool:
    """`Contains` without a Git host to ask: a later commit is never taken to contain ours."""
    return False


@dataclass(frozen=True, slots=True)
class Timeouts:
    source_seconds: float
    consumer_seconds: float


@dataclass(frozen=True, slots=True)
class TargetView:
    key: ObjectKey
    role: str
    state: str
    reason: str = ""
    message: str = ""
    commit: str = ""  # for a superseded target: the commit Flux took it to instead

    @property
    def is_source(self) -> bool:
        return self.key.kind in SOURCE_KINDS

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def as_dict(self, api_version: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.key.kind, "namespace": self.key.namespace,
                               "name": self.key.name, "role": self.role, "state": self.state}
        if api_version:
            out = {"apiVersion": api_version, **out}
        if self.reason or self.message:
            out["detail"] = {"reason": self.reason, "message": self.message}
        if self.commit:
            out["supersededBy"] = self.commit
        return out


@dataclass(frozen=True, slots=True)
class DeliveryView:
    targets: tuple[TargetView, ...]

    @property
    def final(self) -> bool:
        return all(t.final for t in self.targets)

    @property
    def settled(self) -> bool:
        """Nothing more to wait for: every target is final, or one has failed."""
        return self.final or any(t.state == FAILED for t in self.targets)

    def outcome(self) -> str:
        """The delivery's verdict, the one a CI gate reads (`OUTCOMES`).

        `failed` as soon as any target failed (a CI job can stop there); `in_progress` until
        every target is final; then `timed_out` if any timed out, `superseded` if any was
        taken to a later commit instead of ours, and `ready` only when every target it
        followed is Ready at the pushed commit. A skipped target is never counted as ready.
        """
        states = {t.state for t in self.targets}
        if FAILED in states:
            return FAILED
        if not self.final:
            return IN_PROGRESS
        if TIMED_OUT in states:
            return TIMED_OUT
        if any(t.state == SKIPPED and t.reason == SUPERSEDED for t in self.targets):
            return SUPERSEDED_OUTCOME
        return READY

    def superseded_by(self) -> str:
        """The commit Flux took a superseded target to instead of ours ("" if none was)."""
        for target in self.targets:
            if target.state == SKIPPED and target.reason == SUPERSEDED:
                return target.commit
        return ""

    def get(self, key: ObjectKey) -> TargetView | None:
        for target in self.targets:
            if target.key == key:
                return target
        return None


Local = Mapping[ObjectKey, tuple[str, str, str]]


def evaluate(record: DeliveryRecord, lookup: Lookup, now: float, timeouts: Timeouts,
             local: Local | None = None, contains: Contains = never_known) -> DeliveryView:
    """Every target's state, sources first (a consumer's state may depend on its source's)."""
    local = local or {}
    views: dict[ObjectKey, TargetView] = {}
    ordered = sorted(record.targets, key=lambda t: t.key.kind not in SOURCE_KINDS)
    for target in ordered:
        views[target.key] = _target(record, target, lookup, now, timeouts, local, views, contains)
    return DeliveryView(tuple(views[t.key] for t in record.targets))


def _target(record: DeliveryRecord, target: RecordTarget, lookup: Lookup, now: float,
            timeouts: Timeouts, local: Local, done: Mapping[ObjectKey, TargetView],
            contains: Contains) -> TargetView:
    key, role = target.key, target.role

    def view(state: str, reason: str = "", message: str = "") -> TargetView:
        return TargetView(key, role, state, reason, message)

    known = local.get(key)
    if known is not None and known[0] in FINAL_STATES:
        return view(*known)
    obj = lookup(key)
    if obj is None:
        return view(FAILED, "NotFound", "object was deleted")
    age = now - record.received
    marked = role == ROLE_ANNOTATE and delivery_marks.has(obj.annotations, record.mark)
    if key.kind in SOURCE_KINDS:
        return _source(record, obj, view, marked, age, timeouts, contains)
    return _consumer(record, obj, role, view, marked, age, timeouts, lookup, done, contains)


def _source(record: DeliveryRecord, obj: FluxObject, view: Callable[..., TargetView],
            marked: bool, age: float, timeouts: Timeouts, contains: Contains) -> TargetView:
    done = _done(record, obj, marked)
    if done is not None:
        return view(*done)
    if marked and record.sha and not followable(obj):
        return view(SKIPPED, "NotFollowed", "annotated; its status will never name the commit")
    held = held_elsewhere(record, obj) if record.sha else None
    if held is not None:
        moved = _moved_past(record, obj, obj, held, contains, view)
        if moved is not None and not (moved.reason == CHECKING and age > timeouts.source_seconds):
            return moved
    if age > timeouts.source_seconds:
        return view(TIMED_OUT, "SourceTimeout", f"no pushed commit after {timeouts.source_seconds:g}s")
    return _waiting(record, obj, view, marked)


def awaited_source(consumer: FluxObject,
                   in_delivery: Callable[[ObjectKey], bool]) -> ObjectKey | None:
    """The source a consumer waits for in a delivery: its `sourceRef`, except that a HelmRelease
    waits for the HelmChart it installs from (between it and its HelmRepository) when the same
    delivery annotates that HelmChart, as `flux reconcile --with-source` does."""
    chart = helm_chart_of(consumer)
    if chart is not None and in_delivery(chart):
        return chart
    src_ref = consumer_source(consumer)
    return src_ref.key if src_ref is not None else None


def _consumer(record: DeliveryRecord, obj: FluxObject, role: str, view: Callable[..., TargetView],
              marked: bool, age: float, timeouts: Timeouts, lookup: Lookup,
              done_views: Mapping[ObjectKey, TargetView], contains: Contains) -> TargetView:
    src_ref = consumer_source(obj)
    awaited = awaited_source(obj, done_views.__contains__)
    src_view = done_views.get(awaited) if awaited is not None else None
    if src_view is not None and src_view.state in (FAILED, TIMED_OUT):
        reason = "SourceTimeout" if src_view.state == TIMED_OUT else "SourceFailed"
        return view(src_view.state, reason, "its source did not get the pushed commit")
    source = lookup(src_ref.key) if src_ref is not None else None
    if source is not None and is_package_delivery(record) and is_oci(source):
        return _package_consumer(record, obj, source, role, view, marked, age, timeouts)
    done = _done(record, obj, marked)
    if done is not None:
        return view(*done)
    if marked and record.sha and not followable(obj):
        return view(SKIPPED, "NotFollowed", "annotated; its status will never name the commit")
    if record.sha and source is not None:
        moved = _consumer_moved_past(record, obj, source, src_view, contains, view)
        if moved is not None and not (moved.reason == CHECKING
                                      and age > timeouts.consumer_seconds):
            return moved
    if age > timeouts.consumer_seconds:
        return view(TIMED_OUT, "Timeout", f"not ready after {timeouts.consumer_seconds:g}s")
    if role != ROLE_ANNOTATE:
        # Tracked: Flux reconciles it by itself once its source has the commit.
        progress = progress_at(obj, record.sha) if record.sha else None
        return view(RECONCILING, progress.reason if progress else "",
                    progress.message if progress else "")
    if not marked and record.sha and same_commit(attempted_revision(obj), record.sha):
        return view(RECONCILING, "AlreadyStarted", "")
    return _waiting(record, obj, view, marked)


def is_package_delivery(record: DeliveryRecord) -> bool:
    """A package push: its record names the pushed tag (`origin.package_ref`), no commit."""
    return not record.sha and package_tag(record.ref) is not None


def has_push(record: DeliveryRecord, source: FluxObject) -> bool:
    """Has an OCI source of a package delivery got the pushed artifact (`origin`)? Always
    True for other deliveries and sources: their commit is known, or nothing is awaited."""
    tag = package_tag(record.ref) if not record.sha else None
    if tag is None or not is_oci(source):
        return True
    ours = any(t.key == source.key and t.role == ROLE_ANNOTATE for t in record.targets)
    requested = (ours and delivery_marks.has(source.annotations, record.mark)
                 and handled_since(source, record.received))
    return has_pushed_artifact(source, tag, record.received, requested)


def package_commit(record: DeliveryRecord, source: FluxObject | None) -> str | None:
    """The commit a package delivery's consumers of `source` deploy: the one the pushed
    artifact names, once the source has it. None until then, or if it names none."""
    if source is None or not is_package_delivery(record) or not is_oci(source):
        return None
    return artifact_commit(source) if has_push(record, source) else None


def _package_consumer(record: DeliveryRecord, obj: FluxObject, source: FluxObject, role: str,
                      view: Callable[..., TargetView], marked: bool, age: float,
                      timeouts: Timeouts) -> TargetView:
    """A consumer of an OCI source in a package delivery, followed at the pushed artifact:
    at the commit it names (`origin.consumer_commits`), or at its revision if it names none."""
    if has_push(record, source):
        sha = artifact_commit(source)
        if sha is not None:
            applied, attempted = consumer_commits(obj, source)
            here = (applied == sha, attempted == sha)
        else:
            here = consumer_at_artifact(obj, source)
        progress = progress_at(obj, sha or "", here)
        if progress.state in (READY, FAILED):
            return view(progress.state, progress.reason, progress.message)
    else:
        sha, here, progress = None, (False, False), None
    if age > timeouts.consumer_seconds:
        return view(TIMED_OUT, "Timeout", f"not ready after {timeouts.consumer_seconds:g}s")
    if role == ROLE_ANNOTATE and not marked and not here[1]:
        return view(QUEUED)  # annotated once the source has the artifact (`reconcile`)
    if progress is None:
        # Not there yet: a reconcile now would apply the previous artifact.
        return view(ANNOTATED if marked else RECONCILING)
    named = f"from commit {sha}" if sha else "which names no commit"
    return view(RECONCILING, progress.reason or "ArtifactPulled",
                progress.message or f"artifact {artifact_revision(source)} {named}")


def _done(record: DeliveryRecord, obj: FluxObject, marked: bool) -> tuple[str, str, str] | None:
    """Ready or failed at the pushed commit (or, with no commit, at our request)."""
    if record.sha:
        progress = progress_at(obj, record.sha)
        if progress.state in (READY, FAILED):
            return progress.state, progress.reason, progress.message
        return None
    if not marked or not handled_since(obj, record.received):
        return None
    cond = obj.condition("Ready") or {}
    state = {"True": READY, "False": FAILED}.get(str(cond.get("status")))
    if state is None:
        return None
    return state, str(cond.get("reason", "")), str(cond.get("message", ""))


def _waiting(record: DeliveryRecord, obj: FluxObject, view: Callable[..., TargetView],
             marked: bool) -> TargetView:
    if not marked:
        return view(QUEUED)
    if record.sha:
        progress = progress_at(obj, record.sha)
        if progress.reason:
            return view(RECONCILING, progress.reason, progress.message)
    return view(ANNOTATED)


def held_elsewhere(record: DeliveryRecord, obj: FluxObject) -> str | None:
    """The commit (or, for a HelmRelease, the chart version) an object rests at after it moved
    past ours, or None if it has not.

    Both must hold. The controller has handled a reconcile request made since ours was received
    and is at rest (Ready at its generation): whatever it fetched or applied then, it did after
    our commit was in Gitea, so it did not stop at ours. And what it holds is another commit.
    "The object has not moved yet" is never "moved past": a repeat of the same commit through
    another Receiver, or a bare request, only joins the work in flight.
    """
    if not handled_since(obj, record.received) or not at_rest(obj):
        return None
    return _holds_other(obj, record.sha)


def _holds_other(obj: FluxObject, sha: str) -> str | None:
    holds = applied_revision(obj)
    if not holds or names_commit(obj, holds, sha):
        return None
    return commit_of(holds) or holds


def superseded_by(record: DeliveryRecord, obj: FluxObject,
                  contains: Contains = never_known) -> str | None:
    """The later commit Flux took this object to instead of ours, or None if it has not: it
    moved past ours (`held_elsewhere`), another delivery annotated it after ours (someone asked
    for a later state), and what it holds does not contain ours (as far as anyone knows)."""
    if not delivery_marks.newer_than(obj.annotations, record.received, record.mark):
        return None
    held = held_elsewhere(record, obj)
    if held is None or (_is_commit(held) and contains(obj, record.sha, held) is not False):
        return None
    return held


def _is_commit(revision: str) -> bool:
    return commit_of(revision) == revision


def _moved_past(record: DeliveryRecord, obj: FluxObject, source: FluxObject, held: str,
                contains: Contains, view: Callable[..., TargetView]) -> TargetView | None:
    """An object resting at another commit: Ready if that commit contains ours, reconciling
    while Gitea is asked, superseded if a later push took it there; None otherwise (it goes on
    waiting: nothing says ours will not come)."""
    answer = contains(source, record.sha, held) if _is_commit(held) else False
    if answer is True:
        return view(READY, CONTAINED,
                    f"Flux holds {held[:12]}, which contains {record.sha[:12]}")
    if answer is None:
        return view(RECONCILING, CHECKING,
                    f"asking Gitea whether {held[:12]} contains {record.sha[:12]}")
    if delivery_marks.newer_than(obj.annotations, record.received, record.mark):
        return _superseded_view(record, view, held)
    return None


def _consumer_moved_past(record: DeliveryRecord, obj: FluxObject, source: FluxObject,
                         src_view: TargetView | None, contains: Contains,
                         view: Callable[..., TargetView]) -> TargetView | None:
    """A consumer's verdict once it, or its source, moved past our commit.

    A consumer applies its source's new artifact without a request, so besides its own
    `held_elsewhere` it counts as resting elsewhere once its source is Ready at a commit that
    contains ours. If the source was superseded and the consumer never attempted ours, ours
    will never reach it."""
    held = held_elsewhere(record, obj)
    if held is None and src_view is not None and src_view.reason == CONTAINED and at_rest(obj):
        held = _holds_other(obj, record.sha)
    if held is not None:
        moved = _moved_past(record, obj, source, held, contains, view)
        if moved is not None:
            return moved
    if names_commit(obj, attempted_revision(obj), record.sha):
        return None
    if src_view is not None:
        if src_view.state == SKIPPED and src_view.reason == SUPERSEDED:
            return _superseded_view(record, view, src_view.commit)
        return None
    later = superseded_by(record, source, contains)
    return _superseded_view(record, view, later) if later is not None else None


def _superseded_view(record: DeliveryRecord, view: Callable[..., TargetView],
                     later: str) -> TargetView:
    target = view(SKIPPED, SUPERSEDED,
                  f"Flux went to {later[:12]} after a later push; {record.sha[:12]} was never "
                  "reported here")
    return TargetView(target.key, target.role, target.state, target.reason, target.message,
                      commit=later)


def handled_since(obj: FluxObject, since: float) -> bool:
    """Has the controller handled a reconcile request made at or after `since` (unix)?"""
    handled = obj.status.get("lastHandledReconcileAt")
    stamp = parse_requested_at(handled) if isinstance(handled, str) else None
    return stamp is not None and stamp >= since - 0.001


def parse_requested_at(value: str) -> float | None:
    """Unix seconds of a `requestedAt` value (RFC 3339, any sub-second precision), or None."""
    text = value.strip().split(" ", 1)[0]
    if not text:
        return None
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(c for c in rest if c.isdigit())
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
