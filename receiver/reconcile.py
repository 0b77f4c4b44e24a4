"""Annotate in Flux's `--with-source` order, coalesce bursts, retry, and follow each delivery.

The decisions (what to annotate, what "done" means) live in `routing` and `flux.revisions`;
this module is the shell that acts on them: it sends patches, listens to cache changes, and
moves each delivery's targets through queued -> annotated -> reconciling -> ready | failed |
timed out.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from receiver.config import ReconcileConfig
from receiver.deliveries import ROLE_ANNOTATE, Delivery, DeliveryStore
from receiver.flux.cluster import Cluster, ClusterError
from receiver.flux.objects import RECONCILE_ANNOTATION, FluxObject, ObjectKey, consumer_source
from receiver.flux.revisions import (
    ANNOTATED,
    FAILED,
    FINAL_STATES,
    QUEUED,
    READY,
    RECONCILING,
    SKIPPED,
    TIMED_OUT,
    attempted_revision,
    followable,
    progress_at,
    same_commit,
)
from receiver.metrics import Metrics
from receiver.routing import PHASE_SOURCE

log = logging.getLogger(__name__)


def request_value(delivery_id: str, now: datetime | None = None) -> str:
    """A `requestedAt` value unique to the delivery: RFC 3339 nano time, as the flux CLI, + id."""
    now = now or datetime.now(UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"
    return f"{stamp} {delivery_id}"


@dataclass
class PatchOutcome:
    ok: bool
    value: str = ""
    error: str = ""
    status: int = 0


@dataclass
class _KeyState:
    last_sent: float = -1e9
    trailing: asyncio.Future[PatchOutcome] | None = None
    trailing_delivery: str = ""
    deliveries: list[str] = field(default_factory=list)


class PatchCoalescer:
    """At most two patches per object per window: one at once, one trailing for the rest."""

    def __init__(
        self, cluster: Cluster, config: ReconcileConfig, metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cluster = cluster
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._keys: dict[ObjectKey, _KeyState] = {}

    def request(self, key: ObjectKey, delivery_id: str) -> tuple[asyncio.Future[PatchOutcome], bool]:
        """Ask for a patch; returns (its outcome, whether it is being sent right now)."""
        loop = asyncio.get_running_loop()
        state = self._keys.setdefault(key, _KeyState())
        now = self._clock()
        window = self._config.coalesce_window_seconds
        if state.trailing is None and now - state.last_sent >= window:
            state.last_sent = now
            return asyncio.ensure_future(self._send(key, delivery_id)), True
        self._metrics.patches_coalesced.inc()
        if state.trailing is None:
            state.trailing = loop.create_future()
            delay = max(0.0, state.last_sent + window - now)
            loop.call_later(delay, self._flush_trailing, key)
        state.trailing_delivery = delivery_id
        return state.trailing, False

    def _flush_trailing(self, key: ObjectKey) -> None:
        state = self._keys[key]
        future, state.trailing = state.trailing, None
        state.last_sent = self._clock()
        if future is None:
            return
        task = asyncio.ensure_future(self._send(key, state.trailing_delivery))

        def _done(t: asyncio.Task[PatchOutcome]) -> None:
            if not future.done():
                future.set_result(t.result())

        task.add_done_callback(_done)

    async def _send(self, key: ObjectKey, delivery_id: str) -> PatchOutcome:
        value = request_value(delivery_id)
        attempts = self._config.patch_attempts
        for attempt in range(1, attempts + 1):
            try:
                await self._cluster.annotate(key, {RECONCILE_ANNOTATION: value})
            except ClusterError as exc:
                if exc.retryable and attempt < attempts:
                    await asyncio.sleep(min(5.0, 0.1 * 2**attempt) * (0.5 + random.random()))  # noqa: S311
                    continue
                self._metrics.annotate_errors.labels(key.kind, str(exc.status or "error")).inc()
                return PatchOutcome(False, error=str(exc), status=exc.status)
            self._metrics.targets_annotated.labels(key.kind).inc()
            return PatchOutcome(True, value=value)
        return PatchOutcome(False, error="no attempt made")  # unreachable with attempts >= 1


DeliveryListener = Callable[[Delivery, ObjectKey, str], None]


class Reconciler:
    def __init__(
        self,
        cluster: Cluster,
        deliveries: DeliveryStore,
        config: ReconcileConfig,
        metrics: Metrics,
        cluster_name: str,
    ) -> None:
        self._cluster = cluster
        self._deliveries = deliveries
        self._config = config
        self._metrics = metrics
        self._cluster_name = cluster_name
        self.patches = PatchCoalescer(cluster, config, metrics)
        self._watching: dict[ObjectKey, set[str]] = defaultdict(set)
        self._watched_by: dict[str, set[ObjectKey]] = {}
        self._last_seen: dict[ObjectKey, tuple[Any, ...]] = {}
        self._tokens: dict[tuple[str, ObjectKey], str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._patching: set[tuple[str, ObjectKey]] = set()  # (delivery, consumer) in flight
        self._grace: dict[tuple[str, ObjectKey], float] = {}  # (delivery, consumer) -> until
        self._deadlines: list[tuple[float, int, str]] = []  # (due, phase, delivery id)
        self._sweeper: asyncio.Task[None] | None = None
        self.listeners: list[DeliveryListener] = []
        cluster.store.subscribe(self._on_change)

    # -- entry point -----------------------------------------------------------------------

    async def start_delivery(self, delivery: Delivery, wait_seconds: float = 3.0) -> None:
        """Register a delivery, send its source patches, and wait briefly for the ones sent now.

        Consumers are annotated later, when their source reports the pushed commit.
        """
        for evicted in self._deliveries.add(delivery):
            # Past the store's count or age bound: Flux still gets the patches already sent,
            # but nobody can follow this delivery any more. Counted, never silent.
            if not evicted.final:
                self._metrics.deliveries.labels("evicted").inc()
                self._forget(evicted)
        if delivery.final:  # nothing to do or follow
            self._finish(delivery)
            return
        watched = set(delivery.targets)
        for key in delivery.targets:
            obj = self._cluster.store.get(key)
            src = consumer_source(obj) if obj is not None else None
            if src is not None:
                watched.add(src.key)
        self._watched_by[delivery.id] = watched
        for key in watched:
            self._watching[key].add(delivery.id)
        immediate: list[asyncio.Future[PatchOutcome]] = []
        for key, target in list(delivery.targets.items()):
            if target.role == ROLE_ANNOTATE and target.target.phase == PHASE_SOURCE:
                future, now = self.patches.request(key, delivery.id)
                self._spawn(self._after_patch(delivery, key, future))
                if now:
                    immediate.append(future)
        # Consumers of a source whose commit is already there need no wait.
        self._spawn(self._evaluate(delivery))
        self._schedule_deadlines(delivery)
        if immediate:
            await asyncio.wait(immediate, timeout=wait_seconds)
            await asyncio.sleep(0)  # let _after_patch record the outcome

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_patch(
        self, delivery: Delivery, key: ObjectKey, future: asyncio.Future[PatchOutcome]
    ) -> None:
        try:
            outcome = await future
        finally:
            self._patching.discard((delivery.id, key))
        if outcome.ok:
            self._tokens[(delivery.id, key)] = outcome.value
            obj = self._cluster.store.get(key)
            if delivery.sha and obj is not None and not followable(obj):
                # Asked to reconcile, but its status will never name the commit.
                await self._set(delivery, key, SKIPPED, "NotFollowed",
                                "annotated; its chart version does not name a commit "
                                "(use reconcileStrategy Revision or the commit annotation)")
            else:
                await self._set(delivery, key, ANNOTATED)
            await self._evaluate(delivery)
        else:
            await self._set(delivery, key, FAILED, "AnnotateFailed", outcome.error)
            await self._evaluate(delivery)

    async def _set(self, delivery: Delivery, key: ObjectKey, state: str, reason: str = "",
                   message: str = "") -> None:
        if await delivery.set_state(key, state, reason, message):
            if state == READY and delivery.targets[key].target.phase != PHASE_SOURCE:
                self._metrics.lead_time.labels(self._cluster_name).observe(
                    time.monotonic() - delivery.received)
            for listener in self.listeners:
                listener(delivery, key, state)
            if delivery.final:
                self._finish(delivery)

    def _finish(self, delivery: Delivery) -> None:
        self._metrics.deliveries.labels(delivery.outcome()).inc()
        self._deliveries.finished(delivery)
        self._forget(delivery)

    def _forget(self, delivery: Delivery) -> None:
        """Stop following a delivery: drop its watches and tokens."""
        for key in self._watched_by.pop(delivery.id, set()):
            ids = self._watching.get(key)
            if ids is not None:
                ids.discard(delivery.id)
                if not ids:
                    del self._watching[key]
                    self._last_seen.pop(key, None)
            self._tokens.pop((delivery.id, key), None)
            self._grace.pop((delivery.id, key), None)

    # -- following progress ----------------------------------------------------------------

    def _on_change(self, op: str, obj: FluxObject) -> None:
        ids = self._watching.get(obj.key)
        if not ids:
            return
        # Our own annotation patches change only metadata: progress cannot have moved, and
        # re-evaluating every delivery that watches a busy source would cost O(deliveries).
        fingerprint = (op, obj.generation, obj.raw.get("status"), obj.suspended)
        if self._last_seen.get(obj.key) == fingerprint:
            return
        self._last_seen[obj.key] = fingerprint
        for id_ in list(ids):
            delivery = self._deliveries.get(id_)
            if delivery is not None:
                self._spawn(self._evaluate(delivery))

    def _progress(self, delivery: Delivery, key: ObjectKey, obj: FluxObject) -> tuple[str, str, str]:
        if delivery.sha:
            p = progress_at(obj, delivery.sha)
            return p.state, p.reason, p.message
        # No commit known (a bare Actions call): done when our request was handled.
        token = self._tokens.get((delivery.id, key))
        if token is None or obj.status.get("lastHandledReconcileAt") != token:
            return RECONCILING, "", ""
        cond = obj.condition("Ready") or {}
        state = {"True": READY, "False": FAILED}.get(str(cond.get("status")), RECONCILING)
        return state, str(cond.get("reason", "")), str(cond.get("message", ""))

    def _source_ready(self, delivery: Delivery, consumer: FluxObject) -> bool | str:
        """Has the consumer's source got the pushed commit? A state string: it never will."""
        src_ref = consumer_source(consumer)
        src = self._cluster.store.get(src_ref.key) if src_ref else None
        if src is None:
            return False
        mine = delivery.targets.get(src.key)
        if mine is not None and mine.state in (FAILED, TIMED_OUT):
            return mine.state
        if not delivery.sha:
            return mine is None or mine.state == READY
        return progress_at(src, delivery.sha).state == READY

    async def _evaluate(self, delivery: Delivery) -> None:
        store = self._cluster.store
        for key, target in list(delivery.targets.items()):
            if target.state in FINAL_STATES:
                continue
            obj = store.get(key)
            if obj is None:
                await self._set(delivery, key, FAILED, "NotFound", "object was deleted")
                continue
            is_source = target.target.phase == PHASE_SOURCE
            if not is_source and target.role == ROLE_ANNOTATE and target.state == QUEUED:
                ready = self._source_ready(delivery, obj)
                if isinstance(ready, str):
                    reason = "SourceTimeout" if ready == TIMED_OUT else "SourceFailed"
                    await self._set(delivery, key, ready, reason,
                                    "its source did not get the pushed commit")
                    continue
                if not ready:
                    continue
                if delivery.sha and same_commit(attempted_revision(obj), delivery.sha):
                    # Flux already started on this commit by itself: annotating is redundant.
                    self._grace.pop((delivery.id, key), None)
                    await self._set(delivery, key, RECONCILING, "AlreadyStarted", "")
                elif delivery.sha and self._in_grace(delivery, key):
                    # kustomize-controller reacts to a new artifact by itself; give it a
                    # moment so our annotation does not cause a second reconcile of the commit.
                    continue
                else:
                    # Once per delivery: evaluations that run while the patch is in flight
                    # (the source's status event, our own patch's store update) must not
                    # queue a second, trailing patch with a new requestedAt.
                    if (delivery.id, key) not in self._patching:
                        self._patching.add((delivery.id, key))
                        future, _ = self.patches.request(key, delivery.id)
                        self._spawn(self._after_patch(delivery, key, future))
                    continue
            if target.state == QUEUED and is_source:
                continue  # its patch is still on the way
            state, reason, message = self._progress(delivery, key, obj)
            if state == RECONCILING and target.state == ANNOTATED and not reason:
                continue
            await self._set(delivery, key, state, reason, message)

    def _in_grace(self, delivery: Delivery, key: ObjectKey) -> bool:
        """True while a consumer whose source is ready is left to start on its own."""
        grace = self._config.consumer_grace_seconds
        if grace <= 0:
            return False
        now = time.monotonic()
        due = self._grace.get((delivery.id, key))
        if due is None:
            self._grace[(delivery.id, key)] = now + grace
            asyncio.get_running_loop().call_later(
                grace, lambda: self._spawn(self._evaluate(delivery)))
            return True
        if now < due:
            return True
        del self._grace[(delivery.id, key)]
        return False

    # -- deadlines: one sweeper for all deliveries, not one sleeping task each ---------------

    def _schedule_deadlines(self, delivery: Delivery) -> None:
        now = time.monotonic()
        if len(self._deadlines) > 4 * len(self._watched_by) + 1000:
            # Most entries belong to deliveries already finished or evicted: drop them.
            self._deadlines = [d for d in self._deadlines if d[2] in self._watched_by]
            heapq.heapify(self._deadlines)
        heapq.heappush(self._deadlines, (now + self._config.source_timeout_seconds, 0,
                                         delivery.id))
        heapq.heappush(self._deadlines, (now + self._config.consumer_timeout_seconds, 1,
                                         delivery.id))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        while self._deadlines:
            due, phase, id_ = self._deadlines[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(min(wait, 1.0))
                continue
            heapq.heappop(self._deadlines)
            delivery = self._deliveries.get(id_)
            if delivery is not None and id_ in self._watched_by and not delivery.final:
                await self._expire(delivery, phase)

    async def _expire(self, delivery: Delivery, phase: int) -> None:
        if phase == 0:
            for key, target in list(delivery.targets.items()):
                if target.target.phase == PHASE_SOURCE and target.state not in FINAL_STATES:
                    await self._set(delivery, key, TIMED_OUT, "SourceTimeout",
                                    f"no pushed commit after {self._config.source_timeout_seconds:g}s")
            await self._evaluate(delivery)
            return
        for key, target in list(delivery.targets.items()):
            if target.state not in FINAL_STATES:
                await self._set(delivery, key, TIMED_OUT, "Timeout",
                                f"not ready after {self._config.consumer_timeout_seconds:g}s")

    async def stop(self) -> None:
        pending: list[asyncio.Future[None]] = list(self._tasks)
        if self._sweeper is not None:
            pending.append(self._sweeper)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
