"""`POST /hook/{digest}` and `GET /deliveries/{id}`: validate, then act.

Order of checks, cheapest and least revealing first: declared size (413), cache synced (503),
known path (404), suspended receiver (503), capped body read (413), signature (401, one body for
every failure), content type on a github Receiver (415), one-time signature replay (401), rate
(429, counted only for authenticated requests so strangers cannot use up a receiver's budget),
event type (200 pong / ignored), repeated X-Gitea-Delivery (200 duplicate), then the payload
selector (`receiver.push.selector`: a push, an Actions body, or no push details; 400/422 only where
Flux refuses too or a push contradicts itself), capacity (503), routing and 202.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from receiver import signatures
from receiver.config import Settings
from receiver.delivery import marks as delivery_marks
from receiver.delivery.marks import fresh_mark, legacy_mark_for, mark_for
from receiver.delivery.patches import request_value
from receiver.delivery.reconcile import Reconciler
from receiver.delivery.record import DeliveryRecord, decode, encode, receiver_of
from receiver.delivery.store import Delivery, DeliveryStore, describe, record_targets
from receiver.delivery.view import DeliveryView
from receiver.flux.cluster import Cluster, ClusterError
from receiver.flux.objects import API_VERSIONS, RECONCILE_ANNOTATION, FluxObject, ObjectKey
from receiver.flux.origin import package_ref
from receiver.gitea.payloads import PayloadError, Push, form_payload
from receiver.giturls import registry_host
from receiver.logs import delivery_id as delivery_ctx
from receiver.metrics import Metrics
from receiver.push import spec_events
from receiver.push.cel_filter import CompiledFilter, FilterCache, RequestNotJSON, request_document
from receiver.push.hookindex import HookIndex
from receiver.push.mismatch import Unmatched, unmatched
from receiver.push.package_routing import OCI_TYPES, plan_selection
from receiver.push.replay import SeenOnce
from receiver.push.resource_filter import FilterEvaluationError, filter_entries, filter_plan
from receiver.push.resources import Resolved, resolve_resources
from receiver.push.routing import Plan
from receiver.push.selector import PayloadRefused, Selection, select_payload
from receiver.web.changes import ChangeFeed, watched_keys
from receiver.web.drain import Drain
from receiver.web.http import (
    UNAUTHORIZED,
    BodyTooLarge,
    declared_too_large,
    error,
    media_type,
    read_capped,
)
from receiver.web.ratelimit import RateLimiter

log = logging.getLogger(__name__)
JSON_TYPES = frozenset({"application/json"})
FORM_TYPE = "application/x-www-form-urlencoded"
UNSUPPORTED_MEDIA = ("content type must be application/json "
                     "or application/x-www-form-urlencoded on a github Receiver")
PushListener = Callable[[Delivery, Push], None]


@dataclass(frozen=True, slots=True)
class _Once:
    mark: str  # written on the objects this request annotates
    until: float  # how long this replica remembers it (unix)
    scheme_replay: bool  # a one-time signature (a repeat is 401), else a Gitea delivery id
    label: str  # for log lines
    gitea_id: str = ""
    legacy: str = ""  # the mark an earlier release wrote for the same request


@dataclass
class _Authenticated:
    verdict: signatures.Verdict
    signed: bytes  # the JSON document the sender signed (decoded form payload or raw body)


class IngestService:
    def __init__(
        self,
        settings: Settings,
        cluster: Cluster,
        hooks: HookIndex,
        reconciler: Reconciler,
        deliveries: DeliveryStore,
        metrics: Metrics,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cluster = cluster
        self.hooks = hooks
        self.reconciler = reconciler
        self.deliveries = deliveries
        self.metrics = metrics
        self.wall_clock = wall_clock
        self.seen = SeenOnce()
        self.changes = ChangeFeed(cluster.store)
        limits = settings.rate_limit
        self.rate = RateLimiter(limits.requests_per_second, limits.burst)
        self.push_listeners: list[PushListener] = []
        self._resolutions: dict[ObjectKey, tuple[tuple[str, int], Resolved]] = {}
        self.gitea_prefixes = settings.gitea_prefixes()
        self.filters = FilterCache()
        self._filter_invalid: dict[ObjectKey, str] = {}

    # -- authentication ---------------------------------------------------------------------

    def _verify(
        self, receiver: FluxObject, token: str, request: Request, body: bytes, kind: str
    ) -> _Authenticated:
        headers = request.headers
        rtype = receiver.spec.get("type")
        if rtype == "github":
            signed = body
            if kind == FORM_TYPE and body:
                # Gitea signs the JSON document, not the form-encoded body it sends; a form
                # without that document cannot carry a valid signature (go-github alike).
                try:
                    signed = form_payload(body)
                except PayloadError:
                    return _Authenticated(
                        signatures.Verdict(False, "gitea-sha256", "undecodable-form"), body)
            return _Authenticated(signatures.verify_gitea(headers, signed, token), signed)
        # generic and generic-hmac sign the raw bytes, whatever their content type (as Flux).
        if rtype == "generic-hmac":
            verdict = signatures.verify_generic_hmac(headers, body, token)
        else:
            verdict = signatures.verify_generic(
                headers, body, token, self.wall_clock(),
                allow_unsigned=self.settings.insecure.allow_unsigned_generic,
            )
        return _Authenticated(verdict, body)

    async def _authenticate(
        self, receiver: FluxObject, token: str, request: Request, body: bytes, kind: str
    ) -> _Authenticated:
        result = self._verify(receiver, token, request, body, kind)
        if not result.verdict.ok and result.verdict.reason == "mismatch":
            # The token may have been rotated since we cached it: read it again, once.
            fresh = await self.hooks.refresh(receiver.key, fresh=True)
            if fresh is not None and fresh != token:
                result = self._verify(receiver, fresh, request, body, kind)
        return result

    # -- POST /hook/{digest} ----------------------------------------------------------------

    async def hook(self, request: Request) -> Response:
        limit = self.settings.body_limit_bytes
        if declared_too_large(request, limit):
            return self._count("-", "too_large", error(413, f"body exceeds {limit} bytes"))
        if not self.cluster.synced:
            # Before the first list a real Receiver's path would look unknown: not a 404.
            return self._count("-", "not_ready", error(503, "caches are not synced yet"))
        digest = request.path_params["digest"]
        found = await self.hooks.lookup_or_refresh(digest) if len(digest) == 64 else None
        if found is None:
            return self._count("-", "not_found", error(404, "no receiver for this path"))
        receiver, token = found
        name = f"{receiver.namespace}/{receiver.name}"
        if receiver.suspended:
            return self._count(name, "suspended", error(503, "receiver is suspended"))
        compiled = self._filter(receiver)
        entries = self._entry_filters(receiver)
        if isinstance(compiled, str) or isinstance(entries, str):
            # Flux marks such a Receiver Stalled (InvalidCELExpression) and answers 503.
            return self._count(name, "filter_invalid", error(
                503, "receiver is not ready: invalid spec.resourceFilter"
                if isinstance(compiled, str) else
                "receiver is not ready: invalid spec.resources[].filter"))
        try:
            body = await read_capped(request, limit)
        except BodyTooLarge:
            return self._count(name, "too_large", error(413, f"body exceeds {limit} bytes"))
        kind = media_type(request)
        # Before authentication every answer is the same whatever the Receiver's type: nothing
        # about the body is judged until its signature holds.
        auth = await self._authenticate(receiver, token, request, body, kind)
        verdict = auth.verdict
        if not verdict.ok:
            self.metrics.signature_failures.labels(verdict.scheme, verdict.reason).inc()
            log.info("signature rejected", extra={"receiver": name, "scheme": verdict.scheme,
                                                  "reason": verdict.reason})
            return self._count(name, "unauthorized", JSONResponse(UNAUTHORIZED, 401))
        if body and receiver.spec.get("type") == "github" and (
            kind not in JSON_TYPES and kind != FORM_TYPE
        ):
            # Flux's github Receiver (go-github ValidatePayload) refuses these too.
            return self._count(name, "unsupported_media", error(415, UNSUPPORTED_MEDIA))
        # spec.events is matched against X-GitHub-Event alone, as Flux does (Gitea sends it with
        # every webhook); X-Gitea-Event is read below to tell a ping or another event apart.
        refused = spec_events.refusal(receiver, request.headers.get("x-github-event", ""))
        if refused is not None:
            return self._count(name, "event_refused", error(400, refused))
        now = self.wall_clock()
        once = self._once(name, verdict, request, now)
        if once is not None and once.scheme_replay and once.mark in self.seen:
            return self._replayed(name, verdict)
        if not self.rate.allow(name, time.monotonic()):
            return self._count(name, "rate_limited", error(429, "rate limit exceeded"))

        event = (request.headers.get("x-gitea-event") or request.headers.get("x-github-event")
                 or "").strip().lower()
        token_ctx = delivery_ctx.set(once.label if once is not None else "-")
        try:
            listed = spec_events.listed(receiver, event)
            if event == "ping" and not listed:
                return self._count(name, "ping", JSONResponse({"status": "pong"}))
            if event and event != "push" and not listed:
                return self._count(name, "ignored", JSONResponse(
                    {"status": "ignored", "event": event[:64], "reason": (
                        "not a push; list the event in the receiver's spec.events to have it "
                        "reconcile every listed object, as Flux does")}))
            if once is not None and not once.scheme_replay and once.mark in self.seen:
                return self._duplicate(name, once)
            req: dict[str, Any] = {}
            if compiled is not None or entries:
                try:
                    req = request_document(request.headers.get("content-type", ""), body)
                except RequestNotJSON as exc:
                    return self._count(name, "bad_json", error(400, str(exc)))
            return await self._accept(receiver, token, name, once, auth.signed,
                                      compiled=compiled, req=req, entries=entries)
        finally:
            delivery_ctx.reset(token_ctx)

    def _once(self, name: str, verdict: signatures.Verdict, request: Request,
              now: float) -> _Once | None:
        """What makes this request one of a kind: its one-time signature, or Gitea's delivery
        id. Its mark is written on every object the push annotates, so a repeat is known on
        every replica, not only the one that saw the first."""
        if verdict.replay_key:
            key = "sig:" + verdict.replay_key
            mark = mark_for(name, key)
            return _Once(mark, verdict.replay_until, scheme_replay=True, label=mark,
                         legacy=legacy_mark_for(name, key))
        gitea_id = request.headers.get("x-gitea-delivery", "").strip()[:128]
        if gitea_id:
            key = "gitea:" + gitea_id
            return _Once(mark_for(name, key),
                         now + self.settings.delivery_dedupe_seconds, scheme_replay=False,
                         label=gitea_id, gitea_id=gitea_id, legacy=legacy_mark_for(name, key))
        return None

    def _replayed(self, name: str, verdict: signatures.Verdict) -> Response:
        self.metrics.signature_failures.labels(verdict.scheme, "replayed").inc()
        log.info("signature replayed", extra={"receiver": name})
        return self._count(name, "unauthorized", JSONResponse(UNAUTHORIZED, 401))

    def _duplicate(self, name: str, once: _Once) -> Response:
        return self._count(name, "duplicate", JSONResponse(
            {"status": "duplicate", "delivery": once.gitea_id}))

    def _seen_in_cluster(self, plan: Plan, once: _Once) -> bool:
        """Has any replica annotated an object of this plan for the same request already?"""
        store = self.cluster.store
        for target in plan.targets:
            obj = store.get(target.key)
            if obj is not None and (delivery_marks.has(obj.annotations, once.mark) or (
                    once.legacy and delivery_marks.has(obj.annotations, once.legacy))):
                return True
        return False

    async def _accept(
        self, receiver: FluxObject, token: str, name: str, once: _Once | None, signed: bytes,
        *, compiled: CompiledFilter | None = None, req: dict[str, Any] | None = None,
        entries: dict[ObjectKey, list[CompiledFilter]] | None = None,
    ) -> Response:
        try:
            selection = select_payload(str(receiver.spec.get("type") or ""), signed)
        except PayloadRefused as exc:
            return self._count(name, exc.outcome, error(exc.status, exc.message))
        push = selection.push
        joined = self._joined(name, push, once)
        if joined is not None:
            return joined
        if self.deliveries.active_count >= self.settings.deliveries.max_count:
            return self._count(name, "overloaded", error(503, "too many deliveries in flight"))
        plan = plan_selection(
            receiver, selection, self.cluster.store,
            allow_cross_namespace=self.settings.allow_cross_namespace_refs,
            resolved=self._resolved(receiver), gitea_prefixes=self.gitea_prefixes,
        )
        # Why nothing matched is about the push, not the filter: ask before filtering.
        mismatch = unmatched(push, self.cluster.store) if not plan.targets else None
        try:
            if compiled is not None:
                plan = filter_plan(plan, compiled, req or {}, self.cluster.store)
            if entries:
                plan = filter_entries(plan, entries, req or {}, self.cluster.store)
        except FilterEvaluationError as exc:
            return self._count(name, "unprocessable", error(422, str(exc)))
        now = self.wall_clock()
        if once is not None:
            # No await from this check to `remember`: two copies of one request on this replica
            # cannot both pass. Across replicas the mark on the objects decides (see reconcile).
            if once.mark in self.seen or self._seen_in_cluster(plan, once):
                self.seen.remember(once.mark, once.until, now)
                if once.scheme_replay:
                    return self._replayed(name, signatures.Verdict(True, "timestamped", ""))
                return self._duplicate(name, once)
            self.seen.remember(once.mark, once.until, now)
        mark = once.mark if once is not None else fresh_mark(name)
        record = DeliveryRecord(name, push.sha if push else "", _record_ref(selection),
                                round(now, 3), mark, record_targets(plan))
        delivery_id, _ = encode(record, token)
        delivery = Delivery.from_record(delivery_id, record, plan)
        for listener in self.push_listeners:
            if push is not None:
                listener(delivery, push)
        await self.reconciler.start_delivery(delivery)
        annotated = await self._annotate_only(plan)
        if mismatch is not None:
            self.metrics.pushes_unmatched.labels(mismatch.reason).inc()
            log.info("push matched no source", extra={
                "receiver": name, "reason": mismatch.reason, "detail": mismatch.message})
        # `mark` is short and on the objects; `id` is what a client follows with.
        log.info("push accepted", extra={
            "receiver": name, "ref": delivery.ref, "commit": delivery.sha, "mark": mark,
            "id": delivery_id, "targets": len(plan.targets), "tracked": len(plan.tracked)})
        return self._count(name, "accepted", _accepted(delivery, plan, annotated, mismatch))

    async def _annotate_only(self, plan: Plan) -> list[dict[str, str]]:
        """Patch the listed objects of kinds the bridge does not route, as Flux does: only
        `requestedAt`, a JSON merge patch without resourceVersion, not followed afterwards."""
        targets = plan.annotate_only
        if not targets:
            return []
        value = request_value()
        outcomes = await asyncio.gather(
            *(self.cluster.annotate(t.key, {RECONCILE_ANNOTATION: value}) for t in targets),
            return_exceptions=True)
        entries = []
        for target, outcome in zip(targets, outcomes, strict=True):
            entry = {**target.as_dict(), "state": "annotated"}
            if isinstance(outcome, ClusterError):
                status = str(outcome.status or "error")
                self.metrics.annotate_errors.labels(target.kind, status).inc()
                entry.update(state="failed", error=str(outcome))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                self.metrics.targets_annotated.labels(target.kind).inc()
            entries.append(entry)
        return entries

    def _joined(self, name: str, push: Push | None, once: _Once | None) -> Response | None:
        """A push of a commit whose delivery is still in flight here (a retried CI job, a
        webhook fired twice, a redelivery under a new id) joins it: same id, no new patch."""
        if push is None:
            return None
        delivery = self.deliveries.in_flight(name, push.sha, push.ref)
        if delivery is None:
            return None
        if once is not None:
            self.seen.remember(once.mark, once.until, self.wall_clock())
        log.info("push joined its delivery in flight", extra={
            "receiver": name, "ref": push.ref, "commit": push.sha})
        return self._count(name, "joined", _accepted(delivery, delivery.plan))

    def _resolved(self, receiver: FluxObject) -> Resolved:
        """The Receiver's resources, resolved again only when the cache's shape changed."""
        store = self.cluster.store
        stamp = (receiver.resource_version, store.shape_version)
        cached = self._resolutions.get(receiver.key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        resolved = resolve_resources(
            receiver, store, allow_cross_namespace=self.settings.allow_cross_namespace_refs)
        if len(self._resolutions) > 10_000:
            self._resolutions.clear()
        self._resolutions[receiver.key] = (stamp, resolved)
        return resolved

    def _filter(self, receiver: FluxObject) -> CompiledFilter | str | None:
        """The Receiver's compiled resourceFilter, None without one, or why it is invalid.
        Compiled once per resourceVersion; an invalid one is logged once and counted."""
        expression = receiver.spec.get("resourceFilter")
        key = receiver.key
        result: CompiledFilter | str | None = None
        if isinstance(expression, str) and expression.strip():
            found = self.filters.get(key, receiver.resource_version, expression)
            result = found if isinstance(found, CompiledFilter) else str(found)
        else:
            self.filters.forget(key)
        why = result if isinstance(result, str) else None
        if why is not None and self._filter_invalid.get(key) != why:
            log.warning("receiver resourceFilter is invalid: its hook answers 503", extra={
                "receiver": f"{key.namespace}/{key.name}", "reason": why})
        if why is None:
            self._filter_invalid.pop(key, None)
        else:
            self._filter_invalid[key] = why
        self.metrics.receivers_filter_invalid.set(len(self._filter_invalid))
        return result

    def _entry_filters(self, receiver: FluxObject
                       ) -> dict[ObjectKey, list[CompiledFilter]] | str:
        """Each object only filtered `spec.resources` entries list, with their compiled
        filters ({} without any); or why one entry's filter is invalid (every entry's counts,
        as Flux judges the Receiver's spec, not what it resolves to). Compiled once each."""
        compiled: dict[str, CompiledFilter] = {}
        for entry in receiver.spec.get("resources") or []:
            expression = entry.get("filter") if isinstance(entry, dict) else None
            if isinstance(expression, str) and expression.strip():
                found = self.filters.get(("entry", expression.strip()), "", expression.strip())
                if not isinstance(found, CompiledFilter):
                    return str(found)
                compiled[expression.strip()] = found
        if not compiled:
            return {}
        return {key: [compiled[e] for e in expressions]
                for key, expressions in self._resolved(receiver).entry_filters}

    def _count(self, receiver: str, outcome: str, response: Response) -> Response:
        self.metrics.hook_requests.labels(receiver, outcome).inc()
        return response

    # -- GET /deliveries/{id} ---------------------------------------------------------------

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

    async def delivery(self, request: Request) -> Response:
        found = self._record(request)
        # Unknown, forged and unauthorised look the same, so ids cannot be probed.
        if found is None:
            return error(404, "no such delivery")
        delivery_id, record = found
        raw_wait = request.query_params.get("wait")
        if raw_wait is None:
            return JSONResponse(self._describe(delivery_id, record))
        try:
            wait = min(float(raw_wait), self.settings.deliveries.max_wait_seconds)
        except ValueError:
            return error(400, "wait must be a number of seconds")
        if wait != wait or wait < 0:  # NaN or negative
            return error(400, "wait must be a number of seconds")
        return StreamingResponse(
            self._stream(delivery_id, record, wait, request.app.state.parts.drain),
            media_type="application/x-ndjson")

    def _next_deadline(self, record: DeliveryRecord) -> float:
        """Seconds until the record's next time-out (a little after, so it has passed)."""
        timeouts = self.reconciler.timeouts
        now = self.wall_clock()
        ahead = [record.received + t - now for t in (timeouts.source_seconds,
                                                     timeouts.consumer_seconds)]
        return min((a for a in ahead if a > 0), default=5.0) + 0.01

    def _view(self, delivery_id: str, record: DeliveryRecord) -> DeliveryView:
        local = self.deliveries.get(delivery_id)
        return self.reconciler.view(record, local.local if local is not None else None)

    def _describe(self, delivery_id: str, record: DeliveryRecord,
                  view: DeliveryView | None = None) -> dict[str, Any]:
        return describe(delivery_id, record, view or self._view(delivery_id, record), API_VERSIONS)

    async def _stream(self, delivery_id: str, record: DeliveryRecord, wait: float,
                      drain: Drain) -> Any:
        """Newline-delimited JSON: the state now, then on every change, until it settles or
        time is up. Any replica can serve it: the state is computed from the live objects. A
        draining replica ends it with a line that tells the client to ask again (elsewhere)."""
        deadline = time.monotonic() + wait
        keys = watched_keys(record, self.cluster.store.get)
        last: DeliveryView | None = None
        with self.changes.watching(keys) as changed:
            while True:
                changed.clear()
                view = self._view(delivery_id, record)
                if view != last:
                    last = view
                    yield json.dumps(self._describe(delivery_id, record, view)) + "\n"
                remaining = deadline - time.monotonic()
                if view.settled or remaining <= 0:
                    if not view.settled:
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


def _record_ref(selection: Selection) -> str:
    """A push's ref; for a container package, the OCI reference pushed (`origin.package_ref`),
    which lets any replica tell the artifact it produced (`delivery.package.has_push`)."""
    if selection.push is not None:
        return selection.push.ref
    package = selection.package
    registry = registry_host(package.instance) if package is not None else None
    if package is None or registry is None or package.type not in OCI_TYPES:
        return ""
    return package_ref(registry, package.owner, package.name, package.version)


async def _change_or_drain(changed: asyncio.Event, drain: Drain, timeout: float) -> None:
    """Return when a watched object changes, the drain begins, or after `timeout`."""
    waiters = (asyncio.ensure_future(changed.wait()), asyncio.ensure_future(drain.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _accepted(delivery: Delivery, plan: Plan, annotate_only: list[dict[str, str]] | None = None,
              mismatch: Unmatched | None = None) -> JSONResponse:
    """The 202 reply: the plan with each annotated target's state now, the kinds annotated by
    name only, and why a push that matched no source did not (`unmatched`). `plan` is passed
    in: a delivery that settled at once (a refused patch) has already dropped its own."""
    reply = plan.as_dict()  # without a store: unrelated objects are only counted
    if annotate_only:
        reply["annotate_only"] = annotate_only
    if mismatch is not None:
        reply["unmatched"] = mismatch.as_dict()
    reply["targets"] = []
    for target in plan.targets:
        view = delivery.view.get(target.key)
        entry = {**target.as_dict(), "state": view.state if view else "queued"}
        if view is not None and view.state == "failed":
            entry["error"] = view.message
        reply["targets"].append(entry)
    return JSONResponse({"delivery": delivery.id, "mark": delivery.record.mark,
                         "commit": delivery.sha, "ref": delivery.ref, **reply}, status_code=202)

