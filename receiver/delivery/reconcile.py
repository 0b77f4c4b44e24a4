"""Annotate in Flux's `--with-source` order, coalesce bursts, retry, and follow each delivery.

The decisions (what to annotate, what state a delivery is in) live in `routing` and
`delivery_state`; this module is the shell that acts on them: it sends patches (with the
bridge's delivery marks, conditional on the object's version), listens to cache changes,
re-evaluates each delivery it accepted, and tells listeners (statuses, metrics) what moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from receiver.config import ReconcileConfig
from receiver.delivery import marks as delivery_marks
from receiver.delivery.marks import DELIVERIES_ANNOTATION, Mark
from receiver.delivery.patches import PatchCoalescer, PatchOutcome
from receiver.delivery.record import DeliveryRecord
from receiver.delivery.state import awaited_source, evaluate, source_ready
from receiver.delivery.store import ROLE_ANNOTATE, Delivery, DeliveryStore
from receiver.delivery.view import Contains, DeliveryView, Local, Timeouts, never_known
from receiver.flux.cluster import Cluster
from receiver.flux.objects import (
    SOURCE_KINDS,
    FluxObject,
    ObjectKey,
    consumer_source,
)
from receiver.flux.revisions import FAILED, QUEUED, READY
from receiver.metrics import Metrics

log = logging.getLogger(__name__)
# Longest stretch of delivery evaluations before the loop serves requests again (seconds).
EVALUATION_SLICE = 0.002
# Shortest sleep of the deadline sweeper (seconds); deadlines due within it are swept together.
# Sleeping until each deadline exactly, the sweeper woke several times for one when the next
# was under a millisecond away (uvloop's timers count whole milliseconds and may fire one early):
# 7.7 wakes per push at 550 pushes a second. Not longer: the time-outs of a busy second swept
# in one go hold every request behind them.
SWEEP_EVERY = 0.002


DeliveryListener = Callable[[Delivery, ObjectKey, str], None]


class Reconciler:
    """Acts on the deliveries this replica accepted; what their state is, `evaluate` says."""

    def __init__(
        self,
        cluster: Cluster,
        deliveries: DeliveryStore,
        config: ReconcileConfig,
        metrics: Metrics,
        cluster_name: str,
        keep_marks_seconds: float = 3600.0,
    ) -> None:
        self._cluster = cluster
        self._deliveries = deliveries
        self._config = config
        self._metrics = metrics
        self._cluster_name = cluster_name
        self.timeouts = Timeouts(config.source_timeout_seconds, config.consumer_timeout_seconds)
        self.patches = PatchCoalescer(cluster, config, metrics, keep_marks_seconds)
        self._watching: dict[ObjectKey, set[str]] = defaultdict(set)
        self._watched_by: dict[str, set[ObjectKey]] = {}
        self._last_seen: dict[ObjectKey, tuple[tuple[Any, ...], str | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._requested: set[tuple[str, ObjectKey]] = set()  # (delivery, object) patch asked
        self._grace: dict[tuple[str, ObjectKey], float] = {}  # (delivery, consumer) -> until
        self._deadlines: list[tuple[float, str]] = []  # (due, delivery id)
        self._sweeper: asyncio.Task[None] | None = None
        # Deliveries to evaluate after a change of an object they follow, in arrival order.
        self._dirty: dict[str, None] = {}
        self._evaluator: asyncio.Task[None] | None = None
        self.listeners: list[DeliveryListener] = []
        # Whether a later commit contains a pushed one (`receiver.delivery.ancestry`); set by the app.
        self.contains: Contains = never_known
        cluster.store.subscribe(self._on_change)

    def view(self, record: DeliveryRecord, local: Local | None = None) -> DeliveryView:
        return evaluate(record, self._cluster.store.get, time.time(), self.timeouts, local,
                        self.contains)

    def reevaluate_following(self, key: ObjectKey) -> None:
        """Evaluate again every delivery that follows `key` (an answer about its history)."""
        self._queue_evaluation(tuple(self._watching.get(key, ())))

    # -- entry point -----------------------------------------------------------------------

    async def start_delivery(self, delivery: Delivery, wait_seconds: float = 3.0) -> bool:
        """Register a delivery, send its source patches, and wait briefly for the ones sent now.

        Consumers are annotated later, when their source reports the pushed commit. Returns
        True when every source patch went out at once and found the delivery's mark already on
        its object: another replica took this very request first (this replica's cache had
        not seen the mark yet), so nothing was sent.
        """
        for evicted in self._deliveries.add(delivery):
            # Past the store's count or age bound: this replica stops following it (any
            # replica can still answer for it from its id). Counted, never silent.
            if not evicted.final:
                self._metrics.deliveries.labels("evicted").inc()
                self._forget(evicted)
        watched = set()
        for target in delivery.record.targets:
            watched.add(target.key)
            obj = self._cluster.store.get(target.key)
            src = consumer_source(obj) if obj is not None else None
            if src is not None:
                watched.add(src.key)
        self._watched_by[delivery.id] = watched
        for key in watched:
            self._watching[key].add(delivery.id)
        mark = Mark(delivery.record.mark, delivery.record.received)
        immediate: list[asyncio.Future[PatchOutcome]] = []
        waiters: list[asyncio.Future[None]] = []
        listed = {target.key for target in delivery.record.targets}
        for target in delivery.record.targets:
            if target.role == ROLE_ANNOTATE and self._at_once(target.key, listed):
                self._requested.add((delivery.id, target.key))
                future, waiter = self.patches.request_waitable(target.key, mark)
                self._follow_patch(delivery, target.key, future)
                if waiter is not None:
                    immediate.append(future)
                    waiters.append(waiter)
        self._schedule_deadlines(delivery)
        if waiters:
            # Each waiter is done in the step that sets its patch's outcome; `_patched` has
            # recorded that outcome (its callback runs before this task resumes) by the time
            # `_evaluate` below reads it. Past the time limit only the waiting stops.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_seconds):
                    for waiter in waiters:
                        await waiter
        requested = sum(1 for key in watched if (delivery.id, key) in self._requested)
        taken = (bool(immediate) and len(immediate) == requested
                 and all(f.done() and not f.cancelled() and f.exception() is None
                         and f.result().already for f in immediate))
        if taken:
            self.abandon(delivery)
            return True
        await self._evaluate(delivery)
        return False

    def _at_once(self, key: ObjectKey, listed: set[ObjectKey]) -> bool:
        """Annotated when the push is accepted: a source, or an object that waits for no
        source (an ImageRepository, an input provider), which `_maybe_annotate` would let go
        at the first evaluation anyway; sent now, its patch is waited for with the sources'."""
        if key.kind in SOURCE_KINDS:
            return True
        obj = self._cluster.store.get(key)
        return obj is not None and awaited_source(obj, listed.__contains__) is None

    def abandon(self, delivery: Delivery) -> None:
        """Forget a delivery this replica accepted by mistake (another took it first)."""
        self._deliveries.discard(delivery)
        self._forget(delivery)

    def _follow_patch(self, delivery: Delivery, key: ObjectKey,
                      future: asyncio.Future[PatchOutcome]) -> None:
        """Learn the outcome of a patch this delivery asked for. A callback, not a task per
        delivery: hundreds of deliveries wait on one coalesced patch of a busy source."""
        future.add_done_callback(functools.partial(self._patched, delivery, key))

    def _patched(self, delivery: Delivery, key: ObjectKey,
                 future: asyncio.Future[PatchOutcome]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        outcome = future.result() if error is None else PatchOutcome(False, error=str(error))
        if not outcome.ok:
            delivery.local[key] = (FAILED, "AnnotateFailed", outcome.error)
        elif delivery.record.mark in outcome.refused:
            delivery.local[key] = (FAILED, "TooManyMarks", outcome.refusal)
        else:
            # A patch that went through moves the delivery only once the cache holds its mark,
            # and that watch event queues the delivery itself (`_on_change`): an evaluation
            # here would find it unchanged.
            return
        self._queue_evaluation((delivery.id,))

    def _finish(self, delivery: Delivery) -> None:
        self._metrics.deliveries.labels(delivery.view.outcome()).inc()
        self._deliveries.finished(delivery)
        self._forget(delivery)

    def _forget(self, delivery: Delivery) -> None:
        """Stop following a delivery: drop its watches and bookkeeping."""
        for key in self._watched_by.pop(delivery.id, set()):
            ids = self._watching.get(key)
            if ids is not None:
                ids.discard(delivery.id)
                if not ids:
                    del self._watching[key]
                    self._last_seen.pop(key, None)
            self._requested.discard((delivery.id, key))
            self._grace.pop((delivery.id, key), None)

    # -- following progress ----------------------------------------------------------------

    def _on_change(self, op: str, obj: FluxObject) -> None:
        ids = self._watching.get(obj.key)
        if not ids:
            return
        # Only status, generation, suspension and our marks move a delivery: anything else
        # (another tool's annotations) must not cost an evaluation of every watching delivery.
        progress = (op, obj.generation, obj.raw.get("status"), obj.suspended)
        marks = obj.annotations.get(DELIVERIES_ANNOTATION)
        before = self._last_seen.get(obj.key)
        if before == (progress, marks):
            return
        self._last_seen[obj.key] = (progress, marks)
        if before is not None and before[0] == progress:
            # Only marks changed (a patch, ours or another replica's): only the deliveries
            # whose mark just appeared moved (queued -> annotated). A busy source followed by
            # thousands of deliveries must not re-evaluate them all on every patch.
            added = delivery_marks.added(before[1], marks)
            moved = [i for i in ids if (d := self._deliveries.get(i)) is not None
                     and d.record.mark in added]
            self._queue_evaluation(moved)
        else:
            self._queue_evaluation(ids)

    def _queue_evaluation(self, ids: Iterable[str]) -> None:
        """Evaluate these deliveries soon, each once however many changes asked for it."""
        self._dirty.update(dict.fromkeys(ids))
        if self._evaluator is None or self._evaluator.done():
            self._evaluator = asyncio.ensure_future(self._evaluate_dirty())
            self._tasks.add(self._evaluator)
            self._evaluator.add_done_callback(self._tasks.discard)

    async def _evaluate_dirty(self) -> None:
        """Evaluate the deliveries changes touched, one task for all, yielding to the loop
        every `EVALUATION_SLICE`: one patch of a busy object is followed by hundreds of
        deliveries, and evaluating them all in one go held every request behind them."""
        started = time.perf_counter()
        while self._dirty:
            id_ = next(iter(self._dirty))
            del self._dirty[id_]
            delivery = self._deliveries.get(id_)
            if delivery is not None:
                try:
                    await self._evaluate(delivery)
                except Exception:
                    log.exception("evaluating a delivery failed", extra={"delivery": id_})
            if time.perf_counter() - started > EVALUATION_SLICE:
                await asyncio.sleep(0)
                started = time.perf_counter()

    async def _evaluate(self, delivery: Delivery) -> None:
        self._dirty.pop(delivery.id, None)  # this evaluation answers a queued one too
        if delivery.id not in self._watched_by:
            return  # finished or evicted
        view = self.view(delivery.record, delivery.local)
        for target in view.targets:
            if target.role == ROLE_ANNOTATE and target.state == QUEUED and not target.is_source:
                self._maybe_annotate(delivery, view, target.key)
        previous = {t.key: t for t in delivery.view.targets}
        for target in delivery.update(view):
            before = previous.get(target.key)
            if before is not None and before.final:
                continue  # already reported
            if target.state == READY and not target.is_source:
                self._metrics.lead_time.labels(self._cluster_name).observe(
                    max(0.0, time.time() - delivery.record.received))
            for listener in self.listeners:
                listener(delivery, target.key, target.state)
        if view.final:
            self._finish(delivery)

    def _maybe_annotate(self, delivery: Delivery, view: DeliveryView, key: ObjectKey) -> None:
        """Annotate a listed consumer once its source has the commit, unless Flux starts first."""
        if (delivery.id, key) in self._requested:
            return
        obj = self._cluster.store.get(key)
        if obj is None or not source_ready(delivery.record, view, obj, self._cluster.store.get):
            return
        if delivery.sha and consumer_source(obj) is not None and self._in_grace(delivery, key):
            # kustomize-controller reacts to a new artifact by itself; give it a moment so
            # our annotation does not cause a second reconcile of the same commit. (An input
            # provider reads Gitea, not a source: nothing starts it but the request.)
            return
        self._requested.add((delivery.id, key))
        future, _ = self.patches.request(key, Mark(delivery.record.mark, delivery.record.received))
        self._follow_patch(delivery, key, future)

    def _in_grace(self, delivery: Delivery, key: ObjectKey) -> bool:
        """True while a consumer whose source is ready is left to start on its own."""
        grace = self._config.consumer_grace_seconds
        if grace <= 0:
            return False
        now = time.monotonic()
        due = self._grace.get((delivery.id, key))
        if due is None:
            self._grace[(delivery.id, key)] = now + grace
            asyncio.get_running_loop().call_later(grace, self._grace_over, delivery.id, key)
            return True
        return now < due

    def _grace_over(self, delivery_id: str, key: ObjectKey) -> None:
        """Evaluate the delivery once its consumer's grace is over by the clock `_in_grace`
        reads. The loop's timer does not keep that clock: uvloop's counts whole milliseconds
        and may fire up to one early. An evaluation then would find the consumer still in
        its grace, and nothing would evaluate it again before the source's time-out."""
        due = self._grace.get((delivery_id, key))
        if due is None:
            return  # finished or forgotten meanwhile
        left = due - time.monotonic()
        if left > 0:
            asyncio.get_running_loop().call_later(left, self._grace_over, delivery_id, key)
            return
        self._queue_evaluation((delivery_id,))

    # -- deadlines: one sweeper for all deliveries, not one sleeping task each ---------------

    def _schedule_deadlines(self, delivery: Delivery) -> None:
        received = delivery.record.received
        if len(self._deadlines) > 4 * len(self._watched_by) + 1000:
            # Most entries belong to deliveries already finished or evicted: drop them.
            self._deadlines = [d for d in self._deadlines if d[1] in self._watched_by]
            heapq.heapify(self._deadlines)
        # Time-outs are part of the state function: re-evaluate just after each one passes.
        for seconds in {self.timeouts.source_seconds, self.timeouts.consumer_seconds}:
            heapq.heappush(self._deadlines, (received + seconds + 0.01, delivery.id))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        started = time.perf_counter()
        while self._deadlines:
            due, id_ = self._deadlines[0]
            wait = due - time.time()
            if wait > 0:
                await asyncio.sleep(min(max(wait, SWEEP_EVERY), 1.0))
                started = time.perf_counter()
                continue
            heapq.heappop(self._deadlines)
            delivery = self._deliveries.get(id_)
            if delivery is not None and id_ in self._watched_by:
                await self._evaluate(delivery)
            if time.perf_counter() - started > EVALUATION_SLICE:
                await asyncio.sleep(0)  # a burst of pushes times out together
                started = time.perf_counter()

    async def stop(self) -> None:
        pending: list[asyncio.Future[None]] = list(self._tasks)
        if self._sweeper is not None:
            pending.append(self._sweeper)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
