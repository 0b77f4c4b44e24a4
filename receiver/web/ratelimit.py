"""Per-receiver token buckets (HTTP 429 past the configured rate)."""

from __future__ import annotations

from receiver.bounded import BoundedMap


class RateLimiter:
    def __init__(self, rate_per_second: float, burst: int, max_keys: int = 10_000) -> None:
        self._rate = rate_per_second
        self._burst = float(burst)
        # Keys are receivers: past the bound (receivers churning) the least recent go.
        self._buckets: BoundedMap[str, tuple[float, float]] = BoundedMap(max_keys)

    def allow(self, key: str, now: float) -> bool:
        tokens, stamp = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - stamp) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True
