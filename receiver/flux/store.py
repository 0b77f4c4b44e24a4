"""The indexed object cache both cluster backends fill, and routing reads.

Every lookup routing needs is a dict access, so the work per push does not grow with the
number of cached objects: Git sources by normalised URL, OCIRepositories, ImageRepositories
and HelmRepositories by registry URL, ImagePolicies by ImageRepository, HelmCharts by
HelmRepository and chart name, HelmReleases by HelmChart, consumers by source, objects by
(kind, namespace) and by key. Mutations come from one place (`upsert` / `delete`), called on
the event loop by the backend that owns the store.
"""

from __future__ import annotations

import builtins
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from receiver.flux.objects import (
    BRIDGE_PREFIX,
    RECONCILE_ANNOTATION,
    FluxObject,
    ObjectKey,
    SourceRef,
    consumer_source,
    helm_chart_of,
)

# Annotations that change with every request (Flux's and the bridge's own marks): the only ones
# that never bump `routing_version` (a consumer's paths, a HelmRelease's commit, an input
# provider's reconcile switch are annotations routing reads).
_REQUEST_ANNOTATIONS = frozenset({RECONCILE_ANNOTATION, BRIDGE_PREFIX + "deliveries"})
UrlNormaliser = Callable[[str], "str | None"]


class ObjectStore:
    def __init__(self, normalise_url: UrlNormaliser) -> None:
        self._normalise_url = normalise_url
        self._objects: dict[ObjectKey, FluxObject] = {}
        self._by_kind_ns: dict[tuple[str, str], dict[str, FluxObject]] = defaultdict(dict)
        self._sources_by_url: dict[str, set[ObjectKey]] = defaultdict(set)
        self._url_of: dict[ObjectKey, str] = {}
        # Last two path segments (`owner/name`) of a normalised URL -> keys: `owner/name` pushes.
        self._sources_by_name: dict[str, set[ObjectKey]] = defaultdict(set)
        # Normalised source URLs split at the first "/": which hosts serve a repository path,
        # and how many URLs each host has (to tell why a push matched no source).
        self._hosts_by_path: dict[str, Counter[str]] = defaultdict(Counter)
        self._host_urls: Counter[str] = Counter()
        # OCIRepositories by normalised `oci://` URL: package events.
        self._oci_by_url: dict[str, set[ObjectKey]] = defaultdict(set)
        self._oci_url_of: dict[ObjectKey, str] = {}
        # ImageRepositories by normalised `oci://` + `spec.image`, ImagePolicies by the
        # ImageRepository they reference: package events.
        self._images_by_url: dict[str, set[ObjectKey]] = defaultdict(set)
        self._image_url_of: dict[ObjectKey, str] = {}
        self._policies_by_repo: dict[ObjectKey, set[ObjectKey]] = defaultdict(set)
        self._repo_of_policy: dict[ObjectKey, ObjectKey] = {}
        # HelmRepositories by normalised `spec.url` (any type: routing checks it), HelmCharts by
        # (HelmRepository, lower-case `spec.chart`), HelmReleases by the HelmChart they install
        # from (`objects.helm_chart_of`): package events.
        self._helm_repos_by_url: dict[str, set[ObjectKey]] = defaultdict(set)
        self._helm_url_of: dict[ObjectKey, str] = {}
        self._charts_by_repo: dict[tuple[ObjectKey, str], set[ObjectKey]] = defaultdict(set)
        self._repo_of_chart: dict[ObjectKey, tuple[ObjectKey, str]] = {}
        self._releases_by_chart: dict[ObjectKey, set[ObjectKey]] = defaultdict(set)
        self._chart_of_release: dict[ObjectKey, ObjectKey] = {}
        self._consumers_by_source: dict[ObjectKey, set[ObjectKey]] = defaultdict(set)
        self._source_of: dict[ObjectKey, ObjectKey] = {}
        self._includers: dict[ObjectKey, set[ObjectKey]] = defaultdict(set)
        self._includes_of: dict[ObjectKey, set[ObjectKey]] = {}
        # (kind, namespace, label, value) -> keys: `name: "*"` selectors without a scan.
        self._by_label: dict[tuple[str, str, str, str], set[ObjectKey]] = defaultdict(set)
        self._listeners: list[Callable[[str, FluxObject], None]] = []
        # Bumped when an object appears, disappears or changes labels, spec or ownership of
        # a name: what a Receiver's `resources` resolve to can only change then.
        self.shape_version = 0
        # Bumped with `shape_version`, and when what routing reads besides the shape changes: a
        # source's artifact revision (a semver ref), an annotation other than a request's. A plan
        # computed at one routing_version holds until the next (`push.plan_cache`).
        self.routing_version = 0

    # -- reads -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._objects)

    def get(self, key: ObjectKey) -> FluxObject | None:
        return self._objects.get(key)

    def list(
        self, kind: str, namespace: str | None = None, labels: Mapping[str, str] | None = None
    ) -> builtins.list[FluxObject]:
        if labels and namespace is not None:
            sets = [self._by_label.get((kind, namespace, k, v), set()) for k, v in labels.items()]
            keys = set.intersection(*sets) if sets else set()
            return [self._objects[k] for k in sorted(keys)]
        if namespace is None:
            found: Iterable[FluxObject] = (o for o in self._objects.values() if o.kind == kind)
        else:
            found = self._by_kind_ns.get((kind, namespace), {}).values()
        if labels:
            return [o for o in found if all(o.labels.get(k) == v for k, v in labels.items())]
        return list(found)

    def sources_for_url(self, normalised_url: str) -> builtins.list[FluxObject]:
        keys = self._sources_by_url.get(normalised_url, ())
        return [self._objects[k] for k in sorted(keys)]

    def sources_for_name(self, full_name: str) -> builtins.list[tuple[FluxObject, str]]:
        """GitRepositories whose normalised URL ends in `owner/name` (lower case), each with
        that URL, whatever host serves it."""
        keys = self._sources_by_name.get(full_name.lower(), ())
        return [(self._objects[k], self._url_of[k]) for k in sorted(keys)]

    def oci_sources_for_url(self, normalised_url: str) -> builtins.list[FluxObject]:
        """OCIRepositories whose normalised `spec.url` is this one."""
        keys = self._oci_by_url.get(normalised_url, ())
        return [self._objects[k] for k in sorted(keys)]

    def image_repositories_for_url(self, normalised_url: str) -> builtins.list[FluxObject]:
        """ImageRepositories whose `spec.image`, read as `oci://<image>`, normalises to this."""
        keys = self._images_by_url.get(normalised_url, ())
        return [self._objects[k] for k in sorted(keys)]

    def image_policies_for(self, repository: ObjectKey) -> builtins.list[FluxObject]:
        """ImagePolicies whose `spec.imageRepositoryRef` names this ImageRepository."""
        keys = self._policies_by_repo.get(repository, ())
        return [self._objects[k] for k in sorted(keys)]

    def helm_repositories_for_url(self, normalised_url: str) -> builtins.list[FluxObject]:
        """HelmRepositories whose normalised `spec.url` is this one, of any `spec.type`."""
        keys = self._helm_repos_by_url.get(normalised_url, ())
        return [self._objects[k] for k in sorted(keys)]

    def helm_charts_for(self, repository: ObjectKey, chart: str) -> builtins.list[FluxObject]:
        """HelmCharts whose `spec.sourceRef` is this HelmRepository and `spec.chart` this
        chart (case-insensitive)."""
        keys = self._charts_by_repo.get((repository, chart.lower()), ())
        return [self._objects[k] for k in sorted(keys)]

    def helm_releases_for(self, chart: ObjectKey) -> builtins.list[FluxObject]:
        """HelmReleases that install from this HelmChart (`objects.helm_chart_of`)."""
        keys = self._releases_by_chart.get(chart, ())
        return [self._objects[k] for k in sorted(keys)]

    def consumers_of(self, source: ObjectKey) -> builtins.list[FluxObject]:
        keys = self._consumers_by_source.get(source, ())
        return [self._objects[k] for k in sorted(keys)]

    def includers_of(self, source: ObjectKey) -> builtins.list[FluxObject]:
        """GitRepositories that `spec.include` this one."""
        keys = self._includers.get(source, ())
        return [self._objects[k] for k in sorted(keys) if k in self._objects]

    def normalise_url(self, url: str) -> str | None:
        return self._normalise_url(url)

    def hosts_serving(self, normalised_url: str) -> builtins.list[str]:
        """Hosts of source URLs with the same repository path as `normalised_url`, sorted."""
        _, _, path = normalised_url.partition("/")
        return sorted(self._hosts_by_path.get(path, ()))

    def has_source_host(self, host: str) -> bool:
        """Whether any GitRepository URL (after host aliases) is on this host[:port]."""
        return self._host_urls.get(host, 0) > 0

    # -- writes ------------------------------------------------------------------------------

    def subscribe(self, listener: Callable[[str, FluxObject], None]) -> None:
        """Called with ("upsert"|"delete", object) after every change."""
        self._listeners.append(listener)

    def upsert(self, raw: Mapping[str, Any]) -> FluxObject:
        obj = FluxObject(raw)
        key = obj.key
        old = self._objects.get(key)
        if old is None or old.labels != obj.labels or old.spec != obj.spec:
            self.shape_version += 1
            self.routing_version += 1
        elif _routing_facts(old) != _routing_facts(obj):
            self.routing_version += 1
        self._unindex(key)
        self._objects[key] = obj
        self._by_kind_ns[(key.kind, key.namespace)][key.name] = obj
        for label, value in obj.labels.items():
            self._by_label[(key.kind, key.namespace, label, value)].add(key)
        if obj.kind == "GitRepository":
            url = self._normalise_url(str(obj.spec.get("url") or ""))
            if url:
                self._url_of[key] = url
                if url not in self._sources_by_url:
                    self._count_url(url, 1)
                self._sources_by_url[url].add(key)
                self._sources_by_name[_owner_name(url)].add(key)
            included = {
                ObjectKey("GitRepository", key.namespace, str(inc["repository"]["name"]))
                for inc in obj.spec.get("include") or []
                if isinstance(inc, dict)
                and isinstance(inc.get("repository"), dict)
                and inc["repository"].get("name")
            }
            if included:  # most have none: no empty set per GitRepository
                self._includes_of[key] = included
            for inc_key in included:
                self._includers[inc_key].add(key)
        if obj.kind == "OCIRepository":
            oci_url = self._normalise_url(str(obj.spec.get("url") or ""))
            if oci_url:
                self._oci_url_of[key] = oci_url
                self._oci_by_url[oci_url].add(key)
        if obj.kind == "ImageRepository":
            image = obj.spec.get("image")
            image_url = self._normalise_url(f"oci://{image.strip()}") if isinstance(
                image, str) and image.strip() else None
            if image_url:
                self._image_url_of[key] = image_url
                self._images_by_url[image_url].add(key)
        if obj.kind == "ImagePolicy":
            ref = obj.spec.get("imageRepositoryRef")
            name = ref.get("name") if isinstance(ref, dict) else None
            if isinstance(name, str) and name:
                namespace = ref.get("namespace") if isinstance(ref, dict) else None
                repo = ObjectKey("ImageRepository", namespace if isinstance(namespace, str)
                                 and namespace else key.namespace, name)
                self._repo_of_policy[key] = repo
                self._policies_by_repo[repo].add(key)
        if obj.kind == "HelmRepository":
            helm_url = self._normalise_url(str(obj.spec.get("url") or "").strip())
            if helm_url:
                self._helm_url_of[key] = helm_url
                self._helm_repos_by_url[helm_url].add(key)
        if obj.kind == "HelmChart":
            chart_ref = obj.spec.get("sourceRef")
            chart_name = obj.spec.get("chart")
            if (isinstance(chart_ref, dict) and chart_ref.get("kind") == "HelmRepository"
                    and isinstance(chart_ref.get("name"), str) and chart_ref["name"]
                    and isinstance(chart_name, str) and chart_name.strip()):
                # A HelmChart's sourceRef is local: same namespace.
                entry = (ObjectKey("HelmRepository", key.namespace, chart_ref["name"]),
                         chart_name.strip().lower())
                self._repo_of_chart[key] = entry
                self._charts_by_repo[entry].add(key)
        chart_key = helm_chart_of(obj)
        if chart_key is not None:
            self._chart_of_release[key] = chart_key
            self._releases_by_chart[chart_key].add(key)
        source: SourceRef | None = consumer_source(obj)
        if source is not None:
            self._source_of[key] = source.key
            self._consumers_by_source[source.key].add(key)
        for listener in self._listeners:
            listener("upsert", obj)
        return obj

    def delete(self, key: ObjectKey) -> None:
        obj = self._objects.get(key)
        if obj is None:
            return
        self.shape_version += 1
        self.routing_version += 1
        self._unindex(key)
        for listener in self._listeners:
            listener("delete", obj)

    def _unindex(self, key: ObjectKey) -> None:
        old = self._objects.pop(key, None)
        if old is None:
            return
        for label, value in old.labels.items():
            index_key = (key.kind, key.namespace, label, value)
            self._by_label[index_key].discard(key)
            if not self._by_label[index_key]:
                del self._by_label[index_key]
        self._by_kind_ns[(key.kind, key.namespace)].pop(key.name, None)
        url = self._url_of.pop(key, None)
        if url is not None:
            self._sources_by_url[url].discard(key)
            if not self._sources_by_url[url]:
                del self._sources_by_url[url]
                self._count_url(url, -1)
            name = _owner_name(url)
            self._sources_by_name[name].discard(key)
            if not self._sources_by_name[name]:
                del self._sources_by_name[name]
        oci_url = self._oci_url_of.pop(key, None)
        if oci_url is not None:
            self._oci_by_url[oci_url].discard(key)
            if not self._oci_by_url[oci_url]:
                del self._oci_by_url[oci_url]
        image_url = self._image_url_of.pop(key, None)
        if image_url is not None:
            self._images_by_url[image_url].discard(key)
            if not self._images_by_url[image_url]:
                del self._images_by_url[image_url]
        repo = self._repo_of_policy.pop(key, None)
        if repo is not None:
            self._policies_by_repo[repo].discard(key)
            if not self._policies_by_repo[repo]:
                del self._policies_by_repo[repo]
        _drop(self._helm_repos_by_url, self._helm_url_of.pop(key, None), key)
        _drop(self._charts_by_repo, self._repo_of_chart.pop(key, None), key)
        _drop(self._releases_by_chart, self._chart_of_release.pop(key, None), key)
        for inc_key in self._includes_of.pop(key, ()):
            _drop(self._includers, inc_key, key)
        source = self._source_of.pop(key, None)
        if source is not None:
            self._consumers_by_source[source].discard(key)
            if not self._consumers_by_source[source]:
                del self._consumers_by_source[source]

    def _count_url(self, url: str, delta: int) -> None:
        host, _, path = url.partition("/")
        self._host_urls[host] += delta
        if self._host_urls[host] <= 0:
            del self._host_urls[host]
        hosts = self._hosts_by_path[path]
        hosts[host] += delta
        if hosts[host] <= 0:
            del hosts[host]
        if not hosts:
            del self._hosts_by_path[path]


def _routing_facts(obj: FluxObject) -> tuple[object, dict[str, str]]:
    """What routing reads of an object besides its spec and labels (see `routing_version`): a
    source's artifact revision, and its annotations but those every request changes."""
    artifact = obj.status.get("artifact")
    revision = artifact.get("revision") if isinstance(artifact, dict) else None
    return revision, {k: v for k, v in obj.annotations.items() if k not in _REQUEST_ANNOTATIONS}


def _drop(index: dict[Any, set[ObjectKey]], entry: object, key: ObjectKey) -> None:
    """Remove `key` from `index[entry]` (no-op when `entry` is None), and an emptied entry."""
    if entry is None:
        return
    keys = index.get(entry)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del index[entry]


def _owner_name(normalised_url: str) -> str:
    return "/".join(normalised_url.split("/")[-2:])
