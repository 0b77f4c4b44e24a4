"""The status side, wired: each job in its own part, their lifecycle here.

Work flows one way: a signal (a Flux event, a routed push, a delivery target finishing, or the
resync reading live state) becomes `DesiredStatus`es through the pure mapping (`statuses`), one
job per Gitea instance that hosts the repository (`queue`), each compared with what Gitea shows
(`gitea_view`) before it is posted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable

import httpx

from receiver.config import ConfigError, SecretSource, Settings
from receiver.delivery.store import Delivery
from receiver.flux.cluster import Cluster
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.gitea.client import GiteaClient
from receiver.gitea.payloads import Push
from receiver.gitea.ref_payloads import PullRequestEvent
from receiver.metrics import Metrics
from receiver.status.canary_statuses import CanaryStatuses
from receiver.status.env_badges import EnvironmentStates
from receiver.status.fleet_checks import FleetChecks
from receiver.status.gitea_view import GiteaView
from receiver.status.locator import Locator
from receiver.status.pr_service import PullComments
from receiver.status.queue import StatusQueue
from receiver.status.repos import repo_of
from receiver.status.resync import Resync
from receiver.status.secrets import SecretReader
from receiver.status.settle import PendingEvents
from receiver.status.signals import DeliverySignals
from receiver.status.versions import GiteaVersions
from receiver.templates import CONTEXT_FIELDS, TARGET_URL_FIELDS, check_template

log = logging.getLogger("receiver.status_service")


class StatusService:
    workers = 8
    memory_size = 100_000  # observations and package pendings kept

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
        self._settings = self.settings = settings
        self.cluster = cluster
        self.metrics = metrics
        self.templates = templates = cfg.templates(settings.cluster_name)
        self.secrets = SecretReader(settings, cluster, clock)
        self.locator = Locator(settings, cluster)
        self._client = GiteaClient(settings.gitea, self.secrets.read, transport=transport)

        def observe(instance: str, call: str, code: str, seconds: float) -> None:
            metrics.gitea_requests.labels(instance, call, code).observe(seconds)

        self._client.observe = observe
        self.versions = GiteaVersions(self._client)
        self.view = GiteaView(settings, self._client, metrics, clock, self.memory_size)
        self.queue = StatusQueue(settings, self._client, self.view, self.versions, self.locator,
                                 metrics, clock)
        self.fleet = FleetChecks(settings, templates, self.view, self.queue, wall_clock)
        self.queue.on_posted.append(self.fleet.on_posted)
        self.resync = Resync(settings, cluster, templates, self.locator, self.view, self.queue,
                             self.fleet, self.versions, metrics, clock)
        self.canaries = CanaryStatuses(settings, cluster, templates, self.locator, self.queue,
                                       self.view)
        self.resync.extra.append(self.canaries.all_desired)
        self.fleet.local = self.canaries.local
        self.environments = EnvironmentStates(settings, cluster, self.locator, self.view)
        self.signals = DeliverySignals(settings, templates, self.locator, self.queue, metrics,
                                       self.memory_size)
        self.holder = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"  # of the resync Lease

        async def still_leader() -> bool:
            return await cluster.try_acquire_lease(cfg.lease_name, self.holder,
                                                   cfg.lease_duration_seconds)

        self.comments = PullComments(settings, cluster, self._client, self.locator, templates,
                                     self.queue, metrics, clock, lambda: self.resync.leader,
                                     still_leader, wall_clock)
        cluster.store.subscribe(self.comments.on_store_change)
        self.pending_events = PendingEvents(self.locator, templates, self.queue)
        cluster.store.subscribe(self.pending_events.on_store_change)
        self.resync.on_run.append(self.comments.resync)
        self._tasks: list[asyncio.Task[None]] = []

    # -- tunables that are not settings; tests shorten them ----------------------------------

    @property
    def retry_base_seconds(self) -> float:
        return self.queue.retry_base_seconds

    @retry_base_seconds.setter
    def retry_base_seconds(self, value: float) -> None:
        self.queue.retry_base_seconds = value

    @property
    def retry_cap_seconds(self) -> float:
        return self.queue.retry_cap_seconds

    @retry_cap_seconds.setter
    def retry_cap_seconds(self, value: float) -> None:
        self.queue.retry_cap_seconds = value

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
        self._tasks = [asyncio.create_task(self.queue.worker(), name=f"status-worker-{i}")
                       for i in range(self.workers)]
        self._tasks.append(asyncio.create_task(self.versions.read_all(), name="gitea-versions"))
        self._tasks.append(asyncio.create_task(self.resync.loop(self.holder),
                                               name="status-resync"))
        self._tasks.append(asyncio.create_task(self.comments.loop(), name="pr-comments"))
        # Know the previews cached so far now, leader or not: one that goes before this
        # replica takes the Lease must still be torn down.
        self.comments.resync()
        self.resync.running = True

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop accepting, give the queue `grace_seconds` to drain, then stop for good."""
        self.queue.accepting = False
        deadline = time.monotonic() + grace_seconds  # real time, whatever clock tests inject
        if self._tasks:
            while self.queue_depth and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        left = self.queue_depth
        if left:
            log.warning("stopping with statuses still queued; the next resync repairs them",
                        extra={"statuses": left})
        self.queue.cancel_retries()
        self.resync.running = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        await self.fleet.stop()
        await self._client.aclose()

    @property
    def queue_depth(self) -> int:
        return self.queue.depth

    # -- what the rest of the bridge calls -------------------------------------------------

    def on_push_routed(self, delivery: Delivery, push: Push) -> None:
        self.signals.on_push_routed(delivery, push)

    def on_target_changed(self, delivery: Delivery, key: ObjectKey, state: str) -> None:
        self.signals.on_target_changed(delivery, key, state)

    def on_pull_request(self, event: PullRequestEvent) -> int:
        """A routed `pull_request` webhook (any replica): `pending` on the new head commit for
        each preview already running for it, and its comment checked again. Returns how many
        statuses were queued."""
        return self.comments.on_pull_request(event)

    async def resync_once(self) -> int:
        return await self.resync.once()

    async def ask_contains(self, source: FluxObject, ours: str, held: str) -> bool | None:
        """`ancestry.Ask`: does `held` contain `ours` in the repository `source` fetches? None
        when no configured Gitea instance serves that repository."""
        repo = repo_of(source, None, self.locator.normalise)
        instances = self.locator.instances(repo.key) if repo is not None else ()
        if repo is None or not instances:
            return None
        return await self._client.contains(instances[0], repo.owner, repo.name, ours, held)

    def configured_secrets(self) -> list[tuple[str, SecretSource]]:
        return self.secrets.configured()

    async def unreadable_secrets(self) -> dict[str, str]:
        return await self.secrets.unreadable()
