"""A delivery that waits for its canaries too (`GET /deliveries/{id}?canaries=true`). Pure.

Flux applying the manifests is not the end of a release run by Flagger: the canary is analysed
after, and is promoted or rolled back minutes later. Asked to, the delivery view adds one target
per Canary whose workload was applied by one of the delivery's Kustomizations or HelmReleases
(`flux.canary.owner_of`), role `canary`:

- while its consumer is not Ready at the commit: `queued` (or `skipped`, when the consumer
  ended another way: its failure or time-out is the delivery's outcome already);
- once it is: `reconciling` while Flagger analyses, waits for promotion or promotes; `ready`
  when promoted, `failed` when rolled back; a phase not set surely after the deploy (after the
  push and after the consumer's Ready transition, `decided_after`: a stamp in the same second
  is not surely after) is Flagger not having noticed yet, so it waits.
  It waits without limit when the deploy changed the workload (a Flux field manager's time on
  it is not older than the phase, `flux.canary.workload_seen`) or the cache cannot tell: only
  Flagger's decision ends that wait. A commit that left the workload as it was starts no
  analysis; after `pickup_seconds` (room for the workload's watch to lag the consumer's) the
  canary's standing phase is its outcome (a canary still rolled back fails it).

A canary whose workload the cache does not hold counts for the Kustomization or HelmRelease
that applied the Canary itself, and waits for a phase newer than the deploy. Before a wait ends
on a canary's verdict, the shell reads the canary and its workload again from the API server
(`canary_verdicts`, `unconfirmed`): a cache behind the cluster never ends a wait.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from receiver.delivery.record import DeliveryRecord
from receiver.delivery.view import DeliveryView, Lookup, TargetView
from receiver.flux.canary import (
    FAILED,
    PHASES,
    SUCCEEDED,
    owner_of,
    phase_set_after,
    target_of,
    workload_seen,
)
from receiver.flux.objects import CONSUMER_KINDS, FluxObject, ObjectKey
from receiver.flux.revisions import FAILED as FAILED_STATE
from receiver.flux.revisions import FINAL_STATES, QUEUED, READY, RECONCILING, SKIPPED
from receiver.times import epoch_seconds

CANARY_ROLE = "canary"
PROMOTED_PHASES = frozenset({SUCCEEDED, "Initialized"})
# Phases in which Flagger is still at work on the current revision.
WORKING_PHASES = frozenset(PHASES) - PROMOTED_PHASES - {FAILED, "Terminating", "Terminated"}


def canaries_by_consumer(canaries: Iterable[FluxObject], lookup: Lookup
                         ) -> dict[ObjectKey, list[FluxObject]]:
    """The Canaries whose target workload each consumer applied. A canary whose workload the
    cache does not hold (not yet seen, or gone) counts for the consumer that applied the Canary
    itself, if one did: it is waited for, never left out of the wait unseen."""
    out: dict[ObjectKey, list[FluxObject]] = {}
    for canary in canaries:
        target = target_of(canary)
        if target is None:
            continue  # a target kind the cache does not hold: nothing can be told of it
        workload = lookup(target)
        owner = owner_of(workload if workload is not None else canary)
        if owner is not None:
            out.setdefault(owner, []).append(canary)
    return out


def _progress(canary: FluxObject) -> str:
    status = canary.status
    return (f"{status.get('phase')}: weight {status.get('canaryWeight', 0)}%, iteration "
            f"{status.get('iterations', 0)}, failed checks {status.get('failedChecks', 0)}")


def decided_after(canary: FluxObject, received: float, became_ready: float | None) -> bool:
    """Did Flagger set the canary's phase after the push (`received`, to the millisecond) and
    after its consumer became Ready at the commit (whole seconds)? Kubernetes stamps whole
    seconds, and a stamp S means some time in [S, S + 1): a phase stamped in the push's second,
    or in the second the consumer became Ready, may be from before them, so it does not count.
    (It did once: Flagger's first rollout, stamped in the second a CI job pushed the next
    release, ended that job's wait as "promoted".) `Initialized`, Flagger's first rollout of a
    Canary, answers only a deploy that created the Canary: an older Canary's is about an
    earlier release, whenever Flagger writes it."""
    moment = received if became_ready is None else max(received, int(became_ready) + 1)
    if not phase_set_after(canary, moment):
        return False
    if canary.status.get("phase") == "Initialized":
        created = epoch_seconds(canary.metadata.get("creationTimestamp"))
        return created is not None and created >= received
    return True


def canary_target(canary: FluxObject, consumer: TargetView, consumer_obj: FluxObject | None,
                  received: float, now: float, pickup_seconds: float,
                  workload: FluxObject | None = None) -> TargetView:
    """Where one canary stands for the delivery (module docstring)."""
    key = canary.key
    if consumer.state != READY:
        if consumer.state in FINAL_STATES:
            return TargetView(key, CANARY_ROLE, SKIPPED, "DeployNotReady",
                              f"{consumer.key} ended {consumer.state}")
        return TargetView(key, CANARY_ROLE, QUEUED, "WaitingForDeploy",
                          f"{consumer.key} is not Ready at the commit yet")
    since = received
    ready = consumer_obj.condition("Ready") if consumer_obj is not None else None
    became_ready = epoch_seconds(ready.get("lastTransitionTime")) if ready else None
    if became_ready is not None:
        since = max(since, became_ready)
    phase = str(canary.status.get("phase", ""))
    fresh = decided_after(canary, received, became_ready)
    if phase in WORKING_PHASES:
        return TargetView(key, CANARY_ROLE, RECONCILING, phase, _progress(canary))
    if phase not in PROMOTED_PHASES and phase != FAILED:
        return TargetView(key, CANARY_ROLE, SKIPPED, "CanaryTerminated",
                          f"phase {phase or 'unset'}")
    if not fresh and workload is None:
        return TargetView(key, CANARY_ROLE, RECONCILING, "WaitingForFlagger",
                          f"phase {phase} is from before the deploy and the bridge does not see "
                          "the canary's workload: waiting for Flagger to decide again")
    if not fresh and workload is not None and not workload_seen(canary, workload):
        # The deploy changed the workload (or the cache cannot tell): Flagger owes an analysis
        # of it, however long it takes to start. Never a verdict from an earlier release.
        return TargetView(key, CANARY_ROLE, RECONCILING, "WaitingForFlagger",
                          f"phase {phase} is from before the workload's last change; Flagger "
                          "has not started its analysis yet")
    if not fresh and now < since + pickup_seconds:
        # Flagger's phase is newer than the workload's last change as the cache holds it, but
        # the workload's watch may lag the consumer's: wait a little before trusting that.
        return TargetView(key, CANARY_ROLE, RECONCILING, "WaitingForFlagger",
                          f"phase {phase} is from before the deploy; Flagger has not started "
                          "an analysis yet")
    if phase == FAILED:
        why = "the canary was rolled back" if fresh else \
            "no new analysis started; the canary stays rolled back"
        return TargetView(key, CANARY_ROLE, FAILED_STATE, "RolledBack", why)
    why = "the canary was promoted" if fresh else \
        "no analysis started after the deploy: the workload did not change"
    return TargetView(key, CANARY_ROLE, READY, "Promoted" if fresh else "NoAnalysis", why)


def with_canaries(view: DeliveryView, record: DeliveryRecord, canaries: Iterable[FluxObject],
                  lookup: Lookup, now: float, pickup_seconds: float) -> DeliveryView:
    """The view, plus a `canary` target for every canary of its consumers."""
    owned = canaries_by_consumer(canaries, lookup)
    added: list[TargetView] = []
    for target in view.targets:
        if target.key.kind not in CONSUMER_KINDS:
            continue
        for canary in sorted(owned.get(target.key, ()), key=lambda c: c.key):
            workload_key = target_of(canary)
            added.append(canary_target(canary, target, lookup(target.key), record.received,
                                       now, pickup_seconds,
                                       lookup(workload_key) if workload_key else None))
    return DeliveryView((*view.targets, *added)) if added else view


def _decided(target: TargetView) -> bool:
    return target.role == CANARY_ROLE and target.state in (READY, FAILED_STATE)


def canary_verdicts(view: DeliveryView) -> list[ObjectKey]:
    """The canaries whose verdict (promoted, rolled back, no analysis) the view gives."""
    return [t.key for t in view.targets if _decided(t)]


def unconfirmed(view: DeliveryView, why: str) -> DeliveryView:
    """The view with those verdicts withheld: back to `reconciling`, saying `why`."""
    return DeliveryView(tuple(
        replace(t, state=RECONCILING, reason="Unconfirmed", message=why) if _decided(t) else t
        for t in view.targets))
