"""When a failed call is worth another try, and how long to wait: one policy for the Kubernetes
API and Gitea alike."""

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


def retryable_status(status: int, *, after_reread: bool = False) -> bool:
    """Throttling (429) and server errors (5xx, except 501: not implemented will not change)
    are worth another try; so is a conflict (409) for a caller that reads the object again
    before it retries (the conditional annotation patch). Anything else will not change."""
    return status == 429 or (status >= 500 and status != 501) or (after_reread and status == 409)


@dataclass(frozen=True)
class Backoff:
    """A schedule to hand to a retrying loop (watch reconnects, list retries)."""

    initial: float = 0.5
    maximum: float = 30.0

    def delay(self, failures: int) -> float:
        return backoff_delay(failures, self.initial, self.maximum)
