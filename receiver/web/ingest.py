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
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from receiver import signatures
from receiver.config import Settings
from receiver.delivery import marks as delivery_marks
from receiver.delivery.marks import fresh_mark, marks_for
from receiver.delivery.patches import request_value
from receiver.delivery.reconcile import Reconciler
from receiver.delivery.record import DeliveryRecord, encode
from receiver.delivery.store import Delivery, DeliveryStore, record_targets
from receiver.flux.cluster import Cluster, ClusterError
from receiver.flux.event_book import EventNote
from receiver.flux.objects import RECONCILE_ANNOTATION, FluxObject, ObjectKey
from receiver.gitea.payloads import PayloadError, Push, form_payload
from receiver.gitea.ref_payloads import PullRequestEvent
from receiver.logs import delivery_id as delivery_ctx
from receiver.metrics import Metrics
from receiver.push import spec_events
from receiver.push.cel_filter import CompiledFilter, RequestNotJSON
from receiver.push.cel_sandbox import FilterBudgetExceeded, FilterBusy, FilterSandbox
from receiver.push.hookindex import HookIndex
from receiver.push.mismatch import unmatched
from receiver.push.plan_cache import PlanCache
from receiver.push.push_events import filter_note, push_notes
from receiver.push.receiver_specs import ReceiverSpecs
from receiver.push.replay import SeenOnce
from receiver.push.resource_filter import FilterEvaluationError, narrow
from receiver.push.routing import Plan
from receiver.push.selector import PayloadRefused, select_payload
from receiver.web.http import (
    UNAUTHORIZED,
    VERIFIER,
    BodyTooLarge,
    declared_too_large,
    error,
    header_map,
    media_type,
    read_parts,
    whole_body,
)
from receiver.web.ratelimit import RateLimiter
from receiver.web.replies import accepted_reply, record_ref

log = logging.getLogger(__name__)
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
    body: bytes = b""  # the raw body, joined once the signature holds (b"" until it does)


def _held(verdict: signatures.Verdict, signed: signatures.Signed) -> _Authenticated:
    """A verdict over the raw body; the body is joined only for a request that passed."""
    body = whole_body(signed) if verdict.ok else b""
    return _Authenticated(verdict, body, body)


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
        limits = settings.rate_limit
        self.rate = RateLimiter(limits.requests_per_second, limits.burst)
        self.push_listeners: list[PushListener] = []
        # Told of every accepted pull_request webhook (the status side's previews).
        self.pull_request_listeners: list[Callable[[PullRequestEvent], object]] = []
        self.gitea_prefixes = settings.gitea_prefixes()
        self.specs = ReceiverSpecs(settings, cluster.store, metrics)
        self.filter_sandbox = FilterSandbox()
        self.plans = PlanCache(cluster.store,
                               allow_cross_namespace=settings.allow_cross_namespace_refs,
                               gitea_prefixes=self.gitea_prefixes)
        self._counters: dict[tuple[str, str], Any] = {}
        # Kubernetes Events (set by the app): told, never awaited, so no answer waits on them.
        self.events: Callable[[EventNote], None] = lambda note: None

    # -- authentication ---------------------------------------------------------------------

    def _verify(
        self, receiver: FluxObject, token: str, headers: Mapping[str, str],
        body: signatures.Signed, kind: str
    ) -> _Authenticated:
        rtype = receiver.spec.get("type")
        if rtype == "github":
            if kind == FORM_TYPE and body:
                # Gitea signs the JSON document, not the form-encoded body it sends; a form
                # without that document cannot carry a valid signature (go-github alike).
                raw = whole_body(body)
                try:
                    signed = form_payload(raw)
                except PayloadError:
                    return _Authenticated(
                        signatures.Verdict(False, "gitea-sha256", "undecodable-form"), raw)
                return _Authenticated(signatures.verify_gitea(headers, signed, token), signed,
                                      raw)
            return _held(signatures.verify_gitea(headers, body, token), body)
        # generic and generic-hmac sign the raw bytes, whatever their content type (as Flux).
        if rtype == "generic-hmac":
            verdict = signatures.verify_generic_hmac(headers, body, token)
        else:
            verdict = signatures.verify_generic(
                headers, body, token, self.wall_clock(),
                allow_unsigned=self.settings.insecure.allow_unsigned_generic,
            )
        return _held(verdict, body)

    async def _authenticate(
        self, receiver: FluxObject, token: str, headers: Mapping[str, str],
        body: signatures.Signed, kind: str
    ) -> _Authenticated:
        result = await self._verify_off_loop(receiver, token, headers, body, kind)
        if not result.verdict.ok and result.verdict.reason == "mismatch":
            # The token may have been rotated since we cached it: read it again, once.
            fresh = await self.hooks.refresh(receiver.key, fresh=True)
            if fresh is not None and fresh != token:
                result = await self._verify_off_loop(receiver, fresh, headers, body, kind)
        return result

    async def _verify_off_loop(self, receiver: FluxObject, token: str,
                               headers: Mapping[str, str], body: signatures.Signed,
                               kind: str) -> _Authenticated:
        """`_verify`, on the verification thread for a large body (`read_parts` leaves it in
        chunks): an HMAC of 3 MiB or a form's decoding takes 5-20 ms, and a flood of them
        would hold the event loop for all of it. The HMAC releases the GIL; the decoding holds
        it only for each of its few C steps."""
        if isinstance(body, bytes):
            return self._verify(receiver, token, headers, body, kind)
        return await asyncio.get_running_loop().run_in_executor(
            VERIFIER, self._verify, receiver, token, headers, body, kind)

    # -- POST /hook/{digest} ----------------------------------------------------------------

    async def hook(self, request: Request) -> Response:
        limit = self.settings.body_limit_bytes
        headers = header_map(request.scope)
        if declared_too_large(headers, limit):
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
        compiled, entries = self.specs.compiled_filters(receiver)
        if isinstance(compiled, str) or isinstance(entries, str):
            # Flux marks such a Receiver Stalled (InvalidCELExpression) and answers 503.
            self.events(filter_note(receiver, "spec.resourceFilter" if isinstance(compiled, str)
                                    else "spec.resources[].filter"))
            return self._count(name, "filter_invalid", error(
                503, "receiver is not ready: invalid spec.resourceFilter"
                if isinstance(compiled, str) else
                "receiver is not ready: invalid spec.resources[].filter"))
        try:
            parts = await read_parts(request, limit)
        except BodyTooLarge:
            return self._count(name, "too_large", error(413, f"body exceeds {limit} bytes"))
        kind = media_type(headers)
        # Before authentication every answer is the same whatever the Receiver's type: nothing
        # about the body is judged until its signature holds.
        auth = await self._authenticate(receiver, token, headers, parts, kind)
        verdict = auth.verdict
        if not verdict.ok:
            self.metrics.signature_failures.labels(verdict.scheme, verdict.reason).inc()
            log.info("signature rejected", extra={"receiver": name, "scheme": verdict.scheme,
                                                  "reason": verdict.reason})
            return self._count(name, "unauthorized", JSONResponse(UNAUTHORIZED, 401))
        body = auth.body
        if spec_events.refuses_media(receiver, kind, bool(body)):
            return self._count(name, "unsupported_media", error(415, UNSUPPORTED_MEDIA))
        # spec.events is matched against X-GitHub-Event alone, as Flux does (Gitea sends it with
        # every webhook); X-Gitea-Event is read below to tell a ping or another event apart.
        refused = spec_events.refusal(receiver, headers.get("x-github-event", ""))
        if refused is not None:
            return self._count(name, "event_refused", error(400, refused))
        now = self.wall_clock()
        once = self._once(name, verdict, headers, now)
        if once is not None and once.scheme_replay and once.mark in self.seen:
            return self._replayed(name, verdict)
        if not self.rate.allow(name, time.monotonic()):
            return self._count(name, "rate_limited", error(429, "rate limit exceeded"))

        token_ctx = delivery_ctx.set(once.label if once is not None else "-")
        try:
            answer = spec_events.answer_without_push(
                receiver, spec_events.event_name(headers))
            if answer is not None:
                outcome = "ping" if answer["status"] == "pong" else "ignored"
                return self._count(name, outcome, JSONResponse(answer))
            if once is not None and not once.scheme_replay and once.mark in self.seen:
                return self._duplicate(name, once)
            return await self._accept(receiver, token, name, once, auth.signed,
                                      compiled=compiled, entries=entries, request_body=(
                                          headers.get("content-type", ""), body))
        finally:
            delivery_ctx.reset(token_ctx)

    def _once(self, name: str, verdict: signatures.Verdict, headers: Mapping[str, str],
              now: float) -> _Once | None:
        """What makes this request one of a kind: its one-time signature, or Gitea's delivery
        id. Its mark is written on every object the push annotates, so a repeat is known on
        every replica, not only the one that saw the first."""
        if verdict.replay_key:
            mark, legacy = marks_for(name, "sig:" + verdict.replay_key)
            return _Once(mark, verdict.replay_until, scheme_replay=True, label=mark,
                         legacy=legacy)
        gitea_id = headers.get("x-gitea-delivery", "").strip()[:128]
        if gitea_id:
            mark, legacy = marks_for(name, "gitea:" + gitea_id)
            return _Once(mark, now + self.settings.delivery_dedupe_seconds, scheme_replay=False,
                         label=gitea_id, gitea_id=gitea_id, legacy=legacy)
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
        *, compiled: CompiledFilter | None = None,
        entries: dict[ObjectKey, list[CompiledFilter]] | None = None,
        request_body: tuple[str, bytes] = ("", b""),
    ) -> Response:
        try:
            selection = select_payload(str(receiver.spec.get("type") or ""), signed)
        except PayloadRefused as exc:
            return self._count(name, exc.outcome, error(exc.status, exc.message))
        push = selection.push
        listed = self.specs.resolved(receiver).keys
        joined = self._joined(name, push, once, listed)
        if joined is not None:
            return joined
        if self.deliveries.active_count >= self.settings.deliveries.max_count:
            return self._count(name, "overloaded", error(503, "too many deliveries in flight"))
        plan = self.plans.plan(receiver, selection, self.specs.resolved(receiver))
        # Why nothing matched is about the push, not the filter: ask before filtering.
        mismatch = unmatched(push, self.cluster.store) if not plan.targets else None
        if compiled is not None or entries:
            filtered = await self._filtered(name, plan, compiled, entries or {}, request_body)
            if isinstance(filtered, Response):
                return filtered
            plan = filtered
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
        record = DeliveryRecord(name, push.sha if push else "", record_ref(selection),
                                round(now, 3), mark, record_targets(plan))
        delivery_id, _ = encode(record, token)
        delivery = Delivery.from_record(delivery_id, record, plan)
        for listener in self.push_listeners:
            if push is not None:
                listener(delivery, push)
        if selection.pull_request is not None:
            for told in self.pull_request_listeners:
                told(selection.pull_request)
        if await self.reconciler.start_delivery(delivery) and once is not None:
            # Another replica took this very request first; our cache had not seen its mark
            # yet, and the conditional patch found it on the objects: refused as a repeat.
            if once.scheme_replay:
                return self._replayed(name, signatures.Verdict(True, "timestamped", ""))
            return self._duplicate(name, once)
        annotated = await self._annotate_only(plan)
        for note in push_notes(
                receiver, plan, self.cluster.store, ref=delivery.ref, sha=delivery.sha,
                annotated=[f"{a['kind']}/{a['namespace']}/{a['name']}" for a in annotated
                           if a.get("state") == "annotated"],
                unmatched=mismatch.message if mismatch is not None else ""):
            self.events(note)
        if mismatch is not None:
            self.metrics.pushes_unmatched.labels(mismatch.reason).inc()
            log.info("push matched no source", extra={
                "receiver": name, "reason": mismatch.reason, "detail": mismatch.message})
        # `mark` is short and on the objects; `id` is what a client follows with.
        log.info("push accepted", extra={
            "receiver": name, "ref": delivery.ref, "commit": delivery.sha, "mark": mark,
            "id": delivery_id, "targets": len(plan.targets), "tracked": len(plan.tracked)})
        return self._count(name, "accepted", accepted_reply(delivery, plan, listed, annotated,
                                                       mismatch))

    async def _filtered(self, name: str, plan: Plan, compiled: CompiledFilter | None,
                        entries: Mapping[ObjectKey, Sequence[CompiledFilter]],
                        request_body: tuple[str, bytes]) -> Plan | Response:
        """The plan narrowed by the Receiver's `resourceFilter`, then by the filters of the
        `spec.resources` entries that list an object, each evaluated in its own process within
        a time and memory budget (`cel_sandbox`); or the answer that refuses the request."""
        content_type, body = request_body
        try:
            return await narrow(plan, compiled, entries, self.filter_sandbox.evaluate,
                                content_type, body, self.cluster.store)
        except RequestNotJSON as exc:
            return self._count(name, "bad_json", error(400, str(exc)))
        except FilterBusy as exc:
            return self._count(name, "overloaded", error(503, str(exc)))
        except FilterBudgetExceeded as exc:
            log.warning("resourceFilter stopped", extra={"receiver": name, "reason": str(exc)})
            return self._count(name, "unprocessable", error(422, str(exc)))
        except FilterEvaluationError as exc:
            log.info("resourceFilter could not be evaluated", extra={
                "receiver": name, "reason": exc.reason})
            return self._count(name, "unprocessable", error(422, str(exc)))

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

    def _joined(self, name: str, push: Push | None, once: _Once | None,
                listed: Collection[ObjectKey]) -> Response | None:
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
        return self._count(name, "joined", accepted_reply(delivery, delivery.plan, listed))

    def _count(self, receiver: str, outcome: str, response: Response) -> Response:
        counter = self._counters.get((receiver, outcome))
        if counter is None:
            # `labels()` takes a lock and builds its key on every call: look each series up
            # once. Bounded like the series themselves (Receivers times outcomes).
            if len(self._counters) >= 4096:
                self._counters.clear()
            counter = self.metrics.hook_requests.labels(receiver, outcome)
            self._counters[(receiver, outcome)] = counter
        counter.inc()
        return response
