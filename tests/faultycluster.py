"""The memory backend with the failures a test asks for (the product's backend has none)."""

from __future__ import annotations

from collections.abc import Mapping

from receiver.flux.cluster import error_for_status
from receiver.flux.event_book import EventWrite
from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import FluxObject, ObjectKey


class FaultyCluster(MemoryCluster):
    """`fail_next_patches`: HTTP-like statuses the next patches fail with, in order, as the
    API server would answer them (409 a conflict, 5xx retryable, 403 for good)."""

    fail_next_patches: list[int]

    async def annotate(self, key: ObjectKey, annotations: Mapping[str, str], *,
                       resource_version: str | None = None) -> FluxObject:
        failures = self.__dict__.setdefault("fail_next_patches", [])
        if failures:
            status = failures.pop(0)
            raise error_for_status(f"patch {key} failed with {status}", status)
        return await super().annotate(key, annotations, resource_version=resource_version)

    async def write_event(self, write: EventWrite) -> None:
        """`fail_events`: every Event write fails, as an API server that refuses them."""
        if self.__dict__.get("fail_events"):
            raise error_for_status(f"event {write.name} refused", 403)
        await super().write_event(write)
