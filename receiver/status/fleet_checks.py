"""The fleet status (`statuses.fleet`, decided by `fleet.aggregate`).

After this replica posts a status on a commit of a fleet repository, it reads the commit's whole
listing once (checks of one commit coalesce: posts made while a check runs cost one more read,
not one each) and queues the aggregate; the queue posts it only if Gitea shows otherwise. The
resync reads the whole listing of such commits and does the same, which also turns a stale
cluster into `error` and repairs an aggregate two regions raced on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from receiver.config import Settings
from receiver.gitea.client import GiteaError
from receiver.status.decisions import CommitKey, DesiredStatus
from receiver.status.fleet import aggregate, environment_aggregates, with_local
from receiver.status.gitea_view import Budget, GiteaView, JobKey, Listing
from receiver.status.queue import StatusQueue
from receiver.status.shown import needs_post
from receiver.templates import StatusTemplates, cluster_parser

log = logging.getLogger("receiver.status_service")


class FleetChecks:
    def __init__(self, settings: Settings, templates: StatusTemplates, view: GiteaView,
                 queue: StatusQueue, wall: Callable[[], float]) -> None:
        cfg = settings.statuses
        self._fleet = cfg.fleet
        self._parser = (cluster_parser(templates.context, cfg.fleet.clusters)
                        if cfg.fleet.enabled else None)
        # A canary's context counts as its cluster's deploy (`fleet` module).
        self._canary_parser = (
            cluster_parser(cfg.canaries.context_template, cfg.fleet.clusters, require_kind=False)
            if cfg.fleet.enabled and cfg.canaries.enabled else None)
        self._environments = [(cfg.fleet.environment_context_prefix + env.name, env.clusters)
                              for env in cfg.fleet.environments]
        self._view = view
        self._queue = queue
        self._wall = wall  # compared with the times Gitea gives statuses
        # (repo key, sha) -> context -> state this replica queued for its canaries on the
        # commit (`CanaryStatuses.local`): counted before Gitea shows them.
        self.local: Callable[[str, str], dict[str, str]] = lambda repo_key, sha: {}
        # Checks under way per commit, and whether a post asked for another meanwhile.
        self.checks: dict[CommitKey, bool] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def covers(self, status: DesiredStatus) -> bool:
        return self._parser is not None and self._fleet.covers(status.owner, status.repo)

    def on_posted(self, key: JobKey, status: DesiredStatus) -> None:
        """The queue's listener: a status this replica posted may change the aggregate."""
        if self.covers(status) and status.context != self._fleet.context and \
                status.context not in {context for context, _ in self._environments}:
            self.soon(key[:3], status)

    def soon(self, commit: CommitKey, status: DesiredStatus) -> None:
        """Check the commit's fleet status; one check per commit at a time, plus one more
        if posts came in while it ran."""
        if not self._queue.accepting:
            return
        if commit in self.checks:
            self.checks[commit] = True
            return
        self.checks[commit] = False
        task = asyncio.create_task(self._check(commit, status), name="fleet-check")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self, commit: CommitKey, status: DesiredStatus) -> None:
        try:
            while True:
                self.checks[commit] = False
                try:
                    listing = await self._view.read_commit(
                        commit, status.owner, status.repo, frozenset(),
                        Budget(self._queue.check_max_pages), "fleet", whole=True)
                except GiteaError as exc:
                    log.warning("cannot read statuses for the fleet status; the resync "
                                "repairs it", extra={"instance": commit[0],
                                                     "repo": status.repo_key,
                                                     "commit": commit[2], "error": str(exc)})
                    return
                self.queue_aggregate(commit, status, listing)
                if not self.checks.get(commit):
                    return
        except Exception:
            log.exception("fleet status check crashed", extra={"commit": commit[2]})
        finally:
            self.checks.pop(commit, None)

    def queue_aggregate(self, commit: CommitKey, status: DesiredStatus, listing: Listing) -> None:
        """Queue the aggregate the listing implies, if Gitea shows another."""
        if self._parser is None:
            return
        if not listing.complete:
            log.warning("commit has too many statuses to read whole; fleet status not updated",
                        extra={"instance": commit[0], "repo": status.repo_key,
                               "commit": commit[2]})
            return
        fleet = self._fleet
        now = self._wall()
        reports = with_local(
            {c: r for c, r in listing.reports.items()
             if c not in {context for context, _ in self._environments}},
            self.local(status.repo_key, commit[2]), now)
        verdicts = environment_aggregates(reports, self._parser, self._environments, now,
                                          fleet.stale_after_seconds, self._canary_parser)
        verdict = aggregate(reports, self._parser, fleet.clusters, fleet.context, now,
                            fleet.stale_after_seconds, self._canary_parser)
        if verdict is not None:
            verdicts.append((fleet.context, verdict))
        for context, found in verdicts:
            desired = DesiredStatus(status.repo_key, status.owner, status.repo, commit[2],
                                    context, found.state, found.description)
            if needs_post(listing.shown.get(context), desired.fields, state_only=False):
                self._queue.enqueue([desired], state_only=False, instance=commit[0])

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
