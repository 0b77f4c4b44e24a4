"""Flagger Canaries as commit statuses: which commit a canary analyses, and what its phase
says. Pure.

The commit: a Canary's `spec.targetRef` names a workload in its namespace; Flux labels what it
applies with the Kustomization (`kustomize.toolkit.fluxcd.io/name|namespace`) or HelmRelease
(`helm.toolkit.fluxcd.io/name|namespace`) that applied it, and that object's last applied
revision names the commit. Anything missing on that path is said, never guessed: a canary
whose commit cannot be found gets no status, and a reason (`Unknown`).

The status, per phase (`flagger.app/v1beta1` `status.phase`):
- Progressing: `pending`, the canary's weight (or blue/green iteration) and the check number;
- WaitingPromotion: `pending`, waiting for promotion; Promoting / Finalising: `pending`;
- Succeeded: `success`; Initialized: `success` (the first version, promoted without analysis);
- Failed: `failure`, rolled back, naming the check that failed when one is known;
- Initializing, Waiting: `pending`; Terminating, Terminated: no status.

Whose verdict (`commit_verdict`): Flagger notices a new revision of its target only at its next
analysis interval, and until then its phase is about an earlier commit. A commit whose apply
changed the workload is therefore `pending` ("waiting for Flagger to start the analysis") until
Flagger changes the phase after that apply: a canary about to run never leaves the commit, or the
fleet and environment aggregates counting it, reading `success` in that window. A commit whose
apply left the workload as it was (a re-reconcile, a change elsewhere in the repository) runs no
new analysis: Flagger's phase since the workload's last change is about the workload this commit
deploys, so its verdict, progress included, is this commit's too, once the shell knows the cached
workload is the cluster's (`rests_on_workload`: read again after the apply).
"""

from __future__ import annotations

import hmac
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from receiver.flux.canary import (
    FAILED,
    GONE_PHASES,
    PROGRESSING,
    SUCCEEDED,
    WAITING_PROMOTION,
    owner_of,
    phase_set_after,
    target_of,
    workload_seen,
)
from receiver.flux.objects import CONSUMER_KINDS, FluxObject, ObjectKey
from receiver.status.descriptions import FAILURE, PENDING, SUCCESS, truncate
from receiver.templates import render
from receiver.times import epoch_seconds

Lookup = Callable[[ObjectKey], FluxObject | None]
AppliedCommit = Callable[[FluxObject, FluxObject | None], "str | None"]

@dataclass(frozen=True, slots=True)
class Found:
    """The commit a canary analyses, the Flux object whose revision names it, and the
    workload it applied."""

    sha: str
    owner: FluxObject
    source: FluxObject | None
    workload: FluxObject


@dataclass(frozen=True, slots=True)
class Unknown:
    """Why a canary's commit cannot be told."""

    reason: str


def analysed_commit(canary: FluxObject, lookup: Lookup, source_of: Lookup,
                    applied: AppliedCommit) -> Found | Unknown:
    """The commit a canary analyses: its target's owner's last applied commit.

    `lookup` reads the cache; `source_of(owner)` gives the owner's source object;
    `applied(owner, source)` the commit the owner last applied (`decisions.applied_commit`).
    """
    label = f"Canary {canary.namespace}/{canary.name}"
    target = target_of(canary)
    if target is None:
        return Unknown(f"{label}: spec.targetRef names no Deployment or DaemonSet")
    workload = lookup(target)
    if workload is None:
        return Unknown(f"{label}: its target {target} is not in the cache")
    owner_key = owner_of(workload)
    if owner_key is None:
        return Unknown(f"{label}: its target {target} has no kustomize.toolkit.fluxcd.io or "
                       "helm.toolkit.fluxcd.io name/namespace labels, so no Flux object "
                       "applied it")
    owner = lookup(owner_key)
    if owner is None or owner.kind not in CONSUMER_KINDS:
        return Unknown(f"{label}: {owner_key}, which applied its target, is not in the cache")
    source = source_of(owner_key)
    sha = applied(owner, source)
    if not sha:
        return Unknown(f"{label}: the last applied revision of {owner_key} names no commit")
    return Found(sha, owner, source, workload)


def applied_at(owner: FluxObject) -> float | None:
    """When the owner last became Ready (applied what it names); None if it does not say."""
    ready = owner.condition("Ready") or {}
    if ready.get("status") != "True":
        return None
    return epoch_seconds(ready.get("lastTransitionTime"))


def decided_since(canary: FluxObject, at: float | None) -> bool:
    """Has Flagger changed the canary's phase since `at` (an apply)? Times are whole seconds,
    a stamp S meaning some time in [S, S + 1): a change in the apply's second may be from
    before it, so only a later second counts. No time: the phase is taken as it is."""
    return at is None or phase_set_after(canary, int(at) + 1)


def decided_for(canary: FluxObject, owner: FluxObject) -> bool:
    """Has Flagger changed the canary's phase since its owner last became Ready (applied)?"""
    return decided_since(canary, applied_at(owner))


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def progress_words(canary: FluxObject) -> str:
    """`canary 30%, check 3/10` (weights), `check 3/10` (blue/green, A/B: iterations)."""
    status = canary.status
    analysis = canary.spec.get("analysis")
    analysis = analysis if isinstance(analysis, dict) else {}
    weight, iteration = _int(status.get("canaryWeight")), _int(status.get("iterations"))
    iterations = _int(analysis.get("iterations"))
    if iterations:
        words = f"check {iteration}/{iterations}"
        if weight:
            words = f"canary {weight}%, {words}"
    else:
        step, top = _int(analysis.get("stepWeight")), _int(analysis.get("maxWeight")) or 100
        listed = analysis.get("stepWeights")
        steps = [s for s in listed if isinstance(s, int)] if isinstance(listed, list) else []
        if steps:
            total, done = len(steps), sum(1 for s in steps if s <= weight)
        elif step:
            total, done = math.ceil(top / step), math.ceil(weight / step)
        else:
            total, done = 0, 0
        words = f"canary {weight}%" + (f", check {done}/{total}" if total else "")
    failed = _int(status.get("failedChecks"))
    threshold = _int(analysis.get("threshold"))
    if failed:
        words += f", {failed} failed" + (f" of {threshold} allowed" if threshold else "")
    return words


@dataclass(frozen=True, slots=True)
class Verdict:
    state: str
    description: str


def canary_verdict(canary: FluxObject, failed_check: str = "") -> Verdict | None:
    """What a canary's phase says about the commit it analyses; None for no status.

    `failed_check`: the check Flagger reported failing (its event), if the shell knows it."""
    phase = canary.status.get("phase")
    if phase == PROGRESSING:
        return Verdict(PENDING, truncate(progress_words(canary)))
    if phase == WAITING_PROMOTION:
        return Verdict(PENDING, "Canary analysis passed, waiting for promotion")
    if phase in ("Promoting", "Finalising"):
        return Verdict(PENDING, "Canary passed, promoting")
    if phase == SUCCEEDED:
        return Verdict(SUCCESS, "Canary promoted")
    if phase == "Initialized":
        return Verdict(SUCCESS, "Canary initialized: first version promoted without analysis")
    if phase == FAILED:
        why = f"rolled back: {failed_check}" if failed_check else \
            "rolled back: canary analysis failed"
        return Verdict(FAILURE, truncate(f"Canary {why}"))
    if phase == "Initializing":
        return Verdict(PENDING, "Canary initializing")
    if phase == "Waiting":
        return Verdict(PENDING, "Canary waiting for its rollout to be confirmed")
    return None


WAITING_FOR_FLAGGER = Verdict(PENDING, "Canary waiting for Flagger to start the analysis")


def rests_on_workload(canary: FluxObject, workload: FluxObject, at: float | None) -> bool:
    """Would the verdict rest on the workload alone (the apply at `at` left it as Flagger last
    saw it)? Then the cached workload must be the cluster's, read after that apply: a watch
    that lags would otherwise give an earlier release's verdict to this commit."""
    return not decided_since(canary, at) and workload_seen(canary, workload)


def commit_verdict(canary: FluxObject, workload: FluxObject, at: float | None,
                   failed_check: str = "", *, workload_current: bool = True) -> Verdict | None:
    """What the canary says about the commit its owner applied at `at` (`applied_at`; None
    when not known): its phase's verdict once Flagger changed the phase after that apply, or
    after the workload's last change (the apply changed nothing Flagger analyses) provided the
    cached workload is known to be the cluster's (`workload_current`); `pending` until then.
    None for no status (a canary going away)."""
    if canary.status.get("phase") in GONE_PHASES:
        return None
    if decided_since(canary, at) or (workload_current and workload_seen(canary, workload)):
        return canary_verdict(canary, failed_check) or WAITING_FOR_FLAGGER
    return WAITING_FOR_FLAGGER


def waits_for_flagger(cached_sha: str | None, cached_at: float | None, applied_sha: str,
                      event_at: float | None) -> bool:
    """A Flux event says the canary's owner applied `applied_sha` at `event_at`; the cache
    names `cached_sha` (None: cannot tell) as its last applied commit, applied at `cached_at`
    (`applied_at`). Post `pending` on the applied commit at once, before the cache has seen
    that apply? Not once it has (`commit_verdict` decides then: the apply may have left the
    workload as it was), nor for an event older than the apply the cache shows (a late or
    redelivered event: its commit's status is settled)."""
    if cached_sha == applied_sha:
        return False
    return cached_at is None or event_at is None or event_at >= int(cached_at)


def canary_context(template: str, cluster: str, canary: FluxObject, lower: bool = False) -> str:
    context = render(template, {"cluster": cluster, "namespace": canary.namespace,
                                "name": canary.name})
    return context.lower() if lower else context


# Flagger's event messages that name a failing check (`eventMessage` of its `event` webhook),
# each with how to name it: a group `check`, or a fixed name.
_CHECK_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^Halt \S+ advancement (?:external|pre-rollout) check (?P<check>\S+) failed"), ""),
    (re.compile(r"^Halt advancement no values found for \S+ metric (?P<check>\S+)"), ""),
    (re.compile(r"^Halt advancement no values found for (?:custom )?metric: (?P<check>[^:\s]+)"),
     ""),
    (re.compile(r"^Halt \S+ advancement (?P<check>(?!waiting )[^<>]+?) \S+ [<>] "), ""),
    (re.compile(r"^Rolling back \S+ progress deadline exceeded"), "progress deadline exceeded"),
    (re.compile(r"^Rolling back \S+ manual webhook invoked"), "rollback webhook"),
)


def failed_check(message: str) -> str | None:
    """The check a Flagger event message says failed (a webhook's or a metric's name, the
    progress deadline, a rollback webhook), or None if it names none."""
    text = message[:2000]
    for pattern, fixed in _CHECK_PATTERNS:
        match = pattern.search(text)
        if match is not None:
            return fixed or match.group("check")
    return None


# -- Flagger's webhook calls ------------------------------------------------------------------

WEBHOOK_BODY_LIMIT = 64 * 1024  # Flagger's payload is a few hundred bytes
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class WebhookError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class WebhookCall:
    """What Flagger POSTs to a webhook: the canary, its phase, and the webhook's `metadata`
    (plus `eventMessage` and `eventType` for an `event` webhook)."""

    name: str
    namespace: str
    phase: str
    metadata: dict[str, str]


def parse_webhook(body: bytes) -> WebhookCall:
    """The call, or WebhookError saying what is wrong with it (the body is at most
    `WEBHOOK_BODY_LIMIT`: the shell checks before reading)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise WebhookError("body is not JSON") from None
    if not isinstance(doc, dict):
        raise WebhookError("body is not a JSON object")
    name, namespace = doc.get("name"), doc.get("namespace")
    if not isinstance(name, str) or not _NAME.match(name):
        raise WebhookError("name must be a Kubernetes object name")
    if not isinstance(namespace, str) or not _NAME.match(namespace):
        raise WebhookError("namespace must be a Kubernetes namespace name")
    phase = doc.get("phase", "")
    metadata = doc.get("metadata") or {}
    if not isinstance(phase, str) or not isinstance(metadata, dict) or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WebhookError("phase must be a string and metadata a map of strings")
    return WebhookCall(name, namespace, phase, dict(metadata))


def token_matches(call: WebhookCall, token: str | None) -> bool:
    """Does the call carry the configured token in `metadata.token`? Constant time; no
    configured token matches nothing."""
    given = call.metadata.get("token", "")
    if not token or not given:
        return False
    return hmac.compare_digest(given.encode(), token.encode())
