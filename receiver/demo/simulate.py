"""A stand-in for Flux's controllers on the in-memory cluster: `serve --manifests DIR
--simulate-flux`. A demo and a way to try the action's wait without a cluster; never Flux.

Driven by the store's change feed, as Flux is driven by its watches: when an object gets a new
`reconcile.fluxcd.io/requestedAt` from a delivery the bridge accepted, after `delay` seconds
- a source "fetches" the pushed commit (its artifact revision becomes `<ref>@sha1:<commit>`),
  and then, like Flux, every consumer of that source applies the new artifact after another
  `delay`;
- a consumer annotated by the bridge applies its source's current artifact after `delay`.
It only marks objects reconciled (`MemoryCluster.mark_source_fetched`, `mark_applied`); it
never fails, and it ignores objects whose request it cannot tie to a push. Every line it logs
says `simulated Flux`.
"""

from __future__ import annotations

import asyncio
import logging

from receiver.bounded import BoundedMap
from receiver.delivery import marks as delivery_marks
from receiver.delivery.store import Delivery
from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import (
    CONSUMER_KINDS,
    RECONCILE_ANNOTATION,
    SOURCE_KINDS,
    FluxObject,
    ObjectKey,
    consumer_source,
)
from receiver.flux.revisions import applied_revision, commit_of
from receiver.gitea.payloads import Push

log = logging.getLogger(__name__)

NOTICE = ("Flux is simulated (serve --simulate-flux): annotated objects are marked reconciled "
          "at the pushed commit after a delay; nothing is deployed")
_REMEMBERED_PUSHES = 1024


def git_revision(ref: str, sha: str) -> str:
    """Flux's GitRepository artifact revision for a pushed ref: `main@sha1:<sha>`."""
    name = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
    return f"{name or 'HEAD'}@sha1:{sha}"


def consumer_revision(consumer: FluxObject, source_revision: str) -> str:
    """What a consumer reports having applied from a source at `source_revision`. A HelmRelease
    from Git with reconcileStrategy Revision reports a chart version carrying the commit."""
    if consumer.kind == "HelmRelease":
        return f"0.0.0+{(commit_of(source_revision) or '')[:12]}"
    return source_revision


class FluxSimulator:
    def __init__(self, cluster: MemoryCluster, delay_seconds: float) -> None:
        self._cluster = cluster
        self._delay = delay_seconds
        self._pushes: BoundedMap[str, Push] = BoundedMap(_REMEMBERED_PUSHES)  # mark -> push
        self._scheduled: dict[ObjectKey, str] = {}  # object -> requestedAt it will handle
        cluster.store.subscribe(self.on_change)

    def on_push(self, delivery: Delivery, push: Push) -> None:
        """Ingest's push listener: which commit a delivery's mark stands for."""
        self._pushes[delivery.record.mark] = push

    def on_change(self, action: str, obj: FluxObject) -> None:
        if action != "upsert" or obj.kind not in SOURCE_KINDS | CONSUMER_KINDS:
            return
        requested = obj.annotations.get(RECONCILE_ANNOTATION)
        if (not requested or requested == obj.status.get("lastHandledReconcileAt")
                or self._scheduled.get(obj.key) == requested):
            return
        push = next((self._pushes[m.mark] for m in delivery_marks.of(obj.annotations)
                     if m.mark in self._pushes), None)
        if push is None or not push.sha:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._scheduled[obj.key] = requested
        if obj.kind in SOURCE_KINDS:
            loop.call_later(self._delay, self._fetch, obj.key, requested, push)
        else:
            loop.call_later(self._delay, self._apply, obj.key, requested)

    def _done(self, key: ObjectKey, requested: str) -> FluxObject | None:
        if self._scheduled.get(key) == requested:
            del self._scheduled[key]
        obj = self._cluster.store.get(key)
        return None if obj is None or obj.suspended else obj

    def _fetch(self, key: ObjectKey, requested: str, push: Push) -> None:
        if self._done(key, requested) is None:
            return
        revision = git_revision(push.ref, push.sha)
        self._cluster.mark_source_fetched(key, revision)
        log.info("simulated Flux: source fetched", extra={
            "simulation": True, "object": f"{key.kind}/{key.namespace}/{key.name}",
            "revision": revision})
        loop = asyncio.get_running_loop()
        for consumer in self._cluster.store.consumers_of(key):
            loop.call_later(self._delay, self._apply, consumer.key, None)

    def _apply(self, key: ObjectKey, requested: str | None) -> None:
        obj = (self._done(key, requested) if requested is not None
               else self._cluster.store.get(key))
        if obj is None or obj.suspended:
            return
        ref = consumer_source(obj)
        source = self._cluster.store.get(ref.key) if ref is not None else None
        revision = applied_revision(source) if source is not None else ""
        if not commit_of(revision):
            return
        applied = consumer_revision(obj, revision)
        if applied_revision(obj) == applied and obj.condition("Ready"):
            return
        self._cluster.mark_applied(key, applied)
        log.info("simulated Flux: applied", extra={
            "simulation": True, "object": f"{key.kind}/{key.namespace}/{key.name}",
            "revision": applied})

