"""Wake-ups for whoever waits on some objects to change (the `?wait` streams)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator

from receiver.delivery.record import DeliveryRecord
from receiver.delivery.view import Lookup
from receiver.flux.objects import FluxObject, ObjectKey, consumer_source
from receiver.flux.store import ObjectStore


def watched_keys(record: DeliveryRecord, lookup: Lookup) -> set[ObjectKey]:
    """A delivery's objects and their sources: the ones whose change can move its state."""
    keys: set[ObjectKey] = set()
    for target in record.targets:
        keys.add(target.key)
        obj = lookup(target.key)
        src = consumer_source(obj) if obj is not None else None
        if src is not None:
            keys.add(src.key)
    return keys


class ChangeFeed:
    """Sets an event for every waiter on a key when the cache changes that object."""

    def __init__(self, store: ObjectStore) -> None:
        self._waiters: dict[ObjectKey, set[asyncio.Event]] = defaultdict(set)
        store.subscribe(self._on_change)

    @property
    def waiting(self) -> int:
        """How many objects someone waits on now."""
        return len(self._waiters)

    def _on_change(self, op: str, obj: FluxObject) -> None:
        self.touch(obj.key)

    def touch(self, key: ObjectKey) -> None:
        """Wake whoever waits on `key`: something its state depends on changed."""
        for event in self._waiters.get(key, ()):
            event.set()

    @contextlib.contextmanager
    def watching(self, keys: Iterable[ObjectKey]) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        keys = tuple(keys)
        for key in keys:
            self._waiters[key].add(event)
        try:
            yield event
        finally:
            for key in keys:
                waiters = self._waiters.get(key)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._waiters[key]
