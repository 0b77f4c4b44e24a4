"""Statuses from the push side: `pending` when a push is routed, the outcome when a delivery
target finishes. This is what closes the loop when no Flux Provider points at the bridge."""

from __future__ import annotations

import logging

from receiver.bounded import BoundedMap
from receiver.config import Settings
from receiver.delivery.package import package_commit
from receiver.delivery.store import Delivery
from receiver.flux.objects import CONSUMER_KINDS, FluxObject, ObjectKey
from receiver.flux.revisions import FAILED, FINAL_STATES, READY, TIMED_OUT, progress_at
from receiver.gitea.payloads import Push
from receiver.metrics import NO_INSTANCE, Metrics
from receiver.status.decisions import (
    DesiredStatus,
    desired_after_timeout,
    desired_from_object,
    outcome_to_post,
    pending_for_push,
)
from receiver.status.locator import Locator
from receiver.status.queue import StatusQueue
from receiver.templates import StatusTemplates

log = logging.getLogger("receiver.status_service")


class DeliverySignals:
    def __init__(self, settings: Settings, templates: StatusTemplates, locator: Locator,
                 queue: StatusQueue, metrics: Metrics, memory_size: int) -> None:
        self._settings = settings
        self._templates = templates
        self._locator = locator
        self._queue = queue
        self._metrics = metrics
        # Package deliveries: (delivery, consumer) -> the commit its pending was queued for.
        self._pending_sent: BoundedMap[tuple[str, ObjectKey], str] = BoundedMap(memory_size)

    def _active(self) -> bool:
        return self._queue.accepting and bool(self._settings.gitea)

    def on_push_routed(self, delivery: Delivery, push: Push) -> None:
        """`pending` on the pushed commit for every consumer the push touches."""
        if not push.sha or not self._active():
            return
        wanted: list[DesiredStatus] = []
        for target in delivery.plan.tracked:
            obj, source = self._locator.object_and_source(target.key)
            # Already deployed at this commit (a re-push, a replayed hook): pending would
            # stay, since Flux has nothing new to do.
            if obj is None or progress_at(obj, push.sha).state == READY:
                continue
            desired = pending_for_push(obj, source, push.sha, self._templates,
                                       self._locator.normalise)
            if desired is not None:
                wanted.append(desired)
        if wanted and self._queue.enqueue(wanted, state_only=False) is None:
            self._metrics.statuses.labels(NO_INSTANCE, "failed").inc(len(wanted))
            log.warning("status queue full: pending statuses of a push dropped",
                        extra={"delivery": delivery.id, "statuses": len(wanted)})

    def on_target_changed(self, delivery: Delivery, key: ObjectKey, state: str) -> None:
        """A tracked consumer finished for the pushed commit: post its outcome.

        This ends the `pending` of a commit Flux never deployed too (timed out or superseded:
        skipped or error). A package push names no commit: the one its artifact names is found
        once the source has the artifact, and gets `pending` then (`_package_pending`).
        """
        if key.kind not in CONSUMER_KINDS or not self._active():
            return
        if delivery.sha:
            target = delivery.view.get(key)
            posted = outcome_to_post(state, target.reason if target is not None else "")
            if posted is None:
                return  # its pending went out when the push was routed
            state = posted
        obj, source = self._locator.object_and_source(key)
        if obj is None:
            return
        if delivery.sha:
            self._post_outcome(obj, source, delivery.sha, state)
            return
        sha = package_commit(delivery.record, source)
        pended = self._pending_sent.get((delivery.id, key))
        if pended is not None and pended != sha and (sha is not None or state in FINAL_STATES):
            # The source moved on (the tag re-pushed, or another tag) before this commit was
            # deployed: end its pending as a timed-out push's (skipped if Flux deployed another).
            self._post_outcome(obj, source, pended, TIMED_OUT)
            del self._pending_sent[(delivery.id, key)]
        if sha is None:
            return
        if state in FINAL_STATES:
            self._post_outcome(obj, source, sha, state)
        else:
            self._package_pending(delivery, obj, source, sha)

    def _post_outcome(self, obj: FluxObject, source: FluxObject | None, sha: str,
                      state: str) -> None:
        normalise = self._locator.normalise
        if state == TIMED_OUT:
            desired = desired_after_timeout(obj, source, sha, self._templates, normalise)
        elif state in (READY, FAILED):
            desired = desired_from_object(obj, source, self._templates, normalise)
        else:
            return
        if desired is not None and desired.sha == sha:
            self._queue.enqueue([desired], state_only=True)

    def _package_pending(self, delivery: Delivery, obj: FluxObject, source: FluxObject | None,
                         sha: str) -> None:
        """`pending` once per consumer of a package delivery, when its commit is known: the
        package push's counterpart of `on_push_routed`."""
        key = (delivery.id, obj.key)
        if self._pending_sent.get(key) == sha:
            return
        desired = pending_for_push(obj, source, sha, self._templates, self._locator.normalise)
        if desired is None or self._queue.enqueue([desired], state_only=False) is None:
            return
        self._pending_sent[key] = sha
