"""Per-receiver token buckets (HTTP 429 past the configured rate)."""

from __future__ import annotations


class RateLimiter:
    def __init__(self, rate_per_second: float, burst: int, max_keys: int = 10_000) -> None:
        self._rate = rate_per_second
        self._burst = float(burst)
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float) -> bool:
        tokens, stamp = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - stamp) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        if len(self._buckets) >= self._max_keys and key not in self._buckets:
            # Keys are receivers, so this only trips if receivers churn; start over.
            self._buckets.clear()
        self._buckets[key] = (tokens - 1.0, now)
        return True
