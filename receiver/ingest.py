"""`POST /hook/{digest}` and `GET /deliveries/{id}`: validate, then act.

Order of checks, cheapest and least revealing first: declared size (413), cache synced (503),
known path (404), suspended receiver (503), capped body read (413), content type (415),
signature (401, one body for every failure), one-time signature replay (401), rate (429,
counted only for authenticated requests so strangers cannot use up a receiver's budget), event
type (200 pong / ignored), repeated X-Gitea-Delivery (200 duplicate), JSON (400), payload shape
(422), capacity (503), then routing and 202.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from receiver import signatures
from receiver.config import Settings
from receiver.deliveries import Delivery, DeliveryStore
from receiver.flux.cluster import Cluster
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.gitea.payloads import (
    PayloadError,
    Push,
    form_payload,
    parse_actions_body,
    parse_gitea_push,
)
from receiver.hookindex import HookIndex
from receiver.http import (
    UNAUTHORIZED,
    BodyTooLarge,
    declared_too_large,
    error,
    media_type,
    read_capped,
)
from receiver.logs import delivery_id as delivery_ctx
from receiver.metrics import Metrics
from receiver.ratelimit import RateLimiter
from receiver.reconcile import Reconciler
from receiver.replay import SeenOnce
from receiver.resources import Resolved, resolve_resources
from receiver.routing import plan_push

log = logging.getLogger(__name__)
JSON_TYPES = frozenset({"application/json"})
FORM_TYPE = "application/x-www-form-urlencoded"
UNSUPPORTED_MEDIA = ("content type must be application/json "
                     "(or application/x-www-form-urlencoded for Gitea webhooks)")
PushListener = Callable[[Delivery, Push], None]


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
        self.seen_deliveries = SeenOnce()
        self.seen_signatures = SeenOnce()
        limits = settings.rate_limit
        self.rate = RateLimiter(limits.requests_per_second, limits.burst)
        self.push_listeners: list[PushListener] = []
        self._resolutions: dict[ObjectKey, tuple[tuple[str, int], Resolved]] = {}

    # -- authentication ---------------------------------------------------------------------

    def _verify(
        self, receiver: FluxObject, token: str, request: Request, body: bytes, kind: str
    ) -> _Authenticated | Response:
        headers = request.headers
        rtype = receiver.spec.get("type")
        signed = body
        if kind == FORM_TYPE and body:
            # Decoded for every type, so the answer before authentication says nothing of it.
            try:
                payload = form_payload(body)
            except PayloadError as exc:
                return error(400, str(exc))
            # Gitea signs the JSON document, not the form-encoded body it sends.
            signed = payload if rtype == "github" else body
        if rtype == "github":
            verdict = signatures.verify_gitea(headers, signed, token)
        elif rtype == "generic-hmac":
            verdict = signatures.verify_generic_hmac(headers, body, token)
        else:
            verdict = signatures.verify_generic(
                headers, body, token, self.wall_clock(),
                allow_unsigned=self.settings.insecure.allow_unsigned_generic,
            )
        return _Authenticated(verdict, signed)

    async def _authenticate(
        self, receiver: FluxObject, token: str, request: Request, body: bytes, kind: str
    ) -> _Authenticated | Response:
        result = self._verify(receiver, token, request, body, kind)
        if isinstance(result, _Authenticated) and not result.verdict.ok and (
            result.verdict.reason == "mismatch"
        ):
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
        try:
            body = await read_capped(request, limit)
        except BodyTooLarge:
            return self._count(name, "too_large", error(413, f"body exceeds {limit} bytes"))
        kind = media_type(request)
        # Before authentication every answer is the same whatever the Receiver's type.
        if body and kind not in JSON_TYPES and kind != FORM_TYPE:
            return self._count(name, "unsupported_media", error(415, UNSUPPORTED_MEDIA))
        auth = await self._authenticate(receiver, token, request, body, kind)
        if isinstance(auth, Response):
            return self._count(name, "bad_request", auth)
        verdict = auth.verdict
        if not verdict.ok:
            self.metrics.signature_failures.labels(verdict.scheme, verdict.reason).inc()
            log.info("signature rejected", extra={"receiver": name, "scheme": verdict.scheme,
                                                  "reason": verdict.reason})
            return self._count(name, "unauthorized", JSONResponse(UNAUTHORIZED, 401))
        if body and kind == FORM_TYPE and receiver.spec.get("type") != "github":
            return self._count(name, "unsupported_media", error(
                415, "content type must be application/json"))
        now = self.wall_clock()
        if verdict.replay_key and not self.seen_signatures.first(
            verdict.replay_key, verdict.replay_until, now
        ):
            self.metrics.signature_failures.labels(verdict.scheme, "replayed").inc()
            log.info("signature replayed", extra={"receiver": name})
            return self._count(name, "unauthorized", JSONResponse(UNAUTHORIZED, 401))
        if not self.rate.allow(name, time.monotonic()):
            return self._count(name, "rate_limited", error(429, "rate limit exceeded"))

        event = (request.headers.get("x-gitea-event") or request.headers.get("x-github-event")
                 or "").strip().lower()
        gitea_id = request.headers.get("x-gitea-delivery", "").strip()[:128]
        delivery = gitea_id or str(uuid.uuid4())
        if gitea_id and self.deliveries.get(gitea_id) is not None:
            # The id is another receiver's (dedupe is per receiver): never overwrite its record.
            delivery = str(uuid.uuid4())
        token_ctx = delivery_ctx.set(delivery)
        try:
            if event == "ping":
                return self._count(name, "ping", JSONResponse({"status": "pong"}))
            if event and event != "push":
                return self._count(name, "ignored", JSONResponse(
                    {"status": "ignored", "event": event[:64]}))
            if gitea_id and not self.seen_deliveries.first(
                f"{name}/{gitea_id}", now + self.settings.delivery_dedupe_seconds, now
            ):
                return self._count(name, "duplicate", JSONResponse(
                    {"status": "duplicate", "delivery": gitea_id}))
            return await self._accept(request, receiver, name, delivery, event, auth.signed, body)
        finally:
            delivery_ctx.reset(token_ctx)

    async def _accept(
        self, request: Request, receiver: FluxObject, name: str, delivery_id: str, event: str,
        signed: bytes, body: bytes,
    ) -> Response:
        push: Push | None = None
        if event == "push" or (receiver.spec.get("type") == "github" and body):
            doc = _load_json(signed)
            if doc is _INVALID:
                return self._count(name, "bad_json", error(400, "body is not valid JSON"))
            try:
                push = parse_gitea_push(doc)
            except PayloadError as exc:
                return self._count(name, "unprocessable", error(422, str(exc)))
        elif body.strip():
            doc = _load_json(body)
            if doc is _INVALID:
                return self._count(name, "bad_json", error(400, "body is not valid JSON"))
            if doc not in ({}, None):
                try:
                    push = parse_actions_body(doc)
                except PayloadError as exc:
                    return self._count(name, "unprocessable", error(422, str(exc)))
        if self.deliveries.active_count >= self.settings.deliveries.max_count:
            return self._count(name, "overloaded", error(503, "too many deliveries in flight"))
        plan = plan_push(
            receiver, push, self.cluster.store,
            allow_cross_namespace=self.settings.allow_cross_namespace_refs,
            resolved=self._resolved(receiver),
        )
        delivery = Delivery.create(
            delivery_id, name, push.ref if push else "", push.sha if push else "", plan
        )
        for listener in self.push_listeners:
            if push is not None:
                listener(delivery, push)
        await self.reconciler.start_delivery(delivery)
        log.info("push accepted", extra={
            "receiver": name, "ref": delivery.ref, "commit": delivery.sha,
            "targets": len(plan.targets), "tracked": len(plan.tracked)})
        reply = plan.as_dict()
        states = delivery.targets
        reply["targets"] = [
            {**t.as_dict(), "state": states[t.key].state,
             **({"error": states[t.key].message} if states[t.key].state == "failed" else {})}
            for t in plan.targets
        ]
        return self._count(name, "accepted", JSONResponse(
            {"delivery": delivery_id, "commit": delivery.sha, "ref": delivery.ref, **reply},
            status_code=202))

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

    def _count(self, receiver: str, outcome: str, response: Response) -> Response:
        self.metrics.hook_requests.labels(receiver, outcome).inc()
        return response

    # -- GET /deliveries/{id} ---------------------------------------------------------------

    def _authorised_for(self, request: Request, delivery: Delivery) -> bool:
        """Read access needs the receiver's token: bearer, or a fresh read signature for this
        delivery (`signatures.verify_read`: never valid as a push, nor a push as it). Read-only,
        so the one-time rule of the push is not applied."""
        namespace, _, rname = delivery.receiver.partition("/")
        token = self.hooks.token_of(ObjectKey("Receiver", namespace, rname))
        if token is None:
            return False
        headers = request.headers
        if headers.get("x-signature"):
            return signatures.verify_read(
                headers["x-signature"], delivery.id, token, self.wall_clock()).ok
        return signatures.verify_bearer(headers, token).ok

    async def delivery(self, request: Request) -> Response:
        found = self.deliveries.get(request.path_params["id"][:128])
        # Unknown and unauthorised look the same, so ids cannot be probed.
        if found is None or not self._authorised_for(request, found):
            return error(404, "no such delivery")
        delivery = found
        raw_wait = request.query_params.get("wait")
        if raw_wait is None:
            return JSONResponse(delivery.as_dict())
        try:
            wait = min(float(raw_wait), self.settings.deliveries.max_wait_seconds)
        except ValueError:
            return error(400, "wait must be a number of seconds")
        if wait != wait or wait < 0:  # NaN or negative
            return error(400, "wait must be a number of seconds")
        return StreamingResponse(_stream(delivery, wait), media_type="application/x-ndjson")


async def _stream(delivery: Delivery, wait: float) -> Any:
    """Newline-delimited JSON: the state now, then on every change, until final or time is up."""
    deadline = time.monotonic() + wait
    seen = -1
    while True:
        if delivery.version != seen:
            seen = delivery.version
            yield json.dumps(delivery.as_dict()) + "\n"
        remaining = deadline - time.monotonic()
        if delivery.settled or remaining <= 0:
            if not delivery.settled:
                yield json.dumps({"delivery": delivery.id, "timeout": True,
                                  "outcome": delivery.outcome()}) + "\n"
            return
        async with delivery.changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    delivery.changed.wait_for(_changed_since(delivery, seen)),
                    timeout=min(remaining, 15.0))


def _changed_since(delivery: Delivery, version: int) -> Callable[[], bool]:
    return lambda: delivery.version != version


_INVALID = object()


def _load_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return _INVALID
