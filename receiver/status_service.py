"""Flux -> Gitea: the shell around `statuses`. Receives events, queues, posts, resyncs, badges.

Work flows one way: a signal (a Flux event, a routed push, a delivery target finishing, or the
resync reading live state) becomes `DesiredStatus`es through the pure mapping, one job per
Gitea instance that hosts the repository. Jobs are keyed by (instance, repo, sha, context):
Gitea keeps one latest status per key, so a newer job for a key replaces a waiting one, and a
key is never posted by two workers at once (the order of posts is the order of truth).

Before posting, a job is compared with what we last posted for its key (bounded LRU), or, for
the first post on a commit since start, with Gitea's newest status of that context (one
listing of the commit answers for all its contexts). Event and
push jobs compare state, description and target URL; jobs derived from live state (resync,
delivery outcomes) compare the state only, so they repair what is missing without rewriting
an event's wording.
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
from dataclasses import dataclass

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from receiver import badges
from receiver.config import ConfigError, SecretSource, Settings, read_secret_file
from receiver.deliveries import Delivery
from receiver.events import EventError, FluxEvent, parse_event
from receiver.flux.cluster import Cluster
from receiver.flux.objects import CONSUMER_KINDS, FluxObject, ObjectKey, consumer_source
from receiver.flux.revisions import FAILED, READY, TIMED_OUT, progress_at
from receiver.gitea.client import CreateStatusOption, GiteaClient, GiteaError
from receiver.gitea.payloads import Push
from receiver.giturls import normalise_aliases, normalise_host
from receiver.http import (
    UNAUTHORIZED,
    BodyTooLarge,
    declared_too_large,
    error,
    media_type,
    read_capped,
)
from receiver.metrics import Metrics
from receiver.signatures import verify_bearer, verify_event
from receiver.statuses import (
    CONTEXT_FIELDS,
    MAPPED,
    TARGET_URL_FIELDS,
    DesiredStatus,
    StatusTemplates,
    check_template,
    desired_after_timeout,
    desired_from_event,
    desired_from_object,
    instance_hosts,
    instances_for,
    pending_for_push,
    same_status,
)

log = logging.getLogger(__name__)

JobKey = tuple[str, str, str, str]  # (instance, repo key, sha, context)
Fields = tuple[str, str, str]  # (state, description, target_url)


@dataclass
class _Job:
    instance: str
    status: DesiredStatus
    state_only: bool
    enqueued: float
    attempts: int = 0

    @property
    def key(self) -> JobKey:
        return (self.instance, *self.status.key)

    @property
    def fields(self) -> Fields:
        return (self.status.state, self.status.description, self.status.target_url)


def backoff_delay(attempt: int, base: float, cap: float, rng: Callable[[], float]) -> float:
    """Exponential backoff with jitter: a random point in the upper half of base * 2^(n-1)."""
    ceiling = min(cap, base * 2.0 ** max(attempt - 1, 0))
    return ceiling / 2 + rng() * ceiling / 2


class StatusService:
    # Tunables that are not settings; tests shorten them.
    workers = 8
    retry_base_seconds = 0.5
    retry_cap_seconds = 30.0
    posted_cache_size = 100_000
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
        self._templates = StatusTemplates(
            settings.cluster_name, cfg.context_template, cfg.target_url_template)
        aliases = normalise_aliases(settings.host_aliases)

        def host_key(host: str) -> str:
            canonical = normalise_host(host)
            return aliases.get(canonical, canonical)

        self._hosts = instance_hosts(((i.name, i.url, i.hosts) for i in settings.gitea), host_key)
        self._client = GiteaClient(settings.gitea, self._read_token, transport=transport)
        self._holder = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self._latest: dict[JobKey, _Job] = {}  # waiting to be taken, newest per key
        self._busy: set[JobKey] = set()  # being posted, or waiting for a retry
        self._keys: asyncio.Queue[JobKey] = asyncio.Queue()
        self._posted: OrderedDict[JobKey, Fields] = OrderedDict()
        self._listed: OrderedDict[tuple[str, str, str], None] = OrderedDict()  # commits read
        self._timers: dict[JobKey, asyncio.TimerHandle] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._secrets: dict[SecretSource, tuple[float, str]] = {}
        self._urls: dict[str, str | None] = {}
        self._accepting = True  # until stop(); jobs queued before start() wait for workers
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
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
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
            self._metrics.statuses.labels("failed").inc(len(wanted))
            log.warning("status queue full: pending statuses of a push dropped",
                        extra={"delivery": delivery.id, "statuses": len(wanted)})

    def on_target_changed(self, delivery: Delivery, key: ObjectKey, state: str) -> None:
        """A tracked consumer finished for the pushed commit: post its outcome.

        This is what closes the loop when no Flux Provider points at us, and what ends the
        `pending` of a commit Flux never deployed (timed out: skipped or error).
        """
        if (key.kind not in CONSUMER_KINDS or not delivery.sha or not self._accepting
                or not self._settings.gitea):
            return
        if state not in (READY, FAILED, TIMED_OUT):
            return
        obj, source = self._object_and_source(key)
        if obj is None:
            return
        if state == TIMED_OUT:
            desired = desired_after_timeout(
                obj, source, delivery.sha, self._templates, self._normalise)
        else:
            desired = desired_from_object(obj, source, self._templates, self._normalise)
        if desired is not None and desired.sha == delivery.sha:
            self._enqueue([desired], state_only=True)

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
        enqueued = self._enqueue(wanted, state_only=False)
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
        """Enqueue the status every Git-sourced consumer should have; returns how many.

        Statuses we already posted with that state are skipped here, so a steady cluster costs
        no queue space and no Gitea call.
        """
        if not self._settings.gitea:
            return 0  # nowhere to post: deriving statuses would be wasted work
        store = self._cluster.store
        room = max(1, int(self._settings.statuses.queue_size * self.resync_queue_share))
        count = 0
        for kind in ("Kustomization", "HelmRelease"):
            for index, obj in enumerate(store.list(kind)):
                if index % 500 == 499:
                    await asyncio.sleep(0)  # a big cache must not stall event intake
                _, source = self._object_and_source(obj.key)
                if source is None or source.kind != "GitRepository":
                    continue
                desired = desired_from_object(obj, source, self._templates, self._normalise)
                if desired is None:
                    continue
                instances = instances_for(desired.repo_key, self._hosts)
                if all(self._known_same((i, *desired.key), (desired.state, "", ""))
                       for i in instances):
                    continue  # Gitea has it (or no instance hosts the repository)
                if not await self._room_for_resync(room):
                    log.warning("status queue stays full; resync continues next round")
                    return count
                count += self._enqueue([desired], state_only=True) or 0
        return count

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
                if not leader:
                    last_run = None  # on taking over, resync at once
                elif last_run is None or self._clock() - last_run >= cfg.resync_interval_seconds:
                    last_run = self._clock()
                    count = await self.resync_once()
                    log.info("resync done", extra={"statuses": count})
            except Exception:
                log.exception("resync failed; retrying next round")
            await asyncio.sleep(tick)

    # -- queue -------------------------------------------------------------------------------

    def _enqueue(self, wanted: Iterable[DesiredStatus], *, state_only: bool) -> int | None:
        """One job per (status, hosting instance); None, and nothing queued, if full."""
        now = self._clock()
        jobs = [_Job(instance, status, state_only, now)
                for status in wanted for instance in instances_for(status.repo_key, self._hosts)]
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
                self._metrics.statuses.labels("failed").inc()
            if retry_in is None:
                self._release(key)
                continue
            # Retry later; a newer job that came in meanwhile goes instead, with the count.
            newer = self._latest.setdefault(key, job)
            newer.attempts = max(newer.attempts, job.attempts)
            self._timers[key] = asyncio.get_running_loop().call_later(
                retry_in, self._release, key)

    async def _deliver(self, job: _Job) -> float | None:
        """Post one job unless Gitea has it; None when done, else seconds until a retry."""
        status = job.status
        try:
            if job.key not in self._posted:
                await self._learn_commit(job)
            if self._known_same(job.key, job.fields, state_only=job.state_only):
                self._metrics.statuses.labels("deduplicated").inc()
                return None
            await self._client.post_status(
                job.instance, status.owner, status.repo, status.sha,
                CreateStatusOption(status.state, status.target_url, status.description,
                                   status.context))
        except GiteaError as exc:
            job.attempts += 1
            if exc.retryable and job.attempts < self._settings.statuses.max_attempts:
                self._metrics.statuses.labels("retried").inc()
                delay = backoff_delay(job.attempts, self.retry_base_seconds,
                                      self.retry_cap_seconds, self._rng)
                return max(delay, exc.retry_after or 0.0)
            self._metrics.statuses.labels("failed").inc()
            log.warning("commit status not posted", extra={
                "instance": job.instance, "repo": status.repo_key, "commit": status.sha,
                "context": status.context, "state": status.state, "attempts": job.attempts,
                "error": str(exc)})
            return None
        self._remember(job.key, job.fields)
        self._metrics.statuses.labels("posted").inc()
        return None

    async def _learn_commit(self, job: _Job) -> None:
        """Read Gitea's newest status per context of the job's commit, once per commit.

        One listing answers for every context on the commit (a push touching twenty
        consumers costs one GET, not twenty); a context it does not show has no status.
        """
        commit = job.key[:3]
        if commit in self._listed:
            return
        status = job.status
        found = await self._client.list_statuses(job.instance, status.owner, status.repo,
                                                 status.sha)
        for item in found:  # newest first: the first of each context is its latest
            key = (*commit, item.context)
            if item.state and key not in self._posted:
                self._remember(key, (item.state, item.description, item.target_url))
        self._listed[commit] = None
        while len(self._listed) > self.posted_cache_size // 10:
            self._listed.popitem(last=False)

    def _known_same(self, key: JobKey, fields: Fields, *, state_only: bool = True) -> bool:
        known = self._posted.get(key)
        return known is not None and same_status(known, fields, state_only=state_only)

    def _remember(self, key: JobKey, fields: Fields) -> None:
        self._posted[key] = fields
        self._posted.move_to_end(key)
        while len(self._posted) > self.posted_cache_size:
            self._posted.popitem(last=False)

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

    async def _read_token(self, source: SecretSource, fresh: bool) -> str:
        return await self._secret(source, fresh)
