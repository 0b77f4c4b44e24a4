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

from receiver.delivery import marks as delivery_marks
from receiver.delivery.package import has_push, is_package_delivery, package_consumer
from receiver.delivery.record import ROLE_ANNOTATE, DeliveryRecord, RecordTarget
from receiver.delivery.view import (
    CHECKING,
    CONTAINED,
    SUPERSEDED,
    Contains,
    DeliveryView,
    Local,
    Lookup,
    TargetView,
    Timeouts,
    never_known,
)
from receiver.flux.objects import (
    SOURCE_KINDS,
    FluxObject,
    ObjectKey,
    consumer_source,
    helm_chart_of,
)
from receiver.flux.origin import (
    is_oci,
    package_tag,
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
    handled_since,
    names_commit,
    progress_at,
    same_commit,
)


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
    if is_static(obj):
        return view(READY, "StaticRepository", "a HelmRepository of type oci is not reconciled "
                    "by source-controller: its HelmCharts pull from the registry")
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


def source_ready(record: DeliveryRecord, view: DeliveryView, consumer: FluxObject,
                 lookup: Lookup) -> bool:
    """May a listed consumer be annotated now? Once the source it waits for (`awaited_source`)
    is Ready for this delivery: annotated earlier, Flux would apply the previous commit."""
    awaited = awaited_source(consumer, lambda key: view.get(key) is not None)
    if awaited is None:
        return True
    mine = view.get(awaited)
    if mine is not None:
        return mine.state == READY
    src = lookup(awaited)
    if not record.sha:
        # A package push: not before its artifact is there, or the old one is applied.
        return src is None or has_push(record, src)
    return src is not None and progress_at(src, record.sha).state == READY


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
        return package_consumer(record, obj, source, role, view, marked, age, timeouts)
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


def is_static(obj: FluxObject) -> bool:
    """A HelmRepository of type `oci`: source-controller (since Flux 2.3) never reconciles
    it, so it never reports on a request. Its HelmCharts do the fetching."""
    return obj.kind == "HelmRepository" and obj.spec.get("type") == "oci"


def _done(record: DeliveryRecord, obj: FluxObject, marked: bool) -> tuple[str, str, str] | None:
    """Ready or failed at the pushed commit (or, with no commit, at our request; a chart
    release of a package push, at the pushed version)."""
    tag = package_tag(record.ref) if not record.sha and obj.kind == "HelmRelease" else None
    if tag is not None:
        # Handling our request proves nothing: its HelmChart may still hold the old chart.
        version = tag.replace("_", "+")  # OCI tags carry semver's `+` as `_`
        here = (applied_revision(obj) == version, attempted_revision(obj) == version)
        progress = progress_at(obj, "", here)
        if progress.state in (READY, FAILED):
            return progress.state, progress.reason, progress.message
        return None
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
