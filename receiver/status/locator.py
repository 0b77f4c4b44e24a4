"""Which object, source, repository and Gitea instances a status concerns."""

from __future__ import annotations

from collections.abc import Mapping

from receiver.bounded import BoundedMap
from receiver.config import Settings
from receiver.flux.cluster import Cluster
from receiver.flux.objects import FluxObject, ObjectKey, consumer_source
from receiver.giturls import normalise_aliases, normalise_host
from receiver.status.decisions import instance_hosts, instances_for


class Locator:
    def __init__(self, settings: Settings, cluster: Cluster) -> None:
        self._cluster = cluster
        self._urls: BoundedMap[str, str | None] = BoundedMap(10_000)
        aliases = normalise_aliases(settings.host_aliases)

        def host_key(host: str) -> str:
            canonical = normalise_host(host)
            return aliases.get(canonical, canonical)

        self.hosts: Mapping[str, tuple[str, ...]] = instance_hosts(
            ((i.name, i.url, i.hosts) for i in settings.gitea), host_key)

    def normalise(self, url: str) -> str | None:
        """A repository URL's key. Every event re-reads its source's URL; normalising is pure,
        so it is remembered (bounded)."""
        if url in self._urls:
            return self._urls[url]
        found = self._urls[url] = self._cluster.store.normalise_url(url)
        return found

    def instances(self, repo_key: str) -> tuple[str, ...]:
        """Every instance that hosts the repository."""
        return instances_for(repo_key, self.hosts)

    def object_and_source(self, key: ObjectKey) -> tuple[FluxObject | None, FluxObject | None]:
        store = self._cluster.store
        obj = store.get(key)
        if obj is None:
            return None, None
        ref = consumer_source(obj)
        return obj, store.get(ref.key) if ref is not None else None
