"""Status jobs: one latest job per key, workers that post them, and retries.

Jobs are keyed by (instance, repo, sha, context): Gitea keeps one latest status per key, so a
newer job for a key replaces a waiting one, and a key is never posted by two workers at once
(the order of posts is the order of truth). Before a post the job is compared with what Gitea
shows (`gitea_view`). Event and push jobs compare state, description and target URL; jobs
derived from live state (resync, delivery outcomes) compare the state only, so they repair
what is missing without rewriting an event's wording.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from receiver.config import Settings
from receiver.gitea.api_types import CreateStatusOption
from receiver.gitea.client import GiteaClient, GiteaError
from receiver.metrics import Metrics
from receiver.retry import backoff_delay
from receiver.status.decisions import DesiredStatus, replaces_waiting
from receiver.status.gitea_view import GiteaView, JobKey
from receiver.status.locator import Locator
from receiver.status.shown import Fields, needs_post
from receiver.status.versions import GiteaVersions

log = logging.getLogger("receiver.status_service")


@dataclass
class Job:
    instance: str
    status: DesiredStatus
    state_only: bool
    enqueued: float
    attempts: int = 0
    origin: str = ""  # the Flux event this status comes from (digest of its bytes), if any

    @property
    def key(self) -> JobKey:
        return (self.instance, *self.status.key)

    @property
    def fields(self) -> Fields:
        return self.status.fields


PostedListener = Callable[[JobKey, DesiredStatus], None]


class StatusQueue:
    # Tunables that are not settings; tests shorten them.
    retry_base_seconds = 0.5
    retry_cap_seconds = 30.0
    check_max_pages = 20  # pages read before a post (1,000 statuses); beyond: post anyway

    def __init__(self, settings: Settings, client: GiteaClient, view: GiteaView,
                 versions: GiteaVersions, locator: Locator, metrics: Metrics,
                 clock: Callable[[], float]) -> None:
        self._cfg = settings.statuses
        self._client = client
        self._view = view
        self._versions = versions
        self._locator = locator
        self._metrics = metrics
        self._clock = clock
        self._latest: dict[JobKey, Job] = {}  # waiting to be taken, newest per key
        self._busy: set[JobKey] = set()  # being posted, or waiting for a retry
        self._keys: asyncio.Queue[JobKey] = asyncio.Queue()
        self._timers: dict[JobKey, asyncio.TimerHandle] = {}
        self._rng = random.random
        self.accepting = True  # until the service stops; jobs queued before start wait
        self.on_posted: list[PostedListener] = []

    @property
    def depth(self) -> int:
        return len(self._latest) + sum(1 for k in self._busy if k not in self._latest)

    @property
    def waiting(self) -> int:
        """Jobs not yet taken by a worker."""
        return len(self._latest)

    def enqueue(
        self, wanted: Iterable[DesiredStatus], *, state_only: bool, instance: str | None = None,
        origin: str = "",
    ) -> int | None:
        """One job per (status, hosting instance, or just `instance`); None if full."""
        now = self._clock()
        jobs = [Job(name, status, state_only, now, origin=origin)
                for status in wanted for name in self._locator.instances(status.repo_key)
                if instance is None or name == instance]
        new_keys = {job.key for job in jobs if job.key not in self._latest}
        if len(self._latest) + len(new_keys) > self._cfg.queue_size:
            return None
        for job in jobs:
            current = self._latest.get(job.key)
            if current is not None:
                if not replaces_waiting(current.status, current.state_only, job.status,
                                        job.state_only):
                    continue
                job.attempts = current.attempts
                self._latest[job.key] = job
                continue
            self._latest[job.key] = job
            if job.key not in self._busy:
                self._keys.put_nowait(job.key)
        self._metrics.status_queue_depth.set(self.depth)
        return len(jobs)

    def _release(self, key: JobKey) -> None:
        """A key's post (or retry wait) is over: let a newer job for it run."""
        self._timers.pop(key, None)
        self._busy.discard(key)
        if key in self._latest:
            self._keys.put_nowait(key)
        self._metrics.status_queue_depth.set(self.depth)

    def cancel_retries(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    async def worker(self) -> None:
        while True:
            key = await self._keys.get()
            job = self._latest.pop(key, None)
            if job is None or key in self._busy:
                if job is not None:
                    self._latest[key] = job
                continue
            self._busy.add(key)
            retry_in: float | None = None
            try:
                retry_in = await self._deliver(job)
            except Exception:
                log.exception("status delivery crashed", extra={"context": job.status.context})
                self._metrics.statuses.labels(job.instance, "failed").inc()
            if retry_in is None:
                self._release(key)
                continue
            # Retry later; a newer job that came in meanwhile goes instead, with the count.
            newer = self._latest.setdefault(key, job)
            newer.attempts = max(newer.attempts, job.attempts)
            self._timers[key] = asyncio.get_running_loop().call_later(
                retry_in, self._release, key)

    async def _deliver(self, job: Job) -> float | None:
        """Post one job unless Gitea shows it; None when done, else seconds until a retry."""
        status = job.status
        try:
            status = await self._versions.for_instance(job.instance, status)
            known, shown = await self._view.shown(job.key, status.owner, status.repo, job.origin,
                                                  job.enqueued, self.check_max_pages)
            # Unknown even now (a listing too long to read whole): post, Gitea keeps the latest.
            if known and not needs_post(shown, status.fields, state_only=job.state_only):
                self._metrics.statuses.labels(job.instance, "deduplicated").inc()
                return None
            await self._client.post_status(
                job.instance, status.owner, status.repo, status.sha,
                CreateStatusOption(status.state, status.target_url, status.description,
                                   status.context))
        except GiteaError as exc:
            job.attempts += 1
            if exc.retryable and job.attempts < self._cfg.max_attempts:
                self._metrics.statuses.labels(job.instance, "retried").inc()
                delay = backoff_delay(job.attempts, self.retry_base_seconds,
                                      self.retry_cap_seconds, self._rng)
                return max(delay, exc.retry_after or 0.0)
            self._metrics.statuses.labels(job.instance, "failed").inc()
            log.warning("commit status not posted", extra={
                "instance": job.instance, "repo": status.repo_key, "commit": status.sha,
                "context": status.context, "state": status.state, "attempts": job.attempts,
                "error": str(exc)})
            return None
        self._view.observe(job.key, status.fields, self._clock(), job.origin)
        self._metrics.statuses.labels(job.instance, "posted").inc()
        for listener in self.on_posted:
            listener(job.key, status)
        return None
