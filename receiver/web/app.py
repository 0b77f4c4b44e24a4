"""The Starlette application: routes, lifespan, wiring. No decisions live here."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from receiver.config import Settings
from receiver.delivery.ancestry import Ancestry
from receiver.delivery.marks import replay_window
from receiver.delivery.reconcile import Reconciler
from receiver.delivery.store import DeliveryStore
from receiver.flux.cluster import Cluster
from receiver.flux.event_book import pod_note
from receiver.flux.objects import ObjectKey
from receiver.flux.recorder import EventRecorder
from receiver.giturls import normalise_aliases, normalise_oci_url, normalise_repo_url
from receiver.metrics import Metrics
from receiver.push.hookindex import HookIndex
from receiver.status.service import StatusService
from receiver.web import openapi
from receiver.web.badge import BadgeEndpoint
from receiver.web.deliveries import DeliveriesEndpoint
from receiver.web.drain import CloseWhileDraining, Drain
from receiver.web.events import EventsEndpoint
from receiver.web.flagger import FlaggerEndpoint
from receiver.web.http import (
    BodyDeadline,
    BodyTimeout,
    HeadLimit,
    Unhandled,
    body_timeout,
    client_disconnected,
    error,
)
from receiver.web.ingest import IngestService
from receiver.web.readiness import Health, readiness

log = logging.getLogger(__name__)


def url_normaliser(settings: Settings) -> Callable[[str], str | None]:
    """The one URL normaliser of a running service: aliases applied, results memoised
    (pushes name the same few repositories over and over)."""
    aliases = normalise_aliases(settings.host_aliases)

    @functools.lru_cache(maxsize=8192)
    def normalise(url: str) -> str | None:
        if url[:6].lower() == "oci://":
            return normalise_oci_url(url, aliases)
        return normalise_repo_url(url, aliases)

    return normalise


@dataclass
class Components:
    settings: Settings
    cluster: Cluster
    metrics: Metrics
    hooks: HookIndex
    deliveries: DeliveryStore
    reconciler: Reconciler
    ingest: IngestService
    follow: DeliveriesEndpoint
    statuses: StatusService
    events: EventsEndpoint
    badge: BadgeEndpoint
    drain: Drain
    recorder: EventRecorder
    ancestry: Ancestry | None = None
    flagger: FlaggerEndpoint | None = None
    # Said in every /readyz answer (e.g. that Flux is simulated): what an operator must know.
    notes: dict[str, str] = field(default_factory=dict)


def build(settings: Settings, cluster: Cluster, **status_kwargs: Any) -> Components:
    metrics = Metrics()
    # The Kubernetes backend reports every API call (list, watch, get, patch, lease).
    def observe(call: str, seconds: float, failed: bool) -> None:
        metrics.kube_latency.labels(call, str(failed).lower()).observe(seconds)

    cluster.observe = observe
    hooks = HookIndex(cluster, metrics=metrics)
    cluster.store.subscribe(hooks.on_store_change)
    deliveries = DeliveryStore(settings.deliveries.max_count, settings.deliveries.max_age_seconds)
    reconciler = Reconciler(cluster, deliveries, settings.reconcile, metrics, settings.cluster_name,
                            keep_marks_seconds=replay_window(settings.delivery_dedupe_seconds))
    ingest = IngestService(settings, cluster, hooks, reconciler, deliveries, metrics)
    recorder = EventRecorder(cluster.write_event)
    ingest.events = hooks.events = recorder.emit
    follow = DeliveriesEndpoint(settings, cluster, hooks, reconciler, deliveries)
    statuses = StatusService(settings, cluster, metrics, **status_kwargs)
    ingest.push_listeners.append(statuses.on_push_routed)
    ingest.pull_request_listeners.append(statuses.on_pull_request)
    reconciler.listeners.append(statuses.on_target_changed)

    def history_answered(key: ObjectKey) -> None:
        reconciler.reevaluate_following(key)
        follow.changes.touch(key)

    # Only a configured Gitea can say whether a later commit contains a pushed one.
    ancestry = Ancestry(statuses.ask_contains, history_answered) if settings.gitea else None
    if ancestry is not None:
        reconciler.contains = ancestry.contains
    events, badge = status_endpoints(statuses)
    return Components(settings, cluster, metrics, hooks, deliveries, reconciler, ingest, follow,
                      statuses,
                      events, badge, Drain(), recorder, ancestry,
                      FlaggerEndpoint(settings, statuses.canaries, statuses.secrets))


def status_endpoints(statuses: StatusService) -> tuple[EventsEndpoint, BadgeEndpoint]:
    """`POST /events` and `GET /badge/...` over the status side's parts."""
    return (EventsEndpoint(statuses.settings, statuses.templates, statuses.locator,
                           statuses.secrets, statuses.queue, statuses.metrics,
                           statuses.pending_events.on_event, statuses.canaries.on_applied),
            BadgeEndpoint(statuses.settings, statuses.cluster, statuses.secrets,
                          statuses.environments))


def flagger_routes(flagger: FlaggerEndpoint | None) -> list[Route]:
    """Flagger's webhooks (answer 404 while `statuses.canaries` is off)."""
    if flagger is None:
        return []
    return [Route("/flagger/gates/{gate}", flagger.gate, methods=["POST"]),
            Route("/flagger/gates/{gate}/rollback", flagger.rollback, methods=["POST"]),
            Route("/flagger/events", flagger.event, methods=["POST"])]


def create_app(settings: Settings, cluster: Cluster, **status_kwargs: Any) -> Starlette:
    parts = build(settings, cluster, **status_kwargs)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await cluster.start()
        await parts.recorder.start()
        await parts.hooks.refresh_all()
        # The cache is long-lived: keep the cyclic GC from walking it on every full collection
        # (a full pass over 10,000+ objects is a latency spike on the hook path).
        gc.collect()
        gc.freeze()
        # Deliveries allocate many small containers. Measured (docs/benchmarks.md §1b), at a
        # fixed half of saturation: p99 7.7 ms with these thresholds, 43 ms with the default
        # (700, 10, 10), whose more frequent full collections walk every delivery in flight.
        gc.set_threshold(50_000, 20, 20)
        await parts.statuses.start()
        log.info("gitea-flux-bridge started", extra={
            "cluster": settings.cluster_name, "objects": len(cluster.store),
            "receivers": len(parts.hooks)})
        try:
            yield
        finally:
            # Shutdown without a drain (tests, a server that got no signal): waits end now.
            parts.drain.begin("shutting_down")
            await parts.statuses.stop(settings.shutdown.flush_seconds)
            await parts.reconciler.stop()
            await parts.ingest.filter_sandbox.stop()
            if parts.ancestry is not None:
                await parts.ancestry.stop()
            await parts.recorder.stop()
            await cluster.stop()

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    indexed_once = False
    # The bridge's own Pod (the chart sets both), for Events about the bridge itself.
    pod_name, pod_namespace = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
    pod = (pod_namespace, pod_name) if pod_name and pod_namespace else None

    async def readyz(request: Request) -> Response:
        nonlocal indexed_once
        first_indexing = not indexed_once and parts.hooks.indexing
        health = Health(
            draining=parts.drain.draining, synced=cluster.synced,
            failing_watches=cluster.sync_errors, first_indexing=first_indexing,
            # Read only when no earlier reason already keeps traffic away.
            unreadable_secrets=(await parts.statuses.unreadable_secrets()
                                if cluster.synced and not cluster.sync_errors
                                and not first_indexing and not parts.drain.draining else {}),
            objects=len(cluster.store), receivers=len(parts.hooks),
            not_installed=cluster.not_installed, not_permitted=cluster.not_permitted,
            unusable_receivers=parts.hooks.unusable(), notes=parts.notes)
        status, body = readiness(health)
        if health.unreadable_secrets and pod is not None:
            # Readiness probes repeat this every few seconds: the book makes it one Event.
            for setting, why in sorted(health.unreadable_secrets.items()):
                parts.recorder.emit(pod_note(*pod, "Warning", "SecretUnreadable",
                                             f"{setting}: {why}; /readyz answers 503"))
        if cluster.synced and not cluster.sync_errors and not first_indexing:
            indexed_once = True
        return JSONResponse(body, status_code=status)

    async def metrics(request: Request) -> Response:
        parts.metrics.status_queue_depth.set(parts.statuses.queue_depth)
        parts.metrics.cache_synced.set(1 if cluster.synced else 0)
        parts.metrics.watches_failing.set(len(cluster.sync_errors))
        parts.metrics.kinds_not_installed.set(len(cluster.not_installed))
        parts.metrics.kinds_not_permitted.set(len(cluster.not_permitted))
        return Response(generate_latest(parts.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(request: Request) -> Response:
        return Response(openapi.rendered(), media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        response = error(exc.status_code, str(exc.detail).lower())
        # A 405 carries `Allow` (RFC 9110 requires it); keep whatever headers Starlette set.
        response.headers.update(exc.headers or {})
        return response

    routes = [
        Route("/hook/{digest}", parts.ingest.hook, methods=["POST"]),
        Route("/deliveries/{id}", parts.follow.handle, methods=["GET"]),
        Route("/events", parts.events.handle, methods=["POST"]),
        Route("/badge/{path:path}", parts.badge.handle, methods=["GET"]),
        *flagger_routes(parts.flagger),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        # Unhandled first: whatever the others raise is answered and logged there, once.
        middleware=[Middleware(Unhandled), Middleware(HeadLimit),
                    Middleware(CloseWhileDraining, drain=parts.drain),
                    Middleware(BodyDeadline, seconds=settings.server.body_timeout_seconds)],
        exception_handlers={HTTPException: http_error, ClientDisconnect: client_disconnected,
                            BodyTimeout: body_timeout},
    )
    # A POST to /hook/<digest>/ must not be redirected: Gitea would not follow it.
    app.router.redirect_slashes = False
    app.state.parts = parts
    return app
