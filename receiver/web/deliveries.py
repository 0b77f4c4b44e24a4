"""`GET /deliveries/{id}`: a delivery's state, now or streamed until it settles (`?wait=`).

Any replica answers for any delivery: the id carries its record (signed with a key derived
from the Receiver's token), and the state is computed from the live objects (`evaluate`).
Unknown, forged and unauthorised ids look the same, so ids cannot be probed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from receiver import signatures
from receiver.config import Settings
from receiver.delivery.canary_wait import (
    canaries_by_consumer,
    canary_verdicts,
    unconfirmed,
    with_canaries,
)
from receiver.delivery.reconcile import Reconciler
from receiver.delivery.record import DeliveryRecord, decode, receiver_of
from receiver.delivery.store import DeliveryStore, describe
from receiver.delivery.view import DeliveryView, Lookup
from receiver.flux.canary import target_of
from receiver.flux.cluster import Cluster, ClusterError
from receiver.flux.objects import (
    API_VERSIONS,
    CANARY_KINDS,
    CANARY_WATCHED_KINDS,
    FluxObject,
    ObjectKey,
)
from receiver.push.hookindex import HookIndex
from receiver.web.changes import ChangeFeed, watched_keys
from receiver.web.drain import Drain
from receiver.web.http import error

log = logging.getLogger(__name__)


class DeliveriesEndpoint:
    def __init__(self, settings: Settings, cluster: Cluster, hooks: HookIndex,
                 reconciler: Reconciler, deliveries: DeliveryStore, *,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.cluster = cluster
        self.hooks = hooks
        self.reconciler = reconciler
        self.deliveries = deliveries
        self.wall_clock = wall_clock
        self.changes = ChangeFeed(cluster.store)

    def _authorised(self, request: Request, delivery_id: str, token: str) -> bool:
        """Read access needs the receiver's token: bearer, or a fresh read signature for this
        delivery (`signatures.verify_read`: never valid as a push, nor a push as it). Read-only,
        so the one-time rule of the push is not applied."""
        headers = request.headers
        if headers.get("x-signature"):
            return signatures.verify_read(
                headers["x-signature"], delivery_id, token, self.wall_clock()).ok
        return signatures.verify_bearer(headers, token).ok

    def _record(self, request: Request) -> tuple[str, DeliveryRecord] | None:
        """The record an id carries, if its signature and the caller's credential hold."""
        delivery_id = request.path_params["id"]
        claimed = receiver_of(delivery_id)
        if claimed is None:
            return None
        namespace, _, rname = claimed.partition("/")
        token = self.hooks.token_of(ObjectKey("Receiver", namespace, rname))
        if token is None:
            return None
        record = decode(delivery_id, token)
        if record is None or not self._authorised(request, delivery_id, token):
            return None
        return delivery_id, record

    async def handle(self, request: Request) -> Response:
        found = self._record(request)
        # Unknown, forged and unauthorised look the same, so ids cannot be probed.
        if found is None:
            return error(404, "no such delivery")
        delivery_id, record = found
        canaries = request.query_params.get("canaries", "false")
        if canaries not in ("true", "false"):
            return error(400, "canaries must be true or false")
        if canaries == "true" and not self.settings.statuses.canaries.enabled:
            return error(400, "canaries are not enabled (statuses.canaries.enabled)")
        with_canaries_ = canaries == "true"
        hidden = [k for k in CANARY_WATCHED_KINDS
                  if with_canaries_ and k in self.cluster.not_permitted]
        if hidden:
            # Canaries it cannot see would read as none, and the wait as "promoted".
            return error(409, "canaries cannot be followed: the bridge may not list and watch "
                              f"{', '.join(hidden)} (RBAC; see /readyz)")
        raw_wait = request.query_params.get("wait")
        if raw_wait is None:
            view = await self._confirmed_view(delivery_id, record, with_canaries_)
            return JSONResponse(self._describe(delivery_id, record, view))
        try:
            wait = min(float(raw_wait), self.settings.deliveries.max_wait_seconds)
        except ValueError:
            return error(400, "wait must be a number of seconds")
        if wait != wait or wait < 0:  # NaN or negative
            return error(400, "wait must be a number of seconds")
        return StreamingResponse(
            self._stream(delivery_id, record, wait, request.app.state.parts.drain,
                         with_canaries_),
            media_type="application/x-ndjson")

    def _next_deadline(self, record: DeliveryRecord) -> float:
        """Seconds until the record's next time-out (a little after, so it has passed)."""
        timeouts = self.reconciler.timeouts
        now = self.wall_clock()
        ahead = [record.received + t - now for t in (timeouts.source_seconds,
                                                     timeouts.consumer_seconds)]
        return min((a for a in ahead if a > 0), default=5.0) + 0.01

    def _view(self, delivery_id: str, record: DeliveryRecord, canaries: bool = False,
              live: Mapping[ObjectKey, FluxObject | None] | None = None) -> DeliveryView:
        """The delivery's state from the cache; `live` objects, read from the API server, take
        the place of their cached copies (None: the API server no longer has it)."""
        local = self.deliveries.get(delivery_id)
        view = self.reconciler.view(record, local.local if local is not None else None)
        if not canaries:
            return view
        store = self.cluster.store
        found = [c for kind in CANARY_KINDS for c in store.list(kind)]
        lookup: Lookup = store.get
        if live:
            found = [c for c in (live.get(c.key, c) for c in found) if c is not None]
            lookup = functools.partial(_live_first, live, store.get)
        return with_canaries(view, record, found, lookup, self.wall_clock(),
                             self.settings.deliveries.canary_pickup_seconds)

    async def _confirmed_view(self, delivery_id: str, record: DeliveryRecord,
                              canaries: bool) -> DeliveryView:
        """The view, with any verdict Flagger's canaries give it read again from the API
        server first: a watch that lags (or a stalled one) must not end a wait with a phase or
        a workload the cluster has moved on from. Two reads per canary, only when the cache
        says a canary decided; if they fail, the canary is not decided yet."""
        view = self._view(delivery_id, record, canaries)
        decided = canary_verdicts(view)
        if not decided:
            return view
        live: dict[ObjectKey, FluxObject | None] = {}
        try:
            for key in decided:
                canary = live[key] = await self.cluster.read_object(key)
                workload = target_of(canary) if canary is not None else None
                if workload is not None:
                    live[workload] = await self.cluster.read_object(workload)
        except ClusterError as exc:
            log.warning("canary verdict not confirmed: the API server could not be read",
                        extra={"commit": record.sha, "error": str(exc)})
            return unconfirmed(view, "the canary's verdict could not be read again from the "
                                     "API server; asking again")
        return self._view(delivery_id, record, canaries, live)

    def _canary_keys(self, record: DeliveryRecord) -> set[ObjectKey]:
        """The canaries (and their workloads) of the delivery's consumers: their changes move
        its state too."""
        store = self.cluster.store
        found = [c for kind in CANARY_KINDS for c in store.list(kind)]
        owned = canaries_by_consumer(found, store.get)
        return {c.key for t in record.targets for c in owned.get(t.key, ())}

    def _describe(self, delivery_id: str, record: DeliveryRecord,
                  view: DeliveryView | None = None) -> dict[str, Any]:
        return describe(delivery_id, record, view or self._view(delivery_id, record), API_VERSIONS)

    async def _stream(self, delivery_id: str, record: DeliveryRecord, wait: float,
                      drain: Drain, canaries: bool = False) -> Any:
        """Newline-delimited JSON: the state now, then on every change, until it settles or
        time is up. Any replica can serve it: the state is computed from the live objects. A
        draining replica ends it with a line that tells the client to ask again (elsewhere)."""
        deadline = time.monotonic() + wait
        keys = watched_keys(record, self.cluster.store.get)
        if canaries:
            keys |= self._canary_keys(record)
        last: DeliveryView | None = None
        with self.changes.watching(keys) as changed:
            while True:
                changed.clear()
                view = await self._confirmed_view(delivery_id, record, canaries)
                if view != last:
                    last = view
                    yield json.dumps(self._describe(delivery_id, record, view)) + "\n"
                remaining = deadline - time.monotonic()
                if view.settled or remaining <= 0:
                    if view.settled:
                        _log_settled(record, view)
                    else:
                        yield json.dumps({"delivery": delivery_id, "timeout": True,
                                          "outcome": view.outcome()}) + "\n"
                    return
                if drain.draining:
                    yield json.dumps({"delivery": delivery_id, "retry": True,
                                      "reason": drain.reason}) + "\n"
                    return
                # Time-outs are part of the state: look again when the next one passes.
                await _change_or_drain(changed, drain, min(
                    remaining, self._next_deadline(record), 5.0))


def _live_first(live: Mapping[ObjectKey, FluxObject | None], cached: Lookup,
                key: ObjectKey) -> FluxObject | None:
    return live[key] if key in live else cached(key)


def _log_settled(record: DeliveryRecord, view: DeliveryView) -> None:
    """What a waiting client was told at the end, target by target: the record to read when
    a verdict is questioned."""
    log.info("delivery wait settled", extra={
        "commit": record.sha, "outcome": view.outcome(),
        "targets": [f"{t.key} {t.role} {t.state} {t.reason}".rstrip() for t in view.targets]})


async def _change_or_drain(changed: asyncio.Event, drain: Drain, timeout: float) -> None:
    """Return when a watched object changes, the drain begins, or after `timeout`."""
    waiters = (asyncio.ensure_future(changed.wait()), asyncio.ensure_future(drain.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
