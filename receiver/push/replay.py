"""Bounded memory of things seen once: Gitea delivery ids and one-time signatures."""

from __future__ import annotations

from collections import OrderedDict


class SeenOnce:
    """`first(key, until, now)` is True the first time a key is offered before it expires.

    Entries are kept in insertion order; expired ones are dropped as new ones arrive and the
    oldest are evicted past `max_entries`, so memory stays bounded under a flood.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._entries: OrderedDict[str, float] = OrderedDict()
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._entries)

    def first(self, key: str, until: float, now: float) -> bool:
        expiry = self._entries.get(key)
        if expiry is not None and expiry > now:
            return False
        self._entries[key] = until
        self._entries.move_to_end(key)
        self._expire(now)
        return True

    def __contains__(self, key: object) -> bool:
        """Offered before and not yet expired (by this replica's clock, at the last offer)."""
        return isinstance(key, str) and key in self._entries

    def remember(self, key: str, until: float, now: float) -> None:
        self._entries[key] = until
        self._entries.move_to_end(key)
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._entries:
            key, expiry = next(iter(self._entries.items()))
            if expiry > now and len(self._entries) <= self._max:
                break
            del self._entries[key]
