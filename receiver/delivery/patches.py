"""Annotation patches: at most two per object per coalescing window, with the delivery marks.

Each patch writes `reconcile.fluxcd.io/requestedAt` and the bridge's delivery marks together,
conditional on the object's resourceVersion: a mark already on the object (another replica
annotated for the same request, or a replay) is never written, nor `requestedAt` with it, again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from receiver.config import ReconcileConfig
from receiver.delivery import marks as delivery_marks
from receiver.delivery.marks import DELIVERIES_ANNOTATION, Mark
from receiver.flux.cluster import Cluster, ClusterError, NotFound
from receiver.flux.objects import RECONCILE_ANNOTATION, ObjectKey
from receiver.metrics import Metrics
from receiver.retry import backoff_delay

log = logging.getLogger("receiver.delivery.reconcile")


def request_value(now: datetime | None = None) -> str:
    """A `requestedAt` value: RFC 3339 with nanoseconds, as the flux CLI writes it."""
    now = now or datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


@dataclass
class PatchOutcome:
    ok: bool
    error: str = ""
    status: int = 0
    already: bool = False  # another replica had written every mark already: nothing sent
    refused: frozenset[str] = frozenset()  # marks not written (`delivery_marks.merge`)
    refusal: str = ""


@dataclass
class _KeyState:
    last_sent: float = -1e9
    trailing: asyncio.Future[PatchOutcome] | None = None
    marks: dict[str, Mark] = field(default_factory=dict)  # waiting for the trailing patch


class PatchCoalescer:
    """At most two patches per object per window: one at once, one trailing for the rest.

    Each patch writes `requestedAt` and the bridge's delivery marks together, conditional on
    the object's resourceVersion: a mark already on the object (another replica annotated for
    the same request, or a replay) is never written, nor `requestedAt` with it, again.
    """

    def __init__(
        self, cluster: Cluster, config: ReconcileConfig, metrics: Metrics, keep_marks_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cluster = cluster
        self._config = config
        self._metrics = metrics
        self._keep_marks = keep_marks_seconds
        self._clock = clock
        self._keys: dict[ObjectKey, _KeyState] = {}
        self._sending = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def idle(self) -> bool:
        """No patch in flight and none waiting for its window."""
        return self._sending == 0 and all(s.trailing is None for s in self._keys.values())

    def request(self, key: ObjectKey, mark: Mark) -> tuple[asyncio.Future[PatchOutcome], bool]:
        """Ask for a patch; returns (its outcome, whether it is being sent right now)."""
        outcome, waiter = self.request_waitable(key, mark)
        return outcome, waiter is not None

    def request_waitable(self, key: ObjectKey, mark: Mark
                         ) -> tuple[asyncio.Future[PatchOutcome], asyncio.Future[None] | None]:
        """Ask for a patch; returns its outcome and, when it is sent right now, a future done
        in the same step as the outcome, for a request to wait on (with a time limit: it may
        be cancelled, the outcome never is). A waiter of the outcome itself would resume one
        turn of the event loop later (its callbacks run a turn after it is set): under load
        a turn is every connection's request, tens of milliseconds."""
        loop = asyncio.get_running_loop()
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
        now = self._clock()
        window = self._config.coalesce_window_seconds
        if state.trailing is None and now - state.last_sent >= window:
            state.last_sent = now
            outcome: asyncio.Future[PatchOutcome] = loop.create_future()
            waiter: asyncio.Future[None] = loop.create_future()
            task = loop.create_task(self._send_into(key, [mark], outcome, waiter))
            self._tasks.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._tasks.discard)
            return outcome, waiter
        self._metrics.patches_coalesced.inc()
        if state.trailing is None:
            state.trailing = loop.create_future()
            delay = max(0.0, state.last_sent + window - now)
            loop.call_later(delay, self._flush_trailing, key)
        state.marks[mark.mark] = mark
        return state.trailing, None

    async def _send_into(self, key: ObjectKey, marks: list[Mark],
                         outcome: asyncio.Future[PatchOutcome], waiter: asyncio.Future[None]
                         ) -> None:
        try:
            result = await self._send(key, marks)
        except asyncio.CancelledError:
            outcome.cancel()
            raise
        except Exception as exc:
            outcome.set_exception(exc)
        else:
            outcome.set_result(result)
        finally:
            if not waiter.done():
                waiter.set_result(None)

    def _flush_trailing(self, key: ObjectKey) -> None:
        state = self._keys[key]
        future, state.trailing = state.trailing, None
        marks, state.marks = list(state.marks.values()), {}
        state.last_sent = self._clock()
        if future is None:
            return
        task = asyncio.ensure_future(self._send(key, marks))

        def _done(t: asyncio.Task[PatchOutcome]) -> None:
            if not future.done():
                future.set_result(t.result())

        task.add_done_callback(_done)
        if not state.marks and len(self._keys) > 50_000:
            self._keys.pop(key, None)

    async def _send(self, key: ObjectKey, marks: list[Mark]) -> PatchOutcome:
        self._sending += 1
        try:
            return await self._send_once(key, marks)
        finally:
            self._sending -= 1

    async def _send_once(self, key: ObjectKey, marks: list[Mark]) -> PatchOutcome:
        attempts = self._config.patch_attempts
        obj = self._cluster.store.get(key)
        for attempt in range(1, attempts + 1):
            try:
                if obj is None:
                    obj = await self._cluster.read_object(key)
                    if obj is None:
                        raise NotFound(f"{key} not found")
                # A mark the object holds already (another replica's patch for the same
                # request, or a replay) is neither written nor refused.
                merge = delivery_marks.merge(obj.annotations, marks, time.time(),
                                             self._keep_marks)
                if not merge.written and not merge.refused:
                    return PatchOutcome(True, already=True)
                refused = frozenset(m.mark for m in merge.refused)
                if refused:
                    self._metrics.annotate_errors.labels(key.kind, "marks_full").inc()
                    log.warning("delivery marks refused: the object's marks are full",
                                extra={"object": str(key), "refused": len(refused)})
                outcome = PatchOutcome(True, refused=refused, refusal=(
                    delivery_marks.refusal(self._keep_marks) if refused else ""))
                if not merge.written:
                    return outcome
                await self._cluster.annotate(
                    key, {RECONCILE_ANNOTATION: request_value(), DELIVERIES_ANNOTATION: merge.value},
                    resource_version=obj.resource_version or None)
            except ClusterError as exc:
                if exc.status == 409 and attempt < attempts:
                    # Someone changed the object since our cache saw it (Flux's status, or
                    # another replica's patch): read it again and decide again.
                    obj = None
                    continue
                if exc.retryable and attempt < attempts:
                    await asyncio.sleep(backoff_delay(attempt, 0.2, 5.0))
                    obj = None
                    continue
                self._metrics.annotate_errors.labels(key.kind, str(exc.status or "error")).inc()
                return PatchOutcome(False, error=str(exc), status=exc.status)
            self._metrics.targets_annotated.labels(key.kind).inc()
            return outcome
        return PatchOutcome(False, error="no attempt made")  # unreachable with attempts >= 1


