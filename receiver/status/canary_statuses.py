"""Flagger Canaries on the commit, and the promotion gates Flagger asks: the shell around
`canaries` and `gates`.

Every change of a cached Canary, of its target or of the Flux object that applied the target
is mapped to the status of the commit it analyses and queued (the queue compares it with what
Gitea shows; the fleet check follows each post): `pending` until Flagger changes the phase after
that commit's apply, then the phase's verdict (`canaries.commit_verdict`). A Flux event that
says a Kustomization or HelmRelease applied a commit queues that `pending` at once, beside the
object's own status, before the cache may have seen the apply. The fleet check counts what this
replica last queued for its canaries (`local`), so an aggregate never reads `success` while the
canary's `pending` is still on its way to Gitea. The resync derives the same statuses from the
cache, so a lost change or a restart is repaired.

A verdict that rests on "the apply left the workload as it was" (`canaries.rests_on_workload`)
is given only once the workload has been read from the API server after that apply (one GET
per apply and workload version, `_workload_current`): the cache's copy may predate the apply.

Which check failed is not in a Canary's status: Flagger says it only in its events. Its `event`
webhook (`note_event`) tells this replica, which names the check in the `failure` it posts;
another replica (or the resync) says "canary analysis failed" instead. The resync compares
states only, so the named wording stays once posted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from receiver.bounded import BoundedMap
from receiver.config import Settings
from receiver.flux.canary import FAILED, owner_of, target_of
from receiver.flux.cluster import Cluster, ClusterError
from receiver.flux.objects import (
    CANARY_KINDS,
    CONSUMER_KINDS,
    WORKLOAD_KINDS,
    FluxObject,
    ObjectKey,
)
from receiver.gitea.client import GiteaError
from receiver.status.canaries import (
    WAITING_FOR_FLAGGER,
    Found,
    Unknown,
    analysed_commit,
    applied_at,
    canary_context,
    commit_verdict,
    failed_check,
    rests_on_workload,
    waits_for_flagger,
)
from receiver.status.decisions import DesiredStatus, applied_commit
from receiver.status.descriptions import SUCCESS
from receiver.status.gates import GateAnswer, answer
from receiver.status.gitea_view import Budget, GiteaView
from receiver.status.locator import Locator
from receiver.status.queue import StatusQueue
from receiver.status.repos import RepoRef, repo_of
from receiver.templates import StatusTemplates

log = logging.getLogger("receiver.status_service")


class CanaryStatuses:
    memory_size = 10_000  # canaries whose failed check or unknown commit is remembered
    # Flagger rewrites a Canary's status at every interval: an exact repeat of what this replica
    # queued for it within this window is not queued again (each would cost a Gitea read). It
    # never decides what Gitea shows: another state goes at once, and the resync repairs.
    repeat_seconds = 60.0
    gate_read_pages = 10  # a gate reads the commit's statuses newest first, this many pages

    def __init__(self, settings: Settings, cluster: Cluster, templates: StatusTemplates,
                 locator: Locator, queue: StatusQueue, view: GiteaView) -> None:
        self._cfg = settings.statuses.canaries
        self._cluster = cluster
        self._templates = templates
        self._locator = locator
        self._queue = queue
        self._view = view
        self._queued: BoundedMap[ObjectKey, tuple[DesiredStatus, float]] = BoundedMap(
            self.memory_size)
        self._clock = time.monotonic
        self.failed_checks: BoundedMap[ObjectKey, str] = BoundedMap(self.memory_size)
        # Canaries whose commit cannot be told, and why (said once per reason in the log).
        self.unknown: BoundedMap[ObjectKey, str] = BoundedMap(self.memory_size)
        # Workload -> (resourceVersion, apply time): the API server's version read after that
        # apply (`_workload_current`); and the reads under way.
        self._confirmed: BoundedMap[ObjectKey, tuple[str, float | None]] = BoundedMap(
            self.memory_size)
        self._confirming: dict[ObjectKey, asyncio.Task[None]] = {}
        if self.enabled:
            cluster.store.subscribe(self._on_change)

    @property
    def enabled(self) -> bool:
        return self._cfg.enabled

    # -- which commit, and what to post ------------------------------------------------------

    def _source_of(self, key: ObjectKey) -> FluxObject | None:
        return self._locator.object_and_source(key)[1]

    def locate(self, canary: FluxObject) -> tuple[Found, RepoRef] | Unknown:
        """The commit a canary analyses and its repository, or why it cannot be told."""
        found = analysed_commit(canary, self._cluster.store.get, self._source_of,
                                applied_commit)
        if isinstance(found, Unknown):
            return found
        repo = repo_of(found.owner, found.source, self._locator.normalise)
        if repo is None:
            return Unknown(f"Canary {canary.namespace}/{canary.name}: {found.owner.key} has no "
                           "Git repository to post to")
        return found, repo

    def desired(self, canary: FluxObject, *, settled_only: bool = False) -> DesiredStatus | None:
        """The canary's status on the commit it analyses. `settled_only` (the resync's reading
        of the cache): None rather than `pending` while the verdict waits for the workload's
        read, so a restart does not flip settled commits to `pending` and back; the read posts
        the verdict when it answers."""
        located = self.locate(canary)
        if isinstance(located, Unknown):
            if self.unknown.get(canary.key) != located.reason:
                log.warning("canary status not posted: its commit cannot be told",
                            extra={"canary": str(canary.key), "reason": located.reason})
            self.unknown[canary.key] = located.reason
            return None
        self.unknown.pop(canary.key, None)
        found, repo = located
        at = applied_at(found.owner)
        current = not rests_on_workload(canary, found.workload, at) or \
            self._workload_current(found.workload, at)
        verdict = commit_verdict(canary, found.workload, at,
                                 self.failed_checks.get(canary.key, ""), workload_current=current)
        if verdict is None:
            return None
        context = canary_context(self._cfg.context_template, self._templates.cluster, canary,
                                 self._templates.lower)
        if not current:
            # A re-reconcile of the commit already shown: keep what it shows until the API
            # server answers, rather than flip it to waiting at every Flux interval.
            shown = self._queued.get(canary.key)
            if shown is not None and shown[0].key == (repo.key, found.sha, context):
                return shown[0]
            if settled_only:
                return None
        return DesiredStatus(repo.key, repo.owner, repo.name, found.sha, context,
                             verdict.state, verdict.description)

    def _workload_current(self, workload: FluxObject, at: float | None) -> bool:
        """Is the cached workload the API server's, as read after the owner's apply at `at`?
        Asked of the API server once per apply and workload version (`_confirm`); until it
        answers, no, and the commit waits for Flagger."""
        if self._confirmed.get(workload.key) == (workload.resource_version, at):
            return True
        if workload.key not in self._confirming:
            try:
                task = asyncio.get_running_loop().create_task(self._confirm(workload.key, at))
            except RuntimeError:  # no loop to read on (a synchronous caller): cannot tell
                return False
            self._confirming[workload.key] = task
        return False

    async def _confirm(self, key: ObjectKey, at: float | None) -> None:
        """Read the workload from the API server (the kube backend caches the answer if newer
        than the watch's), note its version as confirmed for the apply at `at`, and say its
        canaries' statuses again."""
        try:
            live = await self._cluster.read_object(key)
        except ClusterError as exc:
            log.warning("canary workload not read: its commit waits for Flagger",
                        extra={"workload": str(key), "error": str(exc)})
            return
        finally:
            self._confirming.pop(key, None)
        if live is None:
            return
        self._confirmed[key] = (live.resource_version, at)
        cached = self._cluster.store.get(key)
        if cached is not None and cached.resource_version == live.resource_version:
            for canary in self._targeting(key):
                self.post(canary)
        # Otherwise the answer (or a newer watch event) changes the cache, which says them.

    def all_desired(self, settled_only: bool = True) -> Iterable[DesiredStatus]:
        """Every cached canary's status (the resync's share: `settled_only`, see `desired`)."""
        if not self.enabled:
            return []
        out = []
        for kind in CANARY_KINDS:
            for canary in self._cluster.store.list(kind):
                desired = self.desired(canary, settled_only=settled_only)
                if desired is not None:
                    out.append(desired)
        return out

    def post(self, canary: FluxObject) -> None:
        desired = self.desired(canary)
        if desired is not None:
            self._enqueue(canary.key, desired)

    def _enqueue(self, key: ObjectKey, desired: DesiredStatus) -> None:
        if not self._queue.accepting:
            return
        now = self._clock()
        last = self._queued.get(key)
        if last is not None and last[0] == desired and now - last[1] < self.repeat_seconds:
            return
        self._queued[key] = (desired, now)
        if self._queue.enqueue([desired], state_only=False) is None:
            log.warning("status queue full: canary status left to the resync",
                        extra={"canary": str(key)})

    def local(self, repo_key: str, sha: str) -> dict[str, str]:
        """Context -> state this replica says for its canaries on the commit: what it last
        queued, or what the cache says now where it names the commit (the fleet check counts
        them before Gitea shows them)."""
        if not self.enabled:
            return {}
        found = [desired for desired, _ in self._queued.values()]
        # The cache now: what queued may not have, yet; a verdict still waiting for its read
        # counts as `pending` here (counted, never posted).
        found.extend(self.all_desired(settled_only=False))
        return {desired.context: desired.state for desired in found
                if desired.sha == sha and desired.repo_key == repo_key}

    def _applied_by(self, owner: ObjectKey) -> list[FluxObject]:
        """The cached canaries whose target the Flux object `owner` applied."""
        store = self._cluster.store
        out = []
        for kind in CANARY_KINDS:
            for canary in store.list(kind):
                target = target_of(canary)
                workload = store.get(target) if target is not None else None
                if workload is not None and owner_of(workload) == owner:
                    out.append(canary)
        return out

    def _targeting(self, workload: ObjectKey) -> list[FluxObject]:
        return [c for kind in CANARY_KINDS for c in self._cluster.store.list(kind)
                if target_of(c) == workload]

    def _on_change(self, op: str, obj: FluxObject) -> None:
        if obj.kind in CONSUMER_KINDS:
            # It may have applied a commit: its canaries wait for Flagger on it.
            for canary in self._applied_by(obj.key):
                self.post(canary)
            return
        if obj.kind in WORKLOAD_KINDS:
            for canary in self._targeting(obj.key):
                self.post(canary)
            return
        if obj.kind not in CANARY_KINDS:
            return
        if op == "delete":
            self.failed_checks.pop(obj.key, None)
            self.unknown.pop(obj.key, None)
            self._queued.pop(obj.key, None)
            return
        self.post(obj)

    def on_applied(self, owner: ObjectKey, status: DesiredStatus,
                   event_at: float | None) -> list[DesiredStatus]:
        """A Flux event (at `event_at`) says `owner` applied `status.sha` (its `success`, about
        to be queued): `pending` for each canary whose target it applied, unless the cache
        already shows that apply or a later one (`canaries.waits_for_flagger`). To be queued
        with the owner's own status; the fleet check counts them from now on."""
        if not self.enabled or status.state != SUCCESS:
            return []
        out = []
        for canary in self._applied_by(owner):
            located = self.locate(canary)
            found = located[0] if not isinstance(located, Unknown) else None
            if not waits_for_flagger(found.sha if found else None,
                                     applied_at(found.owner) if found else None,
                                     status.sha, event_at):
                continue
            context = canary_context(self._cfg.context_template, self._templates.cluster,
                                     canary, self._templates.lower)
            desired = DesiredStatus(status.repo_key, status.owner, status.repo, status.sha,
                                    context, WAITING_FOR_FLAGGER.state,
                                    WAITING_FOR_FLAGGER.description)
            self._queued[canary.key] = (desired, self._clock())
            out.append(desired)
        return out

    # -- Flagger's webhooks --------------------------------------------------------------------

    def note_event(self, namespace: str, name: str, message: str) -> None:
        """A Flagger event: remember the check it says failed, and say it if already failed."""
        check = failed_check(message)
        if check is None:
            return
        key = ObjectKey("Canary", namespace, name)
        self.failed_checks[key] = check
        canary = self._cluster.store.get(key)
        if canary is not None and canary.status.get("phase") == FAILED:
            self.post(canary)

    async def gate(self, gate: str, hook: str, namespace: str, name: str) -> tuple[int, str]:
        """(HTTP status, reason) for a Flagger gate webhook: 200 to go on (or, for `rollback`,
        to roll back), 403 not (yet), 404 unknown gate or canary, 409 when the commit cannot
        be told, 503 when Gitea cannot be read."""
        require = self._cfg.gates.get(gate)
        if require is None:
            return 404, f"no gate named {gate!r}"
        canary = self._cluster.store.get(ObjectKey("Canary", namespace, name))
        if canary is None:
            return 404, f"no Canary {namespace}/{name} in the cache"
        located = self.locate(canary)
        if isinstance(located, Unknown):
            return 409, located.reason
        found, repo = located
        instances = self._locator.instances(repo.key)
        if not instances:
            return 409, f"no configured Gitea instance hosts {repo.full_name}"
        contexts = frozenset(require.require)
        try:
            listing = await self._view.read_commit(
                (instances[0], repo.key, found.sha), repo.owner, repo.name, contexts,
                Budget(self.gate_read_pages), "gate")
        except GiteaError as exc:
            return 503, f"cannot read the statuses of {found.sha[:12]}: {exc}"
        if not listing.covered:
            return 503, f"{found.sha[:12]} has too many statuses to read"
        shown = {c: fields[0] for c, fields in listing.shown.items()}
        verdict: GateAnswer = answer(hook, require.require, shown, found.sha)
        return (200 if verdict.yes else 403), verdict.reason
