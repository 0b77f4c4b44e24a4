"""Event-derived `pending` statuses this replica queued for consumers, followed until the
consumer's live state moves past them at that commit; then the live state is queued after
them (`decisions.settles`).

Flux reports a run's progress and its outcome milliseconds apart, and behind a Service the two
events reach different replicas: without this, the replica holding the `pending` could post
it after the other one posted the outcome, and Gitea would show `pending` on a commit that is
deployed until the next resync. Both orders are covered: the outcome already in the watch
cache when the event arrives (the `pending` is replaced before it is posted), and the watch
seeing it later (the live status is queued behind the `pending`, the queue keeps their order
per commit and context).
"""

from __future__ import annotations

from receiver.bounded import BoundedMap
from receiver.flux.objects import CONSUMER_KINDS, FluxObject, ObjectKey
from receiver.status.decisions import DesiredStatus, desired_from_object, settles
from receiver.status.descriptions import PENDING
from receiver.status.locator import Locator
from receiver.status.queue import StatusQueue
from receiver.templates import StatusTemplates

StatusKey = tuple[str, str, str]  # DesiredStatus.key: (repository key, commit, context)


class PendingEvents:
    memory_size = 10_000  # objects followed; the oldest are forgotten first

    def __init__(self, locator: Locator, templates: StatusTemplates, queue: StatusQueue
                 ) -> None:
        self._locator = locator
        self._templates = templates
        self._queue = queue
        self._open: BoundedMap[ObjectKey, dict[StatusKey, DesiredStatus]] = BoundedMap(
            self.memory_size)

    def on_event(self, key: ObjectKey, status: DesiredStatus) -> None:
        """An event's status was queued for `key`: follow it if it is a consumer's pending."""
        if status.state != PENDING or key.kind not in CONSUMER_KINDS:
            return
        self._open.setdefault(key, {})[status.key] = status
        self._check(key)

    def on_store_change(self, action: str, obj: FluxObject) -> None:
        if obj.key not in self._open:
            return
        if action == "delete":
            self._open.pop(obj.key, None)
            return
        self._check(obj.key)

    def _check(self, key: ObjectKey) -> None:
        waiting = self._open.get(key)
        obj, source = self._locator.object_and_source(key)
        if waiting is None or obj is None:
            return
        live = desired_from_object(obj, source, self._templates, self._locator.normalise)
        settled = [k for k, pending in waiting.items() if settles(pending, live) is not None]
        for done in settled:
            del waiting[done]
        if not waiting:
            self._open.pop(key, None)
        if settled and live is not None:
            self._queue.enqueue([live], state_only=True)
