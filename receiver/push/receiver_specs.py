"""What a Receiver's spec compiles to, remembered per version: its resolved `resources`
(again only when the cache's shape changed), its `resourceFilter` and the `filter` of each
`resources` entry (compiled once each; an invalid one is logged once and counted)."""

from __future__ import annotations

import logging

from receiver.bounded import BoundedMap
from receiver.config import Settings
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.flux.store import ObjectStore
from receiver.metrics import Metrics
from receiver.push.cel_filter import CompiledFilter, FilterCache
from receiver.push.resources import Resolved, resolve_resources

log = logging.getLogger("receiver.web.ingest")


class ReceiverSpecs:
    def __init__(self, settings: Settings, store: ObjectStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._allow_cross_namespace = settings.allow_cross_namespace_refs
        self._resolutions: BoundedMap[ObjectKey, tuple[tuple[str, int], Resolved]] = (
            BoundedMap(10_000))
        self.filters = FilterCache()
        self._filter_invalid: dict[ObjectKey, str] = {}
        self._compiled: BoundedMap[ObjectKey, tuple[
            tuple[str, int], CompiledFilter | str | None,
            dict[ObjectKey, list[CompiledFilter]] | str]] = BoundedMap(10_000)

    def resolved(self, receiver: FluxObject) -> Resolved:
        """The Receiver's resources, resolved again only when the cache's shape changed."""
        store = self._store
        stamp = (receiver.resource_version, store.shape_version)
        cached = self._resolutions.get(receiver.key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        resolved = resolve_resources(
            receiver, store, allow_cross_namespace=self._allow_cross_namespace)
        self._resolutions[receiver.key] = (stamp, resolved)
        return resolved

    def compiled_filters(self, receiver: FluxObject) -> tuple[
            CompiledFilter | str | None, dict[ObjectKey, list[CompiledFilter]] | str]:
        """`resource_filter` and `entry_filters` together, worked out once per version of the
        Receiver and of the cache's shape: a Receiver's every push asks for both."""
        stamp = (receiver.resource_version, self._store.shape_version)
        cached = self._compiled.get(receiver.key)
        if cached is not None and cached[0] == stamp:
            return cached[1], cached[2]
        compiled, entries = self.resource_filter(receiver), self.entry_filters(receiver)
        self._compiled[receiver.key] = (stamp, compiled, entries)
        return compiled, entries

    def resource_filter(self, receiver: FluxObject) -> CompiledFilter | str | None:
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
        self._metrics.receivers_filter_invalid.set(len(self._filter_invalid))
        return result

    def entry_filters(self, receiver: FluxObject
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
                for key, expressions in self.resolved(receiver).entry_filters}
