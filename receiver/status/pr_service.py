"""Pull-request comments, carried out: the preview comment per pull request and cluster, and the
deployment comment on a merged pull request (what each says: `pr_comments`, pure).

Only the replica holding the resync Lease writes comments, and it re-checks the Lease right
before creating one; what a comment should say is rebuilt each time from the cluster cache
and from the pull request's comments as Gitea lists them (found by marker), never from one
replica's memory. A change to a preview object (the watch) marks its pull request due; due
pull requests are written at most once per `statuses.previews.comment_interval_seconds`
(changes in between coalesce into one edit); a failed write is retried with backoff; every
resync interval each live preview is checked again. Preview consumers' statuses on the head
commit go through the status queue (`previews.preview_status`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from receiver.bounded import BoundedMap
from receiver.config import Settings
from receiver.flux.cluster import Cluster
from receiver.flux.objects import CONSUMER_KINDS, FluxObject, ObjectKey
from receiver.flux.revisions import applied_revision, commit_of
from receiver.gitea.api_types import MergedPull
from receiver.gitea.client import GiteaClient, GiteaError
from receiver.gitea.ref_payloads import PullRequestEvent
from receiver.metrics import Metrics
from receiver.retry import backoff_delay
from receiver.status import pr_comments as pc
from receiver.status.decisions import DesiredStatus, desired_from_object
from receiver.status.locator import Locator
from receiver.status.previews import (
    PREVIEW_KINDS,
    PreviewItem,
    PullKey,
    change_request,
    pending_for_pull_request,
    preview_item,
    preview_status,
    pull_key,
    pull_of,
)
from receiver.status.queue import StatusQueue
from receiver.status.repos import repo_of, repo_ref
from receiver.templates import StatusTemplates

log = logging.getLogger("receiver.status_service")


class PullComments:
    memory_size = 10_000
    retry_base_seconds = 1.0
    retry_cap_seconds = 60.0

    def __init__(self, settings: Settings, cluster: Cluster, client: GiteaClient,
                 locator: Locator, templates: StatusTemplates, queue: StatusQueue,
                 metrics: Metrics, clock: Callable[[], float], leader: Callable[[], bool],
                 still_leader: Callable[[], Awaitable[bool]],
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._cfg = settings.statuses.previews
        self._cluster = cluster
        self._client = client
        self._locator = locator
        self._templates = templates
        self._queue = queue
        self._metrics = metrics
        self._clock = clock
        self._leader = leader
        self._still_leader = still_leader
        self._wall = wall_clock
        self._urls = {i.name: i.url for i in settings.gitea}
        self._due: BoundedMap[Any, float] = BoundedMap(self.memory_size)  # entry -> when
        self._attempts: dict[Any, int] = {}
        self._written: BoundedMap[tuple[str, Any], float] = BoundedMap(self.memory_size)
        self._pull_of: dict[ObjectKey, PullKey] = {}  # every preview object in the cache
        self._seen: BoundedMap[tuple[ObjectKey, str], bool] = BoundedMap(self.memory_size)
        # (instance, repository, commit) -> the pull request it merged, None when none did
        self._merged: BoundedMap[tuple[str, str, str], MergedPull | None] = BoundedMap(
            self.memory_size)
        self._logins: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._rng = random.random

    @property
    def enabled(self) -> bool:
        return bool(self._settings.gitea)

    # -- what marks work due ----------------------------------------------------------------

    def on_store_change(self, action: str, obj: FluxObject) -> None:
        """The watch saw `obj` change (or go): its pull request's comment may need an edit."""
        if not self.enabled or obj.kind not in PREVIEW_KINDS:
            return
        before = self._pull_of.pop(obj.key, None)
        if before is not None and change_request(obj) is None:
            self.touch(before)  # no longer a preview: its pull request's comment drops it
        if change_request(obj) is not None:
            pull = before
            if action != "delete":
                _, source = self._locator.object_and_source(obj.key)
                pull = pull_of(obj, source, self._locator.normalise)
                if pull is not None:
                    self._pull_of[obj.key] = pull
                if before is not None and before != pull:
                    self.touch(before)  # it left that pull request's preview
            if pull is not None:
                self.touch(pull)
            return
        if action != "delete" and obj.kind in CONSUMER_KINDS and self._cfg.deployed_comments:
            self._note_deployed(obj)

    def touch(self, pull: PullKey) -> None:
        self._mark((pc.PREVIEW, pull), 0.0)

    def _note_deployed(self, obj: FluxObject) -> None:
        """A consumer Ready at a commit: that commit may be a merged pull request's."""
        ready = obj.condition("Ready") or {}
        sha = commit_of(applied_revision(obj))
        if ready.get("status") != "True" or sha is None or (obj.key, sha) in self._seen:
            return  # most changes are status updates of a commit already looked at
        self._seen[(obj.key, sha)] = True
        _, source = self._locator.object_and_source(obj.key)
        repo = repo_of(obj, source, self._locator.normalise)
        if repo is None or not self._locator.instances(repo.key):
            return
        self._mark((pc.DEPLOYED, repo.key, f"{repo.owner}/{repo.name}", sha), 0.0)

    def _mark(self, entry: Any, delay: float) -> None:
        when = self._clock() + delay
        current = self._due.get(entry)
        if current is None or when < current:
            self._due[entry] = when
        self._wake.set()

    def on_pull_request(self, event: PullRequestEvent) -> int:
        """A routed `pull_request` webhook: `pending` at once on the new head for the previews
        already running, and the comment checked again (a closed one may be torn down).
        Returns how many statuses were queued (0 when the queue is full)."""
        store = self._cluster.store
        objects = [(obj, self._locator.object_and_source(obj.key)[1])
                   for kind in CONSUMER_KINDS for obj in store.list(kind)
                   if change_request(obj) == event.number]
        wanted = pending_for_pull_request(event, objects, self._templates,
                                          self._locator.normalise)
        for url in event.repo_urls:
            repo = repo_ref(self._locator.normalise(url))
            if repo is not None:
                self.touch(pull_key(repo, event.number))
                break
        if not wanted:
            return 0
        return self._queue.enqueue(wanted, state_only=False) or 0

    def resync(self) -> None:
        """Every live preview's comment and statuses checked again (the Lease holder's resync)."""
        if not self.enabled:
            return
        for kind in PREVIEW_KINDS:
            for obj in self._cluster.store.list(kind):
                if change_request(obj) is not None:
                    self.on_store_change("upsert", obj)

    # -- the loop -----------------------------------------------------------------------------

    async def loop(self) -> None:
        while True:
            now = self._clock()
            ready = [e for e, when in self._due.items() if when <= now]
            if not ready or not self._leader():
                self._wake.clear()
                soonest = min(self._due.values(), default=None)
                # A replica without the Lease looks again each second (it may take it over).
                wait = 1.0 if soonest is None or not self._leader() else \
                    max(0.01, min(1.0, soonest - now))
                # A timer, not wait_for: on 3.11 wait_for can swallow a cancellation that
                # comes as the event is set, and the service could not stop this task.
                timer = asyncio.get_running_loop().call_later(wait, self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
                continue
            for entry in ready:
                self._due.pop(entry, None)
                try:
                    retry = await self._run(entry)
                except GiteaError as exc:
                    retry = exc.retryable
                    log.warning("pull request comment not written", extra={
                        "entry": str(entry[1:]), "error": str(exc)})
                except Exception:
                    log.exception("pull request comment crashed")
                    retry = False
                if retry:
                    attempts = self._attempts.get(entry, 0) + 1
                    self._attempts[entry] = attempts
                    if attempts < self._settings.statuses.max_attempts:
                        self._mark(entry, backoff_delay(attempts, self.retry_base_seconds,
                                                        self.retry_cap_seconds, self._rng))
                        continue
                self._attempts.pop(entry, None)

    async def _run(self, entry: Any) -> bool:
        """Carry out one due entry; True when it must be tried again later."""
        if entry[0] == pc.PREVIEW:
            return await self._preview(entry[1])
        return await self._deployment(entry[1], entry[2], entry[3])

    def _wait_interval(self, entry: Any, instance: str) -> float:
        return pc.edit_delay(self._written.get((instance, entry)), self._clock(),
                             self._cfg.comment_interval_seconds)

    async def _preview(self, pull: PullKey) -> bool:
        entry = (pc.PREVIEW, pull)
        items: list[PreviewItem] = []
        statuses: list[DesiredStatus] = []
        members = sorted(key for key, of in self._pull_of.items() if of == pull)
        for key in members:
            obj, source = self._locator.object_and_source(key)
            if obj is None or pull_of(obj, source, self._locator.normalise) != pull:
                continue
            items.append(preview_item(obj, source, self._templates, self._locator.normalise))
            # Its statuses follow the watch too: the live-state one, and the one on the head
            # commit it should run (each compared with Gitea before it is posted).
            for status in (desired_from_object(obj, source, self._templates,
                                               self._locator.normalise),
                           preview_status(obj, source, self._templates,
                                          self._locator.normalise)):
                if status is not None:
                    statuses.append(status)
        if statuses:
            self._queue.enqueue(statuses, state_only=True)
        if not self._cfg.comments:
            return False
        retry = False
        for instance in self._locator.instances(pull.repo_key):
            delay = self._wait_interval(entry, instance)
            if delay > 0:
                self._mark(entry, delay)  # coalesced: one write when the interval is over
                continue
            web = f"{self._urls[instance]}/{pull.owner}/{pull.repo}"

            def preview(shown: pc.Posted | None, web: str = web) -> str | None:
                return pc.wanted_preview(self._templates.cluster, pull.number, items, shown, web)

            retry |= await self._write(instance, entry, pull, pc.PREVIEW, preview)
        return retry

    async def _deployment(self, repo_key: str, full_name: str, sha: str) -> bool:
        owner, _, name = full_name.partition("/")
        lines = [pc.DeployedLine(obj.kind, obj.namespace, obj.name, sha)
                 for kind in CONSUMER_KINDS for obj in self._cluster.store.list(kind)
                 if change_request(obj) is None and self._runs(obj, repo_key, sha)]
        if not lines:
            return False
        retry = False
        for instance in self._locator.instances(repo_key):
            lookup = (instance, repo_key, sha)
            if lookup not in self._merged:
                self._merged[lookup] = await self._client.merged_pull(instance, owner, name, sha)
            merged = self._merged[lookup]
            if merged is None or not merged.merged or merged.merge_commit_sha != sha:
                continue
            if merged.merged_at is None or \
                    self._wall() - merged.merged_at > self._cfg.deployed_within_seconds:
                continue  # merged long ago (the bridge just started): no late news
            pull = PullKey(repo_key, owner, name, merged.number)
            entry = (pc.DEPLOYED, repo_key, full_name, sha)
            delay = self._wait_interval((pc.DEPLOYED, pull), instance)
            if delay > 0:
                self._mark(entry, delay)
                continue
            web = f"{self._urls[instance]}/{owner}/{name}"

            def deployed(shown: pc.Posted | None, number: int = pull.number,
                         web: str = web) -> str | None:
                return pc.merge_deployed(shown, self._templates.cluster, number, lines, web)

            retry |= await self._write(instance, (pc.DEPLOYED, pull), pull, pc.DEPLOYED,
                                       deployed)
        return retry

    def _runs(self, obj: FluxObject, repo_key: str, sha: str) -> bool:
        ready = obj.condition("Ready") or {}
        if ready.get("status") != "True" or commit_of(applied_revision(obj)) != sha:
            return False
        _, source = self._locator.object_and_source(obj.key)
        repo = repo_of(obj, source, self._locator.normalise)
        return repo is not None and repo.key == repo_key

    async def _write(self, instance: str, entry: Any, pull: PullKey, kind: str,
                     wanted_for: Callable[[pc.Posted | None], str | None]) -> bool:
        """Make the pull request show exactly one up-to-date comment of `kind` by us."""
        login = await self._login(instance)
        listed = await self._client.list_comments(instance, pull.owner, pull.repo, pull.number)
        found = pc.find((pc.Posted(c.id, c.body, c.login) for c in listed),
                        pc.marker(kind, self._templates.cluster), login)
        todo = pc.plan(found, wanted_for(found.comment))
        if todo.create is not None:
            # Re-check the Lease right before creating: a replica that lost it must not add a
            # second comment beside the new holder's.
            if not await self._still_leader():
                self._count(instance, "yielded")
                return False
            await self._client.create_comment(instance, pull.owner, pull.repo, pull.number,
                                              todo.create)
            self._count(instance, "created")
        if todo.edit is not None:
            await self._client.edit_comment(instance, pull.owner, pull.repo, *todo.edit)
            self._count(instance, "edited")
        for duplicate in todo.delete:
            await self._client.delete_comment(instance, pull.owner, pull.repo, duplicate)
            self._count(instance, "deleted")
        if todo.empty:
            self._count(instance, "unchanged")
        else:
            self._written[(instance, entry)] = self._clock()
        return False

    def _count(self, instance: str, result: str) -> None:
        self._metrics.pr_comments.labels(instance, result).inc()

    async def _login(self, instance: str) -> str:
        if instance not in self._logins:
            self._logins[instance] = await self._client.current_login(instance)
        return self._logins[instance]
