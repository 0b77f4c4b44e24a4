"""`POST /events`: Flux notification-controller events (Provider `generic` or `generic-hmac`).

Validate, then act: size and media type, then authentication (HMAC over the raw bytes or a
bearer token; unsigned only behind the insecure switch), then the event, then the mapping to
statuses (`statuses.desired_from_event`), queued with the body's digest so a redelivery of the
same event is known; the object's own queued status is told to `on_queued` (a consumer's
`pending` is followed until its live state moves on: `status.settle`). A Kustomization's or
HelmRelease's `success` goes with the `pending` of the canaries whose target it applied
(`companions`, from `CanaryStatuses.on_applied`): Flagger has not started their analysis yet.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from receiver.config import Settings
from receiver.flux.objects import CONSUMER_KINDS, ObjectKey
from receiver.metrics import Metrics
from receiver.signatures import Signed, verify_bearer, verify_event
from receiver.status.decisions import MAPPED, DesiredStatus, desired_from_event
from receiver.status.flux_events import EventError, FluxEvent, parse_event
from receiver.status.locator import Locator
from receiver.status.queue import StatusQueue
from receiver.status.secrets import SecretReader
from receiver.templates import StatusTemplates
from receiver.times import epoch_seconds
from receiver.web.http import (
    UNAUTHORIZED,
    VERIFIER,
    BodyTooLarge,
    declared_too_large,
    error,
    media_type,
    read_parts,
    whole_body,
)


class EventsEndpoint:
    def __init__(self, settings: Settings, templates: StatusTemplates, locator: Locator,
                 secrets: SecretReader, queue: StatusQueue, metrics: Metrics,
                 on_queued: Callable[[ObjectKey, DesiredStatus], None] | None = None,
                 companions: Callable[[ObjectKey, DesiredStatus, float | None],
                                      list[DesiredStatus]] | None = None) -> None:
        self._companions = companions
        self._settings = settings
        self._on_queued = on_queued
        self._templates = templates
        self._locator = locator
        self._secrets = secrets
        self._queue = queue
        self._metrics = metrics

    def _count(self, outcome: str, response: Response) -> Response:
        self._metrics.events.labels(outcome).inc()
        return response

    async def handle(self, request: Request) -> Response:
        limit = self._settings.body_limit_bytes
        if declared_too_large(request.headers, limit):
            return self._count("too_large", error(413, "body too large"))
        if media_type(request.headers) != "application/json":
            return self._count("unsupported_media_type",
                               error(415, "content type must be application/json"))
        try:
            parts = await read_parts(request, limit)
        except BodyTooLarge:
            return self._count("too_large", error(413, "body too large"))
        if not await self._authorised(request, parts):
            return self._count("unauthorized", JSONResponse(UNAUTHORIZED, status_code=401))
        body = whole_body(parts)  # only now: a stranger's large body is never joined
        try:
            event = parse_event(body)
        except EventError as exc:
            return self._count("invalid", error(exc.status, str(exc)))
        if not self._queue.accepting:
            return self._count("shutting_down", error(503, "shutting down"))
        outcome, wanted = self._map_event(event)
        if not wanted:
            return self._count(outcome, _accepted(0))
        # An identical body is a redelivery of the same event; any other event is news.
        enqueued = self._queue.enqueue(wanted, state_only=False,
                                       origin=hashlib.sha256(body).hexdigest()[:16])
        if enqueued is None:
            return self._count("queue_full", error(503, "status queue is full"))
        if self._on_queued is not None:
            # The object's own status is last; the canaries' that go with it are not its own
            # progress and are settled by the canary rules.
            inv = event.involved
            self._on_queued(ObjectKey(inv.kind, inv.namespace, inv.name), wanted[-1])
        return self._count("accepted", _accepted(enqueued))

    def _map_event(self, event: FluxEvent) -> tuple[str, list[DesiredStatus]]:
        inv = event.involved
        obj, source = self._locator.object_and_source(ObjectKey(inv.kind, inv.namespace, inv.name))
        mapping = desired_from_event(event, obj, source, self._templates, self._locator.normalise)
        if mapping.outcome != MAPPED or mapping.status is None:
            return mapping.outcome, []
        if not self._locator.instances(mapping.status.repo_key):
            return "no_instance", []
        key = ObjectKey(inv.kind, inv.namespace, inv.name)
        if self._companions is not None and key.kind in CONSUMER_KINDS:
            with_canaries = self._companions(key, mapping.status, epoch_seconds(event.timestamp))
            return mapping.outcome, [*with_canaries, mapping.status]
        return mapping.outcome, [mapping.status]  # the object's own status last (see `on_queued`)

    async def _authorised(self, request: Request, body: Signed) -> bool:
        """HMAC over the raw bytes or a bearer token; unsigned only behind the insecure switch.

        Presented credentials that do not verify are refused even when unsigned events are
        allowed: a wrong signature is a misconfiguration worth seeing.
        """
        headers = request.headers
        events = self._settings.events
        presented = False
        signature = headers.get("x-signature", "").strip()
        if signature:
            presented = True
            token = await self._secrets.read_or_none(events.hmac_token)
            # Flux's generic-hmac Provider signs with SHA-256 only; accept nothing weaker.
            if token is not None and not signature.lower().startswith("sha256="):
                self._metrics.signature_failures.labels("events-hmac", "algorithm").inc()
            elif token is not None:
                # A large body is verified off the loop (`web.http.VERIFIER`).
                verdict = verify_event(headers, body, token) if isinstance(body, bytes) \
                    else await asyncio.get_running_loop().run_in_executor(
                        VERIFIER, verify_event, headers, body, token)
                if verdict.ok:
                    return True
                self._metrics.signature_failures.labels("events-hmac", verdict.reason).inc()
        if headers.get("authorization", "").strip():
            presented = True
            token = await self._secrets.read_or_none(events.bearer_token)
            if token is not None:
                verdict = verify_bearer(headers, token)
                if verdict.ok:
                    return True
                self._metrics.signature_failures.labels("events-bearer", verdict.reason).inc()
        if not presented and self._settings.insecure.allow_unsigned_events:
            return True
        if not presented:
            self._metrics.signature_failures.labels("events", "missing").inc()
        return False


def _accepted(count: int) -> Response:
    return JSONResponse({"accepted": True, "statuses": count}, status_code=202)
