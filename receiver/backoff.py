"""Exponential backoff with jitter: the one schedule every retry in the bridge follows."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


def backoff_delay(attempt: int, base: float, cap: float,
                  rng: Callable[[], float] = random.random) -> float:
    """A random point in the upper half of min(cap, base * 2^(attempt-1)): growing waits, and
    replicas that failed together do not come back together."""
    ceiling = min(cap, base * 2.0 ** max(attempt - 1, 0))
    return ceiling / 2 + rng() * ceiling / 2


@dataclass(frozen=True)
class Backoff:
    """A schedule to hand to a retrying loop (watch reconnects, list retries)."""

    initial: float = 0.5
    maximum: float = 30.0

    def delay(self, failures: int) -> float:
        return backoff_delay(failures, self.initial, self.maximum)
