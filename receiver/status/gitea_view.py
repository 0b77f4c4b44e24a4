"""What Gitea shows for each (instance, repository, commit, context): read, and remembered.

Several replicas post to one Gitea, so a job is compared with what *Gitea* shows for its key,
never with a replica's own history. What this replica posted or read is believed for
`statuses.repeat_window_seconds` only (`statuses.recall`): within that window an exact repeat
is skipped and one listing of a commit answers for all its contexts; after it, the commit's
statuses are read again (one paged listing per commit, shared by concurrent jobs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from receiver.bounded import BoundedMap
from receiver.config import Settings
from receiver.gitea.api_types import CommitStatus, more_pages
from receiver.gitea.client import GiteaClient
from receiver.metrics import Metrics
from receiver.status.decisions import CommitKey
from receiver.status.fleet import Report, latest_reports
from receiver.status.shown import Fields, Seen, latest_per_context, recall, recall_for_event

JobKey = tuple[str, str, str, str]  # (instance, repo key, sha, context)


@dataclass
class Budget:
    """Gitea reads a piece of work may still make."""

    left: int


@dataclass(frozen=True)
class Listing:
    shown: dict[str, Fields]  # latest per context among the statuses read
    complete: bool  # every page read: a context not in `shown` has no status
    covered: bool  # complete, or every wanted context found (when not asked for the whole)
    reports: dict[str, Report]  # latest state and time per context


class GiteaView:
    def __init__(self, settings: Settings, client: GiteaClient, metrics: Metrics,
                 clock: Callable[[], float], memory_size: int) -> None:
        self._window = settings.statuses.repeat_window_seconds
        self._client = client
        self._metrics = metrics
        self._clock = clock
        # What this replica saw Gitea show (posted or read), oldest first; they also expire
        # after the window. `_listed`: when a commit's listing was last read to the end.
        self._seen: BoundedMap[JobKey, Seen] = BoundedMap(memory_size)
        self._listed: BoundedMap[CommitKey, float] = BoundedMap(memory_size)
        self._reading: dict[CommitKey, tuple[asyncio.Lock, int]] = {}  # shared reads

    def recall(self, key: JobKey, origin: str = "", enqueued: float = 0.0
               ) -> tuple[bool, Fields | None]:
        """(known, shown) for a key from memory alone; an event's job (`origin`) also knows
        whether this very event was posted already."""
        if not origin:
            return recall(self._seen.get(key), self._listed.get(key[:3]), self._clock(),
                          self._window)
        return recall_for_event(self._seen.get(key), self._listed.get(key[:3]), self._clock(),
                                self._window, origin, enqueued)

    def observe(self, key: JobKey, fields: Fields, at: float, origin: str = "") -> None:
        current = self._seen.get(key)
        if current is not None and current.at > at:
            return  # a post made while a listing was under way is newer than the listing
        self._seen[key] = Seen(fields, at, origin)
        self._forget(at)

    def _forget(self, now: float) -> None:
        """Drop what may no longer be believed: older than the window, or over the size."""
        horizon = now - self._window
        while (seen := self._seen.oldest()) is not None and seen[1].at <= horizon:
            del self._seen[seen[0]]
        while (listed := self._listed.oldest()) is not None and listed[1] <= horizon:
            del self._listed[listed[0]]

    async def shown(self, key: JobKey, owner: str, repo: str, origin: str, enqueued: float,
                    max_pages: int) -> tuple[bool, Fields | None]:
        """What Gitea shows for the key: from memory, read now, or by a concurrent job just
        before. Jobs of one commit share the read: the first reads, the others wait and then
        find a fresh answer (a push touching twenty consumers costs one listing, not twenty).
        """
        known, shown = self.recall(key, origin, enqueued)
        if known:
            return known, shown
        commit: CommitKey = key[:3]
        lock, users = self._reading.get(commit, (asyncio.Lock(), 0))
        self._reading[commit] = (lock, users + 1)
        try:
            async with lock:
                known, shown = self.recall(key, origin, enqueued)
                if known:
                    return known, shown
                context = key[3]
                listing = await self.read_commit(commit, owner, repo, frozenset({context}),
                                                 Budget(max_pages), "check")
                if context in listing.shown:
                    return True, listing.shown[context]
                return listing.complete, None
        finally:
            lock, users = self._reading[commit]
            if users <= 1:
                del self._reading[commit]
            else:
                self._reading[commit] = (lock, users - 1)

    async def read_commit(
        self, commit: CommitKey, owner: str, repo: str, wanted: frozenset[str],
        budget: Budget, purpose: str, *, whole: bool = False,
    ) -> Listing:
        """List a commit's statuses newest first, page by page, and remember what it shows.

        Stops at the last page, when every wanted context has shown up (its first appearance
        is its latest) unless asked for the `whole` listing, or when the budget is spent.
        Raises `GiteaError`.
        """
        instance, _, sha = commit
        at = self._clock()  # as of the first request: later posts are not in it
        items: list[CommitStatus] = []
        complete = False
        number = 0
        while budget.left > 0:
            number += 1
            budget.left -= 1
            self._metrics.status_reads.labels(instance, purpose).inc()
            page = await self._client.status_page(instance, owner, repo, sha, number)
            items.extend(page.items)
            if not more_pages(page, len(items)):
                complete = True
                break
            if not whole and wanted <= {item.context for item in items}:
                break
        shown = latest_per_context(items)
        for context, fields in shown.items():
            self.observe((*commit, context), fields, at)
        if complete:
            self._listed[commit] = at
        self._forget(self._clock())
        covered = complete or (not whole and wanted <= shown.keys())
        return Listing(shown, complete, covered, latest_reports(items))
