"""Flux -> Gitea: the shell around `statuses`. Receives events, queues, posts, resyncs, badges.

Work flows one way: a signal (a Flux event, a routed push, a delivery target finishing, or the
resync reading live state) becomes `DesiredStatus`es through the pure mapping, one job per
Gitea instance that hosts the repository. Jobs are keyed by (instance, repo, sha, context):
Gitea keeps one latest status per key, so a newer job for a key replaces a waiting one, and a
key is never posted by two workers at once (the order of posts is the order of truth).

Several replicas post to one Gitea, so before posting a job is compared with what *Gitea*
shows for its key, never with a replica's own history. A replica remembers what it posted or
read for `statuses.repeat_window_seconds` only (`statuses.recall`): within that window an exact
repeat is skipped and one listing of a commit answers for all its contexts; after it, the
commit's statuses are read again (one paged listing per commit, shared by concurrent jobs).
Memory can only ever say "same": a changed status is always posted. Event and push jobs
compare state, description and target URL; jobs derived from live state (resync, delivery
outcomes) compare the state only, so they repair what is missing without rewriting an event's
wording.

The resync (Lease holder) derives every status from live state and compares it with what Gitea
shows, read fresh: one listing per (instance, repository, commit), newest first, paged, within
a budget of `statuses.resync_read_budget` reads per run; the next run carries on where the last
stopped (`statuses.resync_schedule`).

The fleet status (`statuses.fleet`, decided by `fleet.aggregate`): after this replica posts a
status on a commit of a fleet repository, it reads the commit's whole listing once (checks of
one commit coalesce: posts made while a check runs cost one more read, not one each), and
queues the aggregate; the queue posts it only if Gitea shows otherwise. The resync reads the
whole listing of such commits and does the same, which also turns a stale cluster into `error`
and repairs an aggregate two regions raced on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from receiver import badges
from receiver.config import ConfigError, SecretSource, Settings, read_secret_file
from receiver.deliveries import Delivery
from receiver.delivery_state import SUPERSEDED, package_commit
from receiver.events import EventError, FluxEvent, parse_event
from receiver.fleet import Report, aggregate, cluster_parser, latest_reports
from receiver.flux.cluster import Cluster
from receiver.flux.objects import CONSUMER_KINDS, FluxObject, ObjectKey, consumer_source
from receiver.flux.revisions import FAILED, FINAL_STATES, READY, TIMED_OUT, progress_at
from receiver.flux.revisions import SKIPPED as SKIPPED_STATE
from receiver.gitea.client import (
    CommitStatus,
    CreateStatusOption,
    GiteaClient,
    GiteaError,
    more_pages,
)
from receiver.gitea.payloads import Push
from receiver.gitea.version import SKIPPED, accepts_skipped, state_for_version
from receiver.giturls import normalise_aliases, normalise_host
from receiver.http import (
    UNAUTHORIZED,
    BodyTooLarge,
    declared_too_large,
    error,
    media_type,
    read_capped,
)
from receiver.metrics import NO_INSTANCE, Metrics
from receiver.signatures import verify_bearer, verify_event
from receiver.statuses import (
    CONTEXT_FIELDS,
    MAPPED,
    TARGET_URL_FIELDS,
    CommitKey,
    DesiredStatus,
    Fields,
    Seen,
    check_template,
    desired_after_timeout,
    desired_from_event,
    desired_from_object,
    instance_hosts,
    instances_for,
    latest_per_context,
    needs_post,
    pending_for_push,
    plan_repairs,
    recall,
    recall_for_event,
    repo_of,
    resync_schedule,
)

log = logging.getLogger(__name__)
# Sources whose consumers get statuses: Git URLs, or OCI artifacts that name one (`origin`).
STATUS_SOURCE_KINDS = frozenset({"GitRepository", "OCIRepository"})

JobKey = tuple[str, str, str, str]  # (instance, repo key, sha, context)


@dataclass
class _Job:
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


@dataclass
class _Budget:
    """Gitea reads a piece of work may still make."""

    left: int


@dataclass(frozen=True)
class _Listing:
    shown: dict[str, Fields]  # latest per context among the statuses read
    complete: bool  # every page read: a context not in `shown` has no status
    covered: bool  # complete, or every wanted context found (when not asked for the whole)
    reports: dict[str, Report]  # latest state and time per context


def backoff_delay(attempt: int, base: float, cap: float, rng: Callable[[], float]) -> float:
    """Exponential backoff with jitter: a random point in the upper half of base * 2^(n-1)."""
    ceiling = min(cap, base * 2.0 ** max(attempt - 1, 0))
    return ceiling / 2 + rng() * ceiling / 2


class StatusService:
    # Tunables that are not settings; tests shorten them.
    workers = 8
    retry_base_seconds = 0.5
    retry_cap_seconds = 30.0
    memory_size = 100_000  # observations kept; they also expire after the repeat window
    check_max_pages = 20  # pages read before a post (1,000 statuses); beyond: post anyway
    # The resync never fills more than this share of the queue: events keep room. When it
    # reaches it, it waits for the workers up to `resync_wait_seconds`, then tries next round.
    resync_queue_share = 0.8
    resync_wait_seconds = 30.0

    def __init__(
        self,
        settings: Settings,
        cluster: Cluster,
        metrics: Metrics,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        cfg = settings.statuses
        for name, template, allowed in (
            ("statuses.context_template", cfg.context_template, CONTEXT_FIELDS),
            ("statuses.target_url_template", cfg.target_url_template, TARGET_URL_FIELDS),
        ):
            problem = check_template(template, allowed)
            if problem:
                raise ConfigError(f"{name}: {problem}")
        self._settings = settings
        self._cluster = cluster
        self._metrics = metrics
        self._clock = clock
        self._wall = wall_clock  # compared with the times Gitea gives statuses
        self._templates = cfg.templates(settings.cluster_name)
        self._fleet = cfg.fleet
        self._fleet_parser = (cluster_parser(self._templates.context, cfg.fleet.clusters)
                              if cfg.fleet.enabled else None)
        # Fleet checks under way per commit, and whether a post asked for another meanwhile.
        self._fleet_checks: dict[CommitKey, bool] = {}
        self._fleet_tasks: set[asyncio.Task[None]] = set()
        aliases = normalise_aliases(settings.host_aliases)

        def host_key(host: str) -> str:
            canonical = normalise_host(host)
            return aliases.get(canonical, canonical)

        self._hosts = instance_hosts(((i.name, i.url, i.hosts) for i in settings.gitea), host_key)
        self._client = GiteaClient(settings.gitea, self._read_token, transport=transport)

        def observe(instance: str, call: str, code: str, seconds: float) -> None:
            metrics.gitea_requests.labels(instance, call, code).observe(seconds)

        self._client.observe = observe
        self._holder = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self._latest: dict[JobKey, _Job] = {}  # waiting to be taken, newest per key
        self._busy: set[JobKey] = set()  # being posted, or waiting for a retry
        self._keys: asyncio.Queue[JobKey] = asyncio.Queue()
        # What this replica saw Gitea show (posted or read), oldest first; believed only for
        # the repeat window. `_listed`: when a commit's listing was last read to the end.
        self._seen: OrderedDict[JobKey, Seen] = OrderedDict()
        self._listed: OrderedDict[CommitKey, float] = OrderedDict()
        self._reading: dict[CommitKey, tuple[asyncio.Lock, int]] = {}  # shared reads
        self._cursors: dict[str, CommitKey] = {}  # per instance: where the resync stopped
        self._timers: dict[JobKey, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._secrets: dict[SecretSource, tuple[float, str]] = {}
        self._urls: dict[str, str | None] = {}
        self._versions: dict[str, str] = {}  # per instance, once read ("" when Gitea sent none)
        self._accepting = True  # until stop(); jobs queued before start() wait for workers
        # Package deliveries: (delivery, consumer) -> the commit its pending was queued for.
        self._pending_sent: OrderedDict[tuple[str, ObjectKey], str] = OrderedDict()
        self._rng = random.random

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._tasks:
            return
        if not self._settings.gitea:
            log.warning("no Gitea instances configured: commit statuses will not be posted")
        events = self._settings.events
        if not (events.hmac_token or events.bearer_token or
                self._settings.insecure.allow_unsigned_events):
            log.warning("events.hmac_token and events.bearer_token are unset: POST /events "
                        "answers 401 to everything")
        self._tasks = [asyncio.create_task(self._worker(), name=f"status-worker-{i}")
                       for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self._read_versions(), name="gitea-versions"))
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="status-resync"))

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, give the queue `grace_seconds` to drain, then stop for good."""
        self._accepting = False
        deadline = time.monotonic() + grace_seconds  # real time, whatever clock tests inject
        if self._tasks:
            while self.queue_depth and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        left = self.queue_depth
        if left:
            log.warning("stopping with statuses still queued; the next resync repairs them",
                        extra={"statuses": left})
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks = [*self._tasks, *self._fleet_tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        self._fleet_tasks.clear()
        await self._client.aclose()

    @property
    def queue_depth(self) -> int:
        return len(self._latest) + sum(1 for k in self._busy if k not in self._latest)

    # -- signals -----------------------------------------------------------------------------

    def on_push_routed(self, delivery: Delivery, push: Push) -> None:
        """`pending` on the pushed commit for every consumer the push touches."""
        if not push.sha or not self._accepting or not self._settings.gitea:
            return
        wanted: list[DesiredStatus] = []
        for target in delivery.plan.tracked:
            obj, source = self._object_and_source(target.key)
            # Already deployed at this commit (a re-push, a replayed hook): pending would
            # stay, since Flux has nothing new to do.
            if obj is None or progress_at(obj, push.sha).state == READY:
                continue
            desired = pending_for_push(obj, source, push.sha, self._templates, self._normalise)
            if desired is not None:
                wanted.append(desired)
        if wanted and self._enqueue(wanted, state_only=False) is None:
            self._metrics.statuses.labels(NO_INSTANCE, "failed").inc(len(wanted))
            log.warning("status queue full: pending statuses of a push dropped",
                        extra={"delivery": delivery.id, "statuses": len(wanted)})

    def on_target_changed(self, delivery: Delivery, key: ObjectKey, state: str) -> None:
        """A tracked consumer finished for the pushed commit: post its outcome.

        This is what closes the loop when no Flux Provider points at us, and what ends the
        `pending` of a commit Flux never deployed (timed out: skipped or error). A package
        push names no commit: the one its artifact names is found once the source has the
        artifact, and gets `pending` then (`_package_pending`).
        """
        if key.kind not in CONSUMER_KINDS or not self._accepting or not self._settings.gitea:
            return
        if delivery.sha and state == SKIPPED_STATE:
            target = delivery.view.get(key)
            if target is None or target.reason != SUPERSEDED:
                return
            # Flux went past this commit: end its pending as a push Flux never deployed
            # (`skipped`, naming the commit it deployed instead), never leave it pending.
            state = TIMED_OUT
        if delivery.sha and state not in (READY, FAILED, TIMED_OUT):
            return  # its pending went out when the push was routed
        obj, source = self._object_and_source(key)
        if obj is None:
            return
        if delivery.sha:
            self._post_outcome(obj, source, delivery.sha, state)
            return
        sha = package_commit(delivery.record, source)
        pended = self._pending_sent.get((delivery.id, key))
        if pended is not None and pended != sha and (sha is not None or state in FINAL_STATES):
            # The source moved on (the tag re-pushed, or another tag) before this commit was
            # deployed: end its pending as a timed-out push's (skipped if Flux deployed another).
            self._post_outcome(obj, source, pended, TIMED_OUT)
            del self._pending_sent[(delivery.id, key)]
        if sha is None:
            return
        if state in FINAL_STATES:
            self._post_outcome(obj, source, sha, state)
        else:
            self._package_pending(delivery, obj, source, sha)

    def _post_outcome(self, obj: FluxObject, source: FluxObject | None, sha: str,
                      state: str) -> None:
        if state == TIMED_OUT:
            desired = desired_after_timeout(obj, source, sha, self._templates, self._normalise)
        elif state in (READY, FAILED):
            desired = desired_from_object(obj, source, self._templates, self._normalise)
        else:
            return
        if desired is not None and desired.sha == sha:
            self._enqueue([desired], state_only=True)

    def _package_pending(self, delivery: Delivery, obj: FluxObject, source: FluxObject | None,
                         sha: str) -> None:
        """`pending` once per consumer of a package delivery, when its commit is known: the
        package push's counterpart of `on_push_routed`."""
        key = (delivery.id, obj.key)
        if self._pending_sent.get(key) == sha:
            return
        desired = pending_for_push(obj, source, sha, self._templates, self._normalise)
        if desired is None or self._enqueue([desired], state_only=False) is None:
            return
        self._pending_sent[key] = sha
        self._pending_sent.move_to_end(key)
        while len(self._pending_sent) > self.memory_size:
            self._pending_sent.popitem(last=False)

    # -- POST /events ----------------------------------------------------------------------

    def _count(self, outcome: str, response: Response) -> Response:
        self._metrics.events.labels(outcome).inc()
        return response

    async def handle_event(self, request: Request) -> Response:
        limit = self._settings.body_limit_bytes
        if declared_too_large(request, limit):
            return self._count("too_large", error(413, "body too large"))
        if media_type(request) != "application/json":
            return self._count("unsupported_media_type",
                               error(415, "content type must be application/json"))
        try:
            body = await read_capped(request, limit)
        except BodyTooLarge:
            return self._count("too_large", error(413, "body too large"))
        if not await self._authorised(request, body):
            return self._count("unauthorized", JSONResponse(UNAUTHORIZED, status_code=401))
        try:
            event = parse_event(body)
        except EventError as exc:
            return self._count("invalid", error(exc.status, str(exc)))
        if not self._accepting:
            return self._count("shutting_down", error(503, "shutting down"))
        outcome, wanted = self._map_event(event)
        if not wanted:
            return self._count(outcome, self._accepted(0))
        # An identical body is a redelivery of the same event; any other event is news.
        enqueued = self._enqueue(wanted, state_only=False,
                                 origin=hashlib.sha256(body).hexdigest()[:16])
        if enqueued is None:
            return self._count("queue_full", error(503, "status queue is full"))
        return self._count("accepted", self._accepted(enqueued))

    @staticmethod
    def _accepted(count: int) -> Response:
        return JSONResponse({"accepted": True, "statuses": count}, status_code=202)

    def _map_event(self, event: FluxEvent) -> tuple[str, list[DesiredStatus]]:
        inv = event.involved
        obj, source = self._object_and_source(ObjectKey(inv.kind, inv.namespace, inv.name))
        mapping = desired_from_event(event, obj, source, self._templates, self._normalise)
        if mapping.outcome != MAPPED or mapping.status is None:
            return mapping.outcome, []
        if not instances_for(mapping.status.repo_key, self._hosts):
            return "no_instance", []
        return mapping.outcome, [mapping.status]

    async def _authorised(self, request: Request, body: bytes) -> bool:
        """HMAC over the raw bytes or a bearer token; unsigned only behind the insecure switch.

        Presented credentials that do not verify are refused even when unsigned events are
        allowed: a wrong signature is a misconfiguration worth seeing.
        """
        headers = request.headers
        events = self._settings.events
        presented = False
        signature = headers.get("x-signature", "").strip()
        if signature:
            presented = True
            token = await self._secret_or_none(events.hmac_token)
            # Flux's generic-hmac Provider signs with SHA-256 only; accept nothing weaker.
            if token is not None and not signature.lower().startswith("sha256="):
                self._metrics.signature_failures.labels("events-hmac", "algorithm").inc()
            elif token is not None:
                verdict = verify_event(headers, body, token)
                if verdict.ok:
                    return True
                self._metrics.signature_failures.labels("events-hmac", verdict.reason).inc()
        if headers.get("authorization", "").strip():
            presented = True
            token = await self._secret_or_none(events.bearer_token)
            if token is not None:
                verdict = verify_bearer(headers, token)
                if verdict.ok:
                    return True
                self._metrics.signature_failures.labels("events-bearer", verdict.reason).inc()
        if not presented and self._settings.insecure.allow_unsigned_events:
            return True
        if not presented:
            self._metrics.signature_failures.labels("events", "missing").inc()
        return False

    # -- badges ------------------------------------------------------------------------------

    async def badge(self, request: Request) -> Response:
        """GET /badge/{owner}/{repo}.svg?branch=&cluster=&style=&token= (see `badges`)."""
        query = request.query_params
        style = query.get("style", "flat")
        style = style if style in badges.STYLES else "flat"
        label = self._settings.cluster_name
        try:
            state = await self._badge_state(request)
        except Exception:  # a badge is never a 500; the log says why it is grey
            log.exception("badge failed")
            state = badges.UNKNOWN
        svg = badges.badge_svg(label, state, style)
        etag = '"' + hashlib.sha256(svg.encode()).hexdigest()[:32] + '"'
        headers = {"Cache-Control": "no-cache, max-age=0", "ETag": etag}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(svg, media_type="image/svg+xml", headers=headers)

    async def _badge_state(self, request: Request) -> str:
        path = str(request.path_params.get("path") or request.url.path.split("/badge/", 1)[-1])
        if not path.endswith(".svg"):
            return badges.UNKNOWN
        parts = path.removesuffix(".svg").split("/")
        if len(parts) != 2 or not all(parts):
            return badges.UNKNOWN
        owner, repo = parts
        query = request.query_params
        branch = query.get("branch") or None
        cluster = query.get("cluster")
        if cluster and cluster != self._settings.cluster_name:
            return badges.UNKNOWN
        if self._settings.badge_key is not None:
            key = await self._secret_or_none(self._settings.badge_key)
            if key is None or not badges.token_allows(
                    key, query.get("token", ""), owner, repo, branch or ""):
                return badges.UNKNOWN
        return badges.repository_state(self._cluster.store, owner, repo, branch)

    # -- resync ------------------------------------------------------------------------------

    async def resync_once(self) -> int:
        """Queue the live-state status of every consumer of a GitRepository or OCIRepository
        that Gitea shows otherwise.

        Desired statuses are grouped by (instance, repository, commit); each group costs one
        listing of the commit in Gitea (pages = ceil(statuses / 50), fewer when the wanted
        contexts show up early), at most `statuses.resync_read_budget` reads per run. The next
        run carries on after the last commit checked. Returns how many statuses were queued.
        """
        if not self._settings.gitea:
            return 0  # nowhere to post: deriving statuses would be wasted work
        cfg = self._settings.statuses
        wanted = await self._desired_by_commit()
        room = max(1, int(cfg.queue_size * self.resync_queue_share))
        budget = _Budget(cfg.resync_read_budget)
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
            fleet = self._fleet_covers(desired[0])
            try:
                listing = await self._read_commit(
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
                self._queue_fleet(commit, desired[0], listing)
            queued = 0
            for repair in repairs:
                added = (self._enqueue([repair], state_only=True, instance=instance)
                         if await self._room_for_resync(room) else None)
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
                _, source = self._object_and_source(obj.key)
                if source is None or source.kind not in STATUS_SOURCE_KINDS:
                    continue
                desired = desired_from_object(obj, source, self._templates, self._normalise)
                if desired is None:
                    continue
                for instance in instances_for(desired.repo_key, self._hosts):
                    wanted.setdefault((instance, desired.repo_key, desired.sha), []).append(
                        desired)
        return wanted

    async def _room_for_resync(self, room: int) -> bool:
        deadline = time.monotonic() + self.resync_wait_seconds
        while len(self._latest) >= room:
            if time.monotonic() >= deadline or not self._tasks:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _resync_loop(self) -> None:
        cfg = self._settings.statuses
        while not self._cluster.synced:
            await asyncio.sleep(0.2)
        last_run: float | None = None
        tick = min(cfg.resync_interval_seconds, cfg.lease_duration_seconds / 3)
        while True:
            try:
                leader = await self._cluster.try_acquire_lease(
                    cfg.lease_name, self._holder, cfg.lease_duration_seconds)
                self._metrics.resync_leader.set(1 if leader else 0)
                if not leader:
                    last_run = None  # on taking over, resync at once
                elif last_run is None or self._clock() - last_run >= cfg.resync_interval_seconds:
                    last_run = self._clock()
                    await self.resync_once()
                    self._metrics.resync_last_success.set(time.time())
            except Exception:
                log.exception("resync failed; retrying next round")
            await asyncio.sleep(tick)

    # -- queue -------------------------------------------------------------------------------

    def _enqueue(
        self, wanted: Iterable[DesiredStatus], *, state_only: bool, instance: str | None = None,
        origin: str = "",
    ) -> int | None:
        """One job per (status, hosting instance, or just `instance`); None if full."""
        now = self._clock()
        jobs = [_Job(name, status, state_only, now, origin=origin)
                for status in wanted for name in instances_for(status.repo_key, self._hosts)
                if instance is None or name == instance]
        new_keys = {job.key for job in jobs if job.key not in self._latest}
        if len(self._latest) + len(new_keys) > self._settings.statuses.queue_size:
            return None
        for job in jobs:
            current = self._latest.get(job.key)
            if current is not None:
                # An event's exact wording outranks a repair derived from live state.
                if job.state_only and not current.state_only:
                    continue
                job.attempts = current.attempts
                self._latest[job.key] = job
                continue
            self._latest[job.key] = job
            if job.key not in self._busy:
                self._keys.put_nowait(job.key)
        self._metrics.status_queue_depth.set(self.queue_depth)
        return len(jobs)

    def _release(self, key: JobKey) -> None:
        """A key's post (or retry wait) is over: let a newer job for it run."""
        self._timers.pop(key, None)
        self._busy.discard(key)
        if key in self._latest:
            self._keys.put_nowait(key)
        self._metrics.status_queue_depth.set(self.queue_depth)

    async def _worker(self) -> None:
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

    async def _deliver(self, job: _Job) -> float | None:
        """Post one job unless Gitea shows it; None when done, else seconds until a retry."""
        status = job.status
        try:
            status = await self._for_instance(job.instance, status)
            known, shown = self._recall_job(job)
            if not known:
                known, shown = await self._check_commit(job)
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
            if exc.retryable and job.attempts < self._settings.statuses.max_attempts:
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
        self._observe(job.key, status.fields, self._clock(), job.origin)
        self._metrics.statuses.labels(job.instance, "posted").inc()
        if self._fleet_covers(status) and status.context != self._fleet.context:
            self._fleet_soon(job.key[:3], status)
        return None

    async def _check_commit(self, job: _Job) -> tuple[bool, Fields | None]:
        """What Gitea shows for the job's key: read now, or by a concurrent job just before.

        Jobs of one commit share the read: the first reads, the others wait and then find a
        fresh answer (a push touching twenty consumers costs one listing, not twenty).
        """
        commit: CommitKey = job.key[:3]
        lock, users = self._reading.get(commit, (asyncio.Lock(), 0))
        self._reading[commit] = (lock, users + 1)
        try:
            async with lock:
                known, shown = self._recall_job(job)
                if known:
                    return known, shown
                context = job.status.context
                listing = await self._read_commit(
                    commit, job.status.owner, job.status.repo, frozenset({context}),
                    _Budget(self.check_max_pages), "check")
                if context in listing.shown:
                    return True, listing.shown[context]
                return listing.complete, None
        finally:
            lock, users = self._reading[commit]
            if users <= 1:
                del self._reading[commit]
            else:
                self._reading[commit] = (lock, users - 1)

    async def _read_commit(
        self, commit: CommitKey, owner: str, repo: str, wanted: frozenset[str],
        budget: _Budget, purpose: str, *, whole: bool = False,
    ) -> _Listing:
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
            self._observe((*commit, context), fields, at)
        if complete:
            self._listed[commit] = at
            self._listed.move_to_end(commit)
        self._forget(self._clock())
        covered = complete or (not whole and wanted <= shown.keys())
        return _Listing(shown, complete, covered, latest_reports(items))

    # -- the fleet status --------------------------------------------------------------------

    def _fleet_covers(self, status: DesiredStatus) -> bool:
        return self._fleet_parser is not None and self._fleet.covers(status.owner, status.repo)

    def _fleet_soon(self, commit: CommitKey, status: DesiredStatus) -> None:
        """Check the commit's fleet status; one check per commit at a time, plus one more
        if posts came in while it ran."""
        if not self._accepting:
            return
        if commit in self._fleet_checks:
            self._fleet_checks[commit] = True
            return
        self._fleet_checks[commit] = False
        task = asyncio.create_task(self._fleet_check(commit, status), name="fleet-check")
        self._fleet_tasks.add(task)
        task.add_done_callback(self._fleet_tasks.discard)

    async def _fleet_check(self, commit: CommitKey, status: DesiredStatus) -> None:
        try:
            while True:
                self._fleet_checks[commit] = False
                try:
                    listing = await self._read_commit(
                        commit, status.owner, status.repo, frozenset(),
                        _Budget(self.check_max_pages), "fleet", whole=True)
                except GiteaError as exc:
                    log.warning("cannot read statuses for the fleet status; the resync "
                                "repairs it", extra={"instance": commit[0],
                                                     "repo": status.repo_key,
                                                     "commit": commit[2], "error": str(exc)})
                    return
                self._queue_fleet(commit, status, listing)
                if not self._fleet_checks.get(commit):
                    return
        except Exception:
            log.exception("fleet status check crashed", extra={"commit": commit[2]})
        finally:
            self._fleet_checks.pop(commit, None)

    def _queue_fleet(self, commit: CommitKey, status: DesiredStatus, listing: _Listing) -> None:
        """Queue the aggregate the listing implies, if Gitea shows another."""
        if self._fleet_parser is None:
            return
        if not listing.complete:
            log.warning("commit has too many statuses to read whole; fleet status not updated",
                        extra={"instance": commit[0], "repo": status.repo_key,
                               "commit": commit[2]})
            return
        fleet = self._fleet
        verdict = aggregate(listing.reports, self._fleet_parser, fleet.clusters, fleet.context,
                            self._wall(), fleet.stale_after_seconds)
        if verdict is None:
            return
        desired = DesiredStatus(status.repo_key, status.owner, status.repo, commit[2],
                                fleet.context, verdict.state, verdict.description)
        if needs_post(listing.shown.get(fleet.context), desired.fields, state_only=False):
            self._enqueue([desired], state_only=False, instance=commit[0])

    def _recall_job(self, job: _Job) -> tuple[bool, Fields | None]:
        if not job.origin:
            return self._recall(job.key)
        return recall_for_event(self._seen.get(job.key), self._listed.get(job.key[:3]),
                                self._clock(), self._settings.statuses.repeat_window_seconds,
                                job.origin, job.enqueued)

    def _recall(self, key: JobKey) -> tuple[bool, Fields | None]:
        return recall(self._seen.get(key), self._listed.get(key[:3]), self._clock(),
                      self._settings.statuses.repeat_window_seconds)

    def _observe(self, key: JobKey, fields: Fields, at: float, origin: str = "") -> None:
        current = self._seen.get(key)
        if current is not None and current.at > at:
            return  # a post made while a listing was under way is newer than the listing
        self._seen[key] = Seen(fields, at, origin)
        self._seen.move_to_end(key)
        self._forget(at)

    def _forget(self, now: float) -> None:
        """Drop what may no longer be believed: older than the window, or over the size."""
        horizon = now - self._settings.statuses.repeat_window_seconds
        while self._seen and (len(self._seen) > self.memory_size
                              or next(iter(self._seen.values())).at <= horizon):
            self._seen.popitem(last=False)
        while self._listed and (len(self._listed) > self.memory_size
                                or next(iter(self._listed.values())) <= horizon):
            self._listed.popitem(last=False)

    # -- Gitea versions ----------------------------------------------------------------------

    async def _read_versions(self) -> None:
        """Read every instance's version at start; one that does not answer now is read again
        before a status that depends on it is posted."""
        for name in self._client.instance_names:
            try:
                await self._version(name)
            except GiteaError as exc:
                log.warning("cannot read the Gitea version; asked again before posting a "
                            "skipped status", extra={"instance": name, "error": str(exc)})
            except Exception:
                log.exception("reading the Gitea version crashed", extra={"instance": name})

    async def _version(self, instance: str) -> str:
        if instance not in self._versions:
            version = await self._client.server_version(instance)
            self._versions[instance] = version
            log.info("gitea instance version", extra={
                "instance": instance, "version": version or "unknown",
                "skipped_posted_as": SKIPPED if accepts_skipped(version)
                else state_for_version(SKIPPED, version)})
        return self._versions[instance]

    async def _for_instance(self, instance: str, status: DesiredStatus) -> DesiredStatus:
        """The status as this instance accepts it (`skipped` only on Gitea >= 1.25)."""
        if status.state != SKIPPED:
            return status
        state = state_for_version(status.state, await self._version(instance))
        return status if state == status.state else replace(status, state=state)

    async def ask_contains(self, source: FluxObject, ours: str, held: str) -> bool | None:
        """`ancestry.Ask`: does `held` contain `ours` in the repository `source` fetches? None
        when no configured Gitea instance serves that repository."""
        repo = repo_of(source, None, self._normalise)
        instances = instances_for(repo.key, self._hosts) if repo is not None else ()
        if repo is None or not instances:
            return None
        return await self._client.contains(instances[0], repo.owner, repo.name, ours, held)

    # -- cluster and secrets -----------------------------------------------------------------

    def _normalise(self, url: str) -> str | None:
        # Every event re-reads its source's URL; normalising is pure, so remember it.
        try:
            return self._urls[url]
        except KeyError:
            if len(self._urls) >= 10_000:
                self._urls.clear()
            found = self._urls[url] = self._cluster.store.normalise_url(url)
            return found

    def _object_and_source(self, key: ObjectKey) -> tuple[FluxObject | None, FluxObject | None]:
        store = self._cluster.store
        obj = store.get(key)
        if obj is None:
            return None, None
        ref = consumer_source(obj)
        return obj, store.get(ref.key) if ref is not None else None

    async def _secret(self, source: SecretSource, fresh: bool = False) -> str:
        """A secret's value, cached for `secret_cache_seconds` (rotation is picked up)."""
        now = self._clock()
        cached = self._secrets.get(source)
        if cached is not None and not fresh and now < cached[0]:
            return cached[1]
        if source.file is not None:
            value = read_secret_file(source.file)
        else:
            namespace, _, name = (source.secret or "").partition("/")
            data = await self._cluster.read_secret(namespace, name, fresh=fresh)
            if data is None or source.key not in data:
                raise ConfigError(f"secret {source.secret} has no key {source.key}")
            value = data[source.key].decode()
        self._secrets[source] = (now + self._settings.secret_cache_seconds, value)
        return value

    async def _secret_or_none(self, source: SecretSource | None) -> str | None:
        if source is None:
            return None
        try:
            value = await self._secret(source)
        except (ConfigError, UnicodeDecodeError) as exc:
            log.error("cannot read a secret", extra={"error": str(exc)})
            return None
        return value or None

    def configured_secrets(self) -> list[tuple[str, SecretSource]]:
        """(setting, source) of every secret the configuration names, settings spelled as in
        the configuration file (`gitea[eu].token`)."""
        found: list[tuple[str, SecretSource | None]] = [
            (f"gitea[{instance.name}].token", instance.token) for instance in self._settings.gitea]
        found += [("events.hmac_token", self._settings.events.hmac_token),
                  ("events.bearer_token", self._settings.events.bearer_token),
                  ("badge_key", self._settings.badge_key)]
        return [(setting, source) for setting, source in found if source is not None]

    async def unreadable_secrets(self) -> dict[str, str]:
        """setting -> why it cannot be used now, for every configured secret that cannot be read
        or is blank. The reason names the file or Secret, never a value."""
        problems: dict[str, str] = {}
        for setting, source in self.configured_secrets():
            try:
                value = await self._secret(source)
            except ConfigError as exc:
                problems[setting] = str(exc)
                continue
            except UnicodeDecodeError:
                problems[setting] = f"secret {source.secret} key {source.key} is not UTF-8 text"
                continue
            except Exception as exc:  # a Kubernetes API error: reported, not raised
                problems[setting] = f"cannot read secret {source.secret}: {type(exc).__name__}"
                continue
            if not value.strip():
                self._secrets.pop(source, None)  # read again next time: it may be written soon
                where = source.file if source.file is not None else (
                    f"secret {source.secret} key {source.key}")
                problems[setting] = f"{where} is empty"
        return problems

    async def _read_token(self, source: SecretSource, fresh: bool) -> str:
        return await self._secret(source, fresh)
