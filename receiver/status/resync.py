"""Repairs from live state: the Lease holder derives every consumer's status and compares it
with what Gitea shows, read fresh.

One listing per (instance, repository, commit), newest first, paged, within a budget of
`statuses.resync_read_budget` reads per run; the next run carries on where the last stopped
(`statuses.resync_schedule`). Lost events, restarts, Gitea outages and statuses changed behind
the bridge's back are repaired within one interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from receiver.config import Settings
from receiver.flux.cluster import Cluster
from receiver.gitea.client import GiteaError
from receiver.gitea.version import state_for_version
from receiver.metrics import Metrics
from receiver.status.decisions import (
    CommitKey,
    DesiredStatus,
    desired_from_object,
    plan_repairs,
    resync_schedule,
)
from receiver.status.fleet_checks import FleetChecks
from receiver.status.gitea_view import Budget, GiteaView
from receiver.status.locator import Locator
from receiver.status.previews import preview_status
from receiver.status.queue import StatusQueue
from receiver.status.versions import GiteaVersions
from receiver.templates import StatusTemplates

log = logging.getLogger("receiver.status_service")
# Sources whose consumers get statuses: Git URLs, or OCI artifacts that name one (`origin`).
STATUS_SOURCE_KINDS = frozenset({"GitRepository", "OCIRepository"})


class Resync:
    # The resync never fills more than this share of the queue: events keep room. When it
    # reaches it, it waits for the workers up to `wait_seconds`, then tries next round.
    queue_share = 0.8
    wait_seconds = 30.0

    def __init__(self, settings: Settings, cluster: Cluster, templates: StatusTemplates,
                 locator: Locator, view: GiteaView, queue: StatusQueue, fleet: FleetChecks,
                 versions: GiteaVersions, metrics: Metrics, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._cluster = cluster
        self._templates = templates
        self._locator = locator
        self._view = view
        self._queue = queue
        self._fleet = fleet
        self._versions = versions
        self._metrics = metrics
        self._clock = clock
        self._cursors: dict[str, CommitKey] = {}  # per instance: where the last run stopped
        self.running = False  # whether the workers run (a run waits for room only then)
        self.leader = False  # whether this replica held the Lease at its last try
        self.on_run: list[Callable[[], None]] = []  # told at the start of every run
        # More live-state statuses to repair alongside the consumers' (Flagger canaries).
        self.extra: list[Callable[[], Iterable[DesiredStatus]]] = []

    async def once(self) -> int:
        """Queue the live-state status of every consumer of a GitRepository or OCIRepository
        that Gitea shows otherwise.

        Desired statuses are grouped by (instance, repository, commit); each group costs one
        listing of the commit in Gitea (pages = ceil(statuses / 50), fewer when the wanted
        contexts show up early), at most `statuses.resync_read_budget` reads per run. The next
        run carries on after the last commit checked. Returns how many statuses were queued.
        """
        if not self._settings.gitea:
            return 0  # nowhere to post: deriving statuses would be wasted work
        for listener in self.on_run:
            listener()
        cfg = self._settings.statuses
        wanted = await self._desired_by_commit()
        room = max(1, int(cfg.queue_size * self.queue_share))
        budget = Budget(cfg.resync_read_budget)
        down: set[str] = set()  # instances that failed to answer in this run
        count = checked = 0
        for commit in resync_schedule(wanted, self._cursors):
            instance = commit[0]
            if budget.left <= 0:
                break
            if instance in down:
                continue
            desired = wanted[commit]
            full_budget = budget.left == cfg.resync_read_budget
            fleet = self._fleet.covers(desired[0])
            try:
                listing = await self._view.read_commit(
                    commit, desired[0].owner, desired[0].repo,
                    frozenset(d.context for d in desired), budget, "resync", whole=fleet)
            except GiteaError as exc:
                if exc.retryable:  # down or throttled: its commits wait for the next run
                    down.add(instance)
                else:  # no such repository or commit there, or no access: nothing to repair
                    self._cursors[instance] = commit
                log.warning("resync could not read statuses", extra={
                    "instance": instance, "repo": desired[0].repo_key, "commit": commit[2],
                    "error": str(exc)})
                continue
            if not listing.covered and not full_budget:
                break  # out of reads mid-listing: this commit comes first next run
            version = self._versions.get(instance)
            repairs = plan_repairs([replace(d, state=state_for_version(d.state, version))
                                    for d in desired], listing.shown)
            if fleet:
                # After the repairs are posted, their own fleet checks have the last word.
                self._fleet.queue_aggregate(commit, desired[0], listing)
            queued = 0
            for repair in repairs:
                added = (self._queue.enqueue([repair], state_only=True, instance=instance)
                         if await self._room(room) else None)
                if added is None:
                    break
                queued += added
            count += queued
            self._metrics.status_repairs.labels(instance).inc(queued)
            if queued < len(repairs):
                log.warning("status queue stays full; resync continues next round")
                break  # this commit comes first next run
            self._cursors[instance] = commit
            checked += 1
        log.info("resync done", extra={
            "statuses": count, "commits": checked, "of": len(wanted),
            "reads": cfg.resync_read_budget - budget.left})
        return count

    async def _desired_by_commit(self) -> dict[CommitKey, list[DesiredStatus]]:
        """Every consumer's live-state status, per hosting instance and commit."""
        store = self._cluster.store
        wanted: dict[CommitKey, list[DesiredStatus]] = {}
        for kind in ("Kustomization", "HelmRelease"):
            for index, obj in enumerate(store.list(kind)):
                if index % 500 == 499:
                    await asyncio.sleep(0)  # a big cache must not stall event intake
                _, source = self._locator.object_and_source(obj.key)
                if source is None or source.kind not in STATUS_SOURCE_KINDS:
                    continue
                # A preview also implies a status on the head commit it should run.
                for desired in (desired_from_object(obj, source, self._templates,
                                                    self._locator.normalise),
                                preview_status(obj, source, self._templates,
                                               self._locator.normalise)):
                    if desired is None:
                        continue
                    for instance in self._locator.instances(desired.repo_key):
                        wanted.setdefault((instance, desired.repo_key, desired.sha),
                                          []).append(desired)
        for more in self.extra:
            for desired in more():
                for instance in self._locator.instances(desired.repo_key):
                    wanted.setdefault((instance, desired.repo_key, desired.sha), []).append(
                        desired)
        return wanted

    async def _room(self, room: int) -> bool:
        deadline = time.monotonic() + self.wait_seconds
        while self._queue.waiting >= room:
            if time.monotonic() >= deadline or not self.running:
                return False
            await asyncio.sleep(0.05)
        return True

    async def loop(self, holder: str) -> None:
        """Resync every interval while this replica holds the Lease; at once on taking it."""
        cfg = self._settings.statuses
        while not self._cluster.synced:
            await asyncio.sleep(0.2)
        last_run: float | None = None
        tick = min(cfg.resync_interval_seconds, cfg.lease_duration_seconds / 3)
        while True:
            try:
                leader = await self._cluster.try_acquire_lease(
                    cfg.lease_name, holder, cfg.lease_duration_seconds)
                self._metrics.resync_leader.set(1 if leader else 0)
                self.leader = leader
                if not leader:
                    last_run = None  # on taking over, resync at once
                elif last_run is None or self._clock() - last_run >= cfg.resync_interval_seconds:
                    last_run = self._clock()
                    await self.once()
                    self._metrics.resync_last_success.set(time.time())
            except Exception:
                log.exception("resync failed; retrying next round")
            await asyncio.sleep(tick)
