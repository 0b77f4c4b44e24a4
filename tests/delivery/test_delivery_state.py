"""A delivery's state as a pure function of (record, live objects, now)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from receiver.delivery.marks import DELIVERIES_ANNOTATION
from receiver.delivery.record import ROLE_ANNOTATE, ROLE_TRACK, DeliveryRecord, RecordTarget
from receiver.delivery.state import evaluate
from receiver.delivery.view import Timeouts
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.times import epoch_seconds as parse_requested_at

SHA = "5394cb7f48ab0b1c2d3e4f5a6b7c8d9e0f1a2b3c"
OTHER = "1111111111111111111111111111111111111111"
MARK = "0123456789abcdef"
LATER = "fedcba9876543210"
T0 = 1_700_000_000.0
SRC = ObjectKey("GitRepository", "flux-system", "fleet")
APPS = ObjectKey("Kustomization", "flux-system", "apps")
INFRA = ObjectKey("Kustomization", "flux-system", "infra")
LIMITS = Timeouts(source_seconds=300, consumer_seconds=900)


def obj(key: ObjectKey, *, marks: str = "", status: dict[str, Any] | None = None) -> FluxObject:
    spec: dict[str, Any] = {}
    if key.kind == "Kustomization":
        spec = {"sourceRef": {"kind": "GitRepository", "name": SRC.name}, "path": "./apps"}
    annotations = {DELIVERIES_ANNOTATION: marks} if marks else {}
    return FluxObject({"apiVersion": "x/v1", "kind": key.kind,
                       "metadata": {"name": key.name, "namespace": key.namespace,
                                    "generation": 1, "annotations": annotations},
                       "spec": spec, "status": status or {}})


def ready(revision: str, **extra: Any) -> dict[str, Any]:
    return {"observedGeneration": 1, "artifact": {"revision": revision},
            "lastAppliedRevision": revision, "lastAttemptedRevision": revision,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded"}], **extra}


def failed(revision: str) -> dict[str, Any]:
    return {"observedGeneration": 1, "lastAttemptedRevision": revision,
            "conditions": [{"type": "Ready", "status": "False", "reason": "BuildFailed",
                            "message": "kustomize build failed"}]}


def record(sha: str = SHA, *targets: RecordTarget) -> DeliveryRecord:
    return DeliveryRecord("flux-system/gitea", sha, "refs/heads/main", T0, MARK, targets or (
        RecordTarget(SRC, ROLE_ANNOTATE), RecordTarget(APPS, ROLE_ANNOTATE),
        RecordTarget(INFRA, ROLE_TRACK)))


def states(objects: list[FluxObject], now: float = T0 + 1, rec: DeliveryRecord | None = None,
           **kw: Any) -> dict[str, tuple[str, str]]:
    table = {o.key: o for o in objects}
    view = evaluate(rec or record(), table.get, now, LIMITS, **kw)
    return {t.key.name: (t.state, t.reason) for t in view.targets}


def test_queued_until_the_mark_is_seen_then_annotated() -> None:
    assert states([obj(SRC), obj(APPS), obj(INFRA)]) == {
        "fleet": ("queued", ""), "apps": ("queued", ""), "infra": ("reconciling", "")}
    assert states([obj(SRC, marks=f"{MARK}@{T0}"), obj(APPS), obj(INFRA)])["fleet"] == (
        "annotated", "")


def test_ready_at_the_commit_whoever_annotated() -> None:
    rev = f"main@sha1:{SHA}"
    got = states([obj(SRC, status=ready(rev)), obj(APPS, status=ready(rev)),
                  obj(INFRA, status=ready(rev))])
    assert {name: state for name, (state, _) in got.items()} == {
        "fleet": "ready", "apps": "ready", "infra": "ready"}


def test_a_failed_consumer_fails_the_delivery() -> None:
    rev = f"main@sha1:{SHA}"
    table = {o.key: o for o in [obj(SRC, status=ready(rev)), obj(APPS, status=failed(rev)),
                                obj(INFRA)]}
    view = evaluate(record(), table.get, T0 + 1, LIMITS)
    assert view.outcome() == "failed" and view.settled and not view.final


def test_time_outs_come_from_now_alone() -> None:
    objects = [obj(SRC, marks=f"{MARK}@{T0}"), obj(APPS), obj(INFRA)]
    assert states(objects, now=T0 + 299)["fleet"][0] == "annotated"
    late = states(objects, now=T0 + 301)
    assert late["fleet"] == ("timed_out", "SourceTimeout")
    assert late["apps"] == ("timed_out", "SourceTimeout")
    assert late["infra"] == ("timed_out", "SourceTimeout")
    fetched = [obj(SRC, status=ready(f"main@sha1:{SHA}")), obj(APPS, marks=f"{MARK}@{T0}"),
               obj(INFRA)]
    assert states(fetched, now=T0 + 899)["apps"][0] == "annotated"
    assert states(fetched, now=T0 + 901)["apps"] == ("timed_out", "Timeout")
    assert states(fetched, now=T0 + 901)["infra"] == ("timed_out", "Timeout")


def test_a_deleted_object_fails_its_target() -> None:
    assert states([obj(SRC), obj(INFRA)])["apps"] == ("failed", "NotFound")


def handled(at: float) -> str:
    """A `lastHandledReconcileAt` value for unix time `at`: the `requestedAt` the bridge wrote,
    which Flux copies."""
    from datetime import UTC, datetime

    from receiver.delivery.patches import request_value
    return request_value(datetime.fromtimestamp(at, UTC))


def outcome(objects: list[FluxObject], now: float = T0 + 1,
            rec: DeliveryRecord | None = None, contains: Any = None) -> tuple[str, str]:
    table = {o.key: o for o in objects}
    view = evaluate(rec or record(), table.get, now, LIMITS,
                    **({"contains": contains} if contains is not None else {}))
    return view.outcome(), view.superseded_by()


def history(answer: bool | None) -> Any:
    """A `contains` oracle that says `answer` for NEWER holding SHA, False for anything else."""
    asked: list[tuple[str, str]] = []

    def contains(source: FluxObject, ours: str, held: str) -> bool | None:
        asked.append((ours, held))
        return answer if (ours, held) == (SHA, NEWER) else False

    contains.asked = asked  # type: ignore[attr-defined]
    return contains


def test_a_later_commit_that_contains_ours_makes_it_ready_not_superseded() -> None:
    marks = f"{LATER}@{T0 + 5} {MARK}@{T0}"
    at_newer = ready(f"main@sha1:{NEWER}", lastHandledReconcileAt=handled(T0 + 5))
    src = obj(SRC, marks=marks, status=at_newer)
    contains = history(True)
    table = {o.key: o for o in [src, obj(APPS, status=ready(OLD_REV)), obj(INFRA)]}
    view = evaluate(record(), table.get, T0 + 6, LIMITS, contains=contains)
    assert (view.get(SRC).state, view.get(SRC).reason) == ("ready", "ContainsCommit")
    assert NEWER[:12] in view.get(SRC).message
    # Its consumers still rest at the old commit: not ready until they apply the newer one.
    assert view.get(APPS).state not in ("ready", "skipped") and view.outcome() == "in_progress"
    applied = [src, obj(APPS, status=ready(f"main@sha1:{NEWER}")),
               obj(INFRA, status=ready(f"main@sha1:{NEWER}"))]
    assert outcome(applied, contains=contains) == ("ready", "")
    assert contains.asked and set(contains.asked) <= {(SHA, NEWER), (SHA, OTHER)}


def test_while_gitea_is_asked_the_delivery_waits_and_a_no_supersedes() -> None:
    marks = f"{LATER}@{T0 + 5} {MARK}@{T0}"
    src = obj(SRC, marks=marks, status=ready(f"main@sha1:{NEWER}",
                                             lastHandledReconcileAt=handled(T0 + 5)))
    asking = states([src, obj(APPS), obj(INFRA)])
    assert outcome([src, obj(APPS), obj(INFRA)], contains=history(None)) == ("in_progress", "")
    table = {o.key: o for o in [src, obj(APPS), obj(INFRA)]}
    view = evaluate(record(), table.get, T0 + 6, LIMITS, contains=history(None))
    assert (view.get(SRC).state, view.get(SRC).reason) == ("reconciling", "CheckingHistory")
    assert asking["fleet"] == ("skipped", "Superseded")  # no Git host to ask: superseded
    assert outcome([src, obj(APPS), obj(INFRA)], contains=history(False)) == (
        "superseded", NEWER)


def test_flux_resting_at_a_descendant_without_any_later_push_is_ready() -> None:
    # Flux's own interval fetched a commit that contains ours (no later push through us).
    src = obj(SRC, marks=f"{MARK}@{T0}",
              status=ready(f"main@sha1:{NEWER}", lastHandledReconcileAt=handled(T0 + 2)))
    objects = [src, obj(APPS, status=ready(f"main@sha1:{NEWER}")),
               obj(INFRA, status=ready(f"main@sha1:{NEWER}"))]
    assert outcome(objects, contains=history(True)) == ("ready", "")
    assert outcome(objects, contains=history(False), now=T0 + 901)[0] == "timed_out"


OLD_REV = f"main@sha1:{OTHER}"
NEWER = "2222222222222222222222222222222222222222"


def test_a_later_push_supersedes_once_flux_handled_it_and_went_elsewhere() -> None:
    marks = f"{LATER}@{T0 + 5} {MARK}@{T0}"
    went = obj(SRC, marks=marks, status=ready(f"main@sha1:{NEWER}",
                                              lastHandledReconcileAt=handled(T0 + 5)))
    got = states([went, obj(APPS), obj(INFRA)])
    assert got["fleet"] == ("skipped", "Superseded")
    assert got["apps"] == ("skipped", "Superseded")  # its source will never bring ours
    assert outcome([went, obj(APPS), obj(INFRA)]) == ("superseded", NEWER)


def test_the_same_commit_through_another_receiver_joins_and_never_ends_it() -> None:
    # The false "deployed": a second Receiver's mark for the same commit arrives before Flux
    # has fetched anything. Nothing has moved, so nothing is superseded.
    marks = f"{LATER}@{T0 + 0.4} {MARK}@{T0}"
    before = obj(SRC, marks=marks, status=ready(OLD_REV, lastHandledReconcileAt=handled(T0 - 60)))
    assert states([before, obj(APPS), obj(INFRA)])["fleet"][0] == "reconciling"
    assert outcome([before, obj(APPS), obj(INFRA)]) == ("in_progress", "")
    # Flux handles the second request and fetches the commit: it is ours.
    rev = f"main@sha1:{SHA}"
    fetched = obj(SRC, marks=marks, status=ready(rev, lastHandledReconcileAt=handled(T0 + 0.4)))
    assert states([fetched, obj(APPS), obj(INFRA)])["fleet"] == ("ready", "Succeeded")
    assert outcome([fetched, obj(APPS, status=ready(rev)), obj(INFRA, status=ready(rev))]) == (
        "ready", "")


def test_a_bare_request_from_another_receiver_supersedes_nothing_until_flux_moves() -> None:
    marks = f"{LATER}@{T0 + 1} {MARK}@{T0}"
    waiting = obj(SRC, marks=marks, status=ready(OLD_REV))
    assert states([waiting, obj(APPS), obj(INFRA)], now=T0 + 200)["fleet"][0] == "reconciling"
    # Flux handled a request made before ours: what it holds says nothing about ours.
    stale = obj(SRC, marks=marks, status=ready(OLD_REV, lastHandledReconcileAt=handled(T0 - 1)))
    assert states([stale, obj(APPS), obj(INFRA)])["fleet"][0] == "reconciling"


def test_no_later_mark_means_no_supersession_whatever_flux_holds() -> None:
    alone = obj(SRC, marks=f"{MARK}@{T0}",
                status=ready(f"main@sha1:{NEWER}", lastHandledReconcileAt=handled(T0 + 3)))
    assert states([alone, obj(APPS), obj(INFRA)])["fleet"][0] == "reconciling"
    assert outcome([alone, obj(APPS), obj(INFRA)], now=T0 + 301) == ("timed_out", "")


def test_a_consumer_that_applied_ours_is_not_superseded_by_its_source_moving_on() -> None:
    marks = f"{LATER}@{T0 + 5} {MARK}@{T0}"
    src = obj(SRC, marks=marks, status=ready(f"main@sha1:{NEWER}",
                                             lastHandledReconcileAt=handled(T0 + 5)))
    started = {"observedGeneration": 1, "lastAttemptedRevision": f"main@sha1:{SHA}",
               "conditions": [{"type": "Ready", "status": "Unknown", "reason": "Progressing"}]}
    got = states([src, obj(APPS, status=started), obj(INFRA)])
    assert got["apps"][0] == "reconciling"


_STATUSES = st.sampled_from(["none", "old", "ours", "newer", "ours-failed"])
_HANDLED = st.sampled_from([None, -60.0, 0.0, 0.5, 5.0])


def _status(which: str, handled_at: float | None) -> dict[str, Any]:
    extra = {} if handled_at is None else {"lastHandledReconcileAt": handled(T0 + handled_at)}
    revision = {"old": OLD_REV, "ours": f"main@sha1:{SHA}", "newer": f"main@sha1:{NEWER}",
                "ours-failed": f"main@sha1:{SHA}"}.get(which)
    if revision is None:
        return extra
    if which == "ours-failed":
        return {**failed(revision), **extra}
    return ready(revision, **extra)


@given(src=_STATUSES, src_handled=_HANDLED, apps=_STATUSES, apps_handled=_HANDLED,
       infra=_STATUSES, later=st.sampled_from([None, -1.0, 0.4, 5.0]),
       now=st.sampled_from([1.0, 299.0, 301.0, 901.0]),
       newer_contains=st.sampled_from([None, True, False]))
def test_ready_only_when_every_target_is_ready_at_the_pushed_commit(
        src: str, src_handled: float | None, apps: str, apps_handled: float | None, infra: str,
        later: float | None, now: float, newer_contains: bool | None) -> None:
    """The promise a CI gate relies on, over every mix of marks, statuses, times and what
    Gitea says of the newer commit's history."""
    marks = f"{MARK}@{T0}" + (f" {LATER}@{T0 + later}" if later is not None else "")
    objects = [obj(SRC, marks=marks, status=_status(src, src_handled)),
               obj(APPS, marks=marks, status=_status(apps, apps_handled)),
               obj(INFRA, status=_status(infra, None))]
    verdict, by = outcome(objects, now=T0 + now, contains=history(newer_contains))
    if verdict == "ready":
        # Each target rests at ours, or at the newer commit when it contains ours.
        allowed = {"ours", "newer"} if newer_contains else {"ours"}
        assert {src, apps, infra} <= allowed, (src, apps, infra)
    if verdict == "superseded":
        # Flux handled a request made after a later push and rests at another commit,
        # which does not contain ours.
        assert by in (NEWER, OTHER) and later is not None and later > 0
        assert not (by == NEWER and newer_contains is not False)
    if later is None or later <= 0:
        assert verdict != "superseded"


def test_flux_already_started_needs_no_annotation() -> None:
    rev = f"main@sha1:{SHA}"
    started = {"observedGeneration": 1, "lastAttemptedRevision": rev,
               "conditions": [{"type": "Ready", "status": "Unknown", "reason": "Progressing"}]}
    got = states([obj(SRC, status=ready(rev)), obj(APPS, status=started), obj(INFRA)])
    assert got["apps"] == ("reconciling", "AlreadyStarted")


def test_without_a_commit_done_means_our_request_was_handled() -> None:
    rec = record("", RecordTarget(SRC, ROLE_ANNOTATE))
    handled = {"lastHandledReconcileAt": "2023-11-14T22:13:21.500000000Z",
               "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded"}]}
    before = {**handled, "lastHandledReconcileAt": "2023-11-14T22:13:19.000000000Z"}
    assert states([obj(SRC, marks=f"{MARK}@{T0}", status=before)], rec=rec)["fleet"][0] == (
        "annotated")
    assert states([obj(SRC, marks=f"{MARK}@{T0}", status=handled)], rec=rec)["fleet"][0] == (
        "ready")


def test_what_only_this_replica_knows_is_added() -> None:
    local = {SRC: ("failed", "AnnotateFailed", "forbidden")}
    assert states([obj(SRC), obj(APPS), obj(INFRA)], local=local)["fleet"] == (
        "failed", "AnnotateFailed")


def test_requested_at_values() -> None:
    assert parse_requested_at("2023-11-14T22:13:20.123456789Z") == T0 + 0.123456
    assert parse_requested_at("2023-11-14T22:13:20Z") == T0
    assert parse_requested_at("2023-11-14T22:13:20.5Z some-id") == T0 + 0.5
    assert parse_requested_at("yesterday") is None
    assert parse_requested_at("") is None


@given(st.lists(st.sampled_from(["none", "marked", "ready", "failed", "other"]), min_size=3,
                max_size=3), st.floats(min_value=0, max_value=2000))
def test_same_inputs_same_answer_and_final_is_consistent(kinds: list[str], dt: float) -> None:
    def make(key: ObjectKey, kind: str) -> FluxObject:
        rev = f"main@sha1:{SHA}"
        return {
            "none": lambda: obj(key),
            "marked": lambda: obj(key, marks=f"{MARK}@{T0}"),
            "ready": lambda: obj(key, status=ready(rev)),
            "failed": lambda: obj(key, status=failed(rev)),
            "other": lambda: obj(key, marks=f"{LATER}@{T0 + 1}", status=ready(f"x@sha1:{OTHER}")),
        }[kind]()

    objects = [make(k, kind) for k, kind in zip((SRC, APPS, INFRA), kinds, strict=True)]
    table = {o.key: o for o in objects}
    first = evaluate(record(), table.get, T0 + dt, LIMITS)
    assert first == evaluate(record(), dict(table).get, T0 + dt, LIMITS)
    if dt > LIMITS.consumer_seconds:
        assert first.final  # past every time-out nothing is left in progress
    assert first.outcome() in {"ready", "failed", "timed_out", "in_progress"}


def test_a_listed_consumer_is_annotated_only_once_its_source_is_ready_for_the_push() -> None:
    from receiver.delivery.state import source_ready

    rev = f"main@sha1:{SHA}"
    apps = obj(APPS)
    waiting = {o.key: o for o in [obj(SRC, marks=f"{MARK}@{T0}"), apps, obj(INFRA)]}
    view = evaluate(record(), waiting.get, T0 + 1, LIMITS)
    assert not source_ready(record(), view, apps, waiting.get)  # Flux would apply the old one
    fetched = {**waiting, SRC: obj(SRC, status=ready(rev))}
    view = evaluate(record(), fetched.get, T0 + 1, LIMITS)
    assert source_ready(record(), view, apps, fetched.get)
    # A source this delivery does not follow: its live status at the pushed commit decides.
    alone = record(SHA, RecordTarget(APPS, ROLE_ANNOTATE))
    view = evaluate(alone, waiting.get, T0 + 1, LIMITS)
    assert not source_ready(alone, view, apps, waiting.get)
    assert source_ready(alone, evaluate(alone, fetched.get, T0 + 1, LIMITS), apps, fetched.get)


def test_a_ready_verdict_holds_while_flux_reconciles_the_same_commit_again() -> None:
    rev = f"main@sha1:{SHA}"
    again = {**ready(rev), "conditions": [
        {"type": "Ready", "status": "Unknown", "reason": "Progressing",
         "message": "Reconciliation in progress"}]}
    objects = [obj(SRC, status=ready(rev)), obj(APPS, status=again), obj(INFRA, status=ready(rev))]
    assert outcome(objects) == ("ready", "")
    # Never applied yet and in progress: still in progress.
    first_time = {"observedGeneration": 1, "lastAttemptedRevision": rev,
                  "conditions": again["conditions"]}
    objects[1] = obj(APPS, status=first_time)
    assert outcome(objects)[0] == "in_progress"
    # Reconciling again, and it fails this time: the failure shows.
    objects[1] = obj(APPS, status={**ready(rev), **failed(rev)})
    assert outcome(objects)[0] == "failed"
