"""What an environment badge shows: the environment's aggregate status in Gitea on the commit
this cluster's sources hold (`badges.deployed_commit`), read at most once per
`cache_seconds` per commit and environment (badges are fetched often; Gitea is the record)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from receiver.bounded import BoundedMap
from receiver.config import Settings
from receiver.flux.cluster import Cluster
from receiver.gitea.client import GiteaError
from receiver.status import badges
from receiver.status.gitea_view import Budget, GiteaView
from receiver.status.locator import Locator
from receiver.status.repos import repo_ref

log = logging.getLogger("receiver.status_service")


class EnvironmentStates:
    cache_seconds = 30.0

    def __init__(self, settings: Settings, cluster: Cluster, locator: Locator, view: GiteaView,
                 clock: Callable[[], float] = time.monotonic) -> None:
        fleet = settings.statuses.fleet
        self._contexts = {env.name: fleet.environment_context_prefix + env.name
                          for env in fleet.environments} if fleet.enabled else {}
        self._cluster = cluster
        self._locator = locator
        self._view = view
        self._clock = clock
        self._known: BoundedMap[tuple[str, str, str], tuple[float, str]] = BoundedMap(10_000)

    def known(self, environment: str) -> bool:
        return environment in self._contexts

    async def state(self, owner: str, repo: str, branch: str | None, environment: str) -> str:
        context = self._contexts.get(environment)
        store = self._cluster.store
        sha = badges.deployed_commit(store, owner, repo, branch) if context else None
        ref = next((r for s in store.list("GitRepository")
                    if isinstance(url := s.spec.get("url"), str)
                    and (r := repo_ref(store.normalise_url(url))) is not None
                    and (r.owner.lower(), r.name.lower()) == (owner.lower(), repo.lower())),
                   None)
        instances = self._locator.instances(ref.key) if ref is not None else ()
        if context is None or sha is None or ref is None or not instances:
            return badges.UNKNOWN
        repo_key = ref.key
        key = (repo_key, sha, context)
        cached = self._known.get(key)
        if cached is not None and self._clock() - cached[0] < self.cache_seconds:
            return cached[1]
        try:
            listing = await self._view.read_commit((instances[0], repo_key, sha), ref.owner,
                                                   ref.name, frozenset({context}), Budget(5),
                                                   "badge")
        except GiteaError as exc:
            log.warning("environment badge: cannot read Gitea", extra={"error": str(exc)})
            return badges.UNKNOWN
        shown = listing.shown.get(context)
        state = badges.status_state(shown[0] if shown else None)
        self._known[key] = (self._clock(), state)
        return state
