"""`KubeCluster`: the `Cluster` backed by a real API server through the official client.

One daemon thread per watched kind (and namespace, when namespaced) runs list, then watch after
watch from the last resourceVersion; everything it learns is handed to the event loop with
`call_soon_threadsafe`, so the `ObjectStore` is only ever touched on the loop. An optional kind
(`OPTIONAL_KINDS`) whose CRD is not installed (404), or that RBAC does not let us list (403),
counts as listed and empty, is reported by `not_installed` / `not_permitted`, and is looked for
again every `absent_recheck_seconds`. The request/answer
calls (Secrets, patches, the Lease) run in `asyncio.to_thread`.

All calls go out with `_preload_content=False` and we parse the JSON ourselves: custom objects
have no models anyway, and it keeps us clear of model (de)serialisation differences between
client versions (e.g. Secret data and Lease MicroTimes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, TypeVar

import kubernetes

from receiver.flux.cluster import NEGATIVE_SECRET_TTL, ClusterError, error_for_status
from receiver.flux.objects import (
    API_VERSIONS,
    OPTIONAL_KINDS,
    WATCHED_KINDS,
    FluxObject,
    ObjectKey,
)
from receiver.flux.store import ObjectStore
from receiver.retry import Backoff
from receiver.times import parse_rfc3339

log = logging.getLogger(__name__)

# observe(call, seconds, error): called after every API call, from whichever thread made it.
Observer = Callable[[str, float, bool], None]
T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"
LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL = "coordination.k8s.io", "v1", "leases"
# Answers that are outcomes rather than failures of the API server (not counted as errors).
_EXPECTED_STATUSES = frozenset({404, 409, 410})
NOT_INSTALLED, NOT_PERMITTED = "not installed", "not permitted"
# What an optional kind's list failing with these statuses means (anything else is a failure).
_ABSENT_STATUSES = {404: NOT_INSTALLED, 403: NOT_PERMITTED}
_CONNECT_TIMEOUT = 10.0
_SecretData = Mapping[str, bytes]


# The CRDs' spec.names.plural: not lower-case kind + "s" (GitRepository -> gitrepositories).
PLURALS: dict[str, str] = {
    "Receiver": "receivers",
    "GitRepository": "gitrepositories",
    "OCIRepository": "ocirepositories",
    "Bucket": "buckets",
    "HelmChart": "helmcharts",
    "HelmRepository": "helmrepositories",
    "Kustomization": "kustomizations",
    "HelmRelease": "helmreleases",
    "ExternalArtifact": "externalartifacts",
    "ImageRepository": "imagerepositories",
    "ImagePolicy": "imagepolicies",
    "ImageUpdateAutomation": "imageupdateautomations",
    "ArtifactGenerator": "artifactgenerators",
}


def resource_for(kind: str) -> tuple[str, str, str]:
    """(group, version, plural) of a Flux kind, as its CRD names them."""
    api_version = API_VERSIONS.get(kind)
    plural = PLURALS.get(kind)
    if api_version is None or plural is None:
        raise ClusterError(f"unsupported kind {kind!r}")
    group, _, version = api_version.partition("/")
    return group, version, plural


@dataclass(frozen=True, slots=True)
class _Gone(Exception):
    """The resourceVersion we watch from was compacted away (HTTP 410): relist."""


class _WatchError(Exception):
    """The server ended a watch with an ERROR event other than 410."""


@dataclass(eq=False)
class _Target:
    """One list+watch: a kind, cluster-wide (namespace None) or in one namespace."""

    kind: str
    namespace: str | None
    optional: bool = False  # a 404 means "CRD not installed", not a failure
    thread: threading.Thread | None = None
    # Only the watch thread touches these two.
    resource_version: str | None = None
    progress: bool = False
    listed: bool = False  # only touched on the loop
    response: Any = None  # the open watch stream; guarded by KubeCluster._lock

    @property
    def label(self) -> str:
        return self.kind if self.namespace is None else f"{self.kind} in {self.namespace}"


class KubeCluster:
    """List+watch cache of the Flux objects, Secret reads, annotation patches and a Lease."""

    def __init__(
        self,
        store: ObjectStore,
        api_client: kubernetes.client.ApiClient,
        namespaces: Sequence[str] = (),
        secret_ttl_seconds: float = 30.0,
        kinds: Sequence[str] = WATCHED_KINDS,
        watch_timeout_seconds: int = 300,
        *,
        lease_namespace: str | None = None,
        observe: Observer | None = None,
        backoff: Backoff | None = None,
        request_timeout_seconds: float = 30.0,
        list_page_size: int = 500,
        owns_client: bool = False,
        optional_kinds: Collection[str] = OPTIONAL_KINDS,
        absent_recheck_seconds: float = 60.0,
    ) -> None:
        for kind in kinds:
            resource_for(kind)  # fail at construction, not in a thread
        self.store = store
        self._api_client = api_client
        self._custom = kubernetes.client.CustomObjectsApi(api_client)
        self._core = kubernetes.client.CoreV1Api(api_client)
        self._namespaces = tuple(dict.fromkeys(namespaces))
        self._kinds = tuple(dict.fromkeys(kinds))
        self._secret_ttl = secret_ttl_seconds
        self._watch_timeout = int(watch_timeout_seconds)
        self._lease_namespace = (
            lease_namespace
            or (self._namespaces[0] if self._namespaces else None)
            or os.environ.get("POD_NAMESPACE")
            or "flux-system"
        )
        self.observe = observe
        self._backoff = backoff or Backoff()
        self._timeout = (_CONNECT_TIMEOUT, request_timeout_seconds)
        self._page_size = list_page_size
        self._owns_client = owns_client
        scopes: Sequence[str | None] = self._namespaces or (None,)
        self._targets = [_Target(kind, ns, kind in optional_kinds)
                         for kind in self._kinds for ns in scopes]
        self._absent_recheck = absent_recheck_seconds
        self._lock = threading.Lock()
        self._errors: dict[str, str] = {}
        # Labels of optional targets we cannot list -> why: NOT_INSTALLED (404), NOT_PERMITTED (403).
        self._absent: dict[str, str] = {}
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # (namespace, name) -> (expires, data, when the read started)
        self._secrets: dict[tuple[str, str], tuple[float, _SecretData | None, float]] = {}
        self._secret_reads: dict[tuple[str, str], asyncio.Future[_SecretData | None]] = {}

    @classmethod
    def from_environment(
        cls, store: ObjectStore, namespaces: Sequence[str] = (), **options: Any
    ) -> KubeCluster:
        """In-cluster config when running in a pod, else KUBECONFIG / ~/.kube/config.

        `options` are the constructor's keyword arguments after `namespaces`.
        """
        config = kubernetes.client.Configuration()
        try:
            # The config loaders carry no annotations in the client's inline types.
            kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=config
            )
        except kubernetes.config.ConfigException:
            kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
                client_configuration=config
            )
        # Every watch holds a pooled connection; leave room for patches and Secret reads.
        kinds = options.get("kinds", WATCHED_KINDS)
        watches = len(kinds) * max(1, len(namespaces))
        config.connection_pool_maxsize = max(config.connection_pool_maxsize or 0, watches + 16)
        api_client = kubernetes.client.ApiClient(config)
        return cls(store, api_client, namespaces, owns_client=True, **options)

    # -- state --------------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once every kind (in every watched namespace) has been listed once."""
        return all(t.listed for t in self._targets)

    @property
    def sync_errors(self) -> dict[str, str]:
        """The list/watch streams currently failing, by label ("Kind" or "Kind in ns")."""
        with self._lock:
            return dict(self._errors)

    @property
    def not_installed(self) -> list[str]:
        """Optional kinds whose CRD the API server does not serve (404), sorted."""
        return self._absent_for(NOT_INSTALLED)

    @property
    def not_permitted(self) -> list[str]:
        """Optional kinds our RBAC may not list or watch (403, e.g. RBAC managed outside the
        chart that predates them), sorted."""
        return self._absent_for(NOT_PERMITTED)

    def _absent_for(self, why: str) -> list[str]:
        with self._lock:
            labels = {label for label, reason in self._absent.items() if reason == why}
        return sorted({t.kind for t in self._targets if t.label in labels})

    @property
    def lease_namespace(self) -> str:
        return self._lease_namespace

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        for target in self._targets:
            target.thread = threading.Thread(
                target=self._run, args=(target,), name=f"watch {target.label}", daemon=True
            )
            target.thread.start()

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop every watch thread: set the flag, then cut the open streams under them."""
        self._stopping.set()
        with self._lock:
            streams = [t.response for t in self._targets if t.response is not None]
        for response in streams:
            _shutdown(response)
        threads = [t.thread for t in self._targets if t.thread is not None]
        await asyncio.to_thread(_join_all, threads, timeout)
        if self._owns_client:
            await asyncio.to_thread(self._api_client.close)

    # -- watch threads ------------------------------------------------------------------------

    def _run(self, target: _Target) -> None:
        failures = 0
        while not self._stopping.is_set():
            target.progress = False
            error: str | None = None
            try:
                if target.resource_version is None:
                    self._list(target)
                self._watch(target)  # returns when the server ends the watch (its timeout)
            except _Gone:
                log.info("watch of %s expired; relisting", target.label)
                target.resource_version = None
            except Exception as exc:
                if self._stopping.is_set():
                    return
                why = _ABSENT_STATUSES.get(getattr(exc, "status", None) or 0)
                if target.optional and why is not None:
                    # Not a failure: this Flux install has no such CRD (yet), or our RBAC
                    # leaves it out. Nothing routes to the kind; look again later.
                    self._mark_absent(target, why)
                    failures = 0
                    self._stopping.wait(self._absent_recheck)
                    continue
                error = _describe(exc)
            # Back off over a streak of rounds without a single event, so a server that keeps
            # failing, expiring or closing watches at once is not hammered; after a watch that
            # delivered events the backoff starts over.
            failures = 0 if target.progress else failures + 1
            if error is not None:
                self._record_error(target, error)
                self._stopping.wait(self._backoff.delay(max(failures, 1)))
            elif failures > 1:
                self._stopping.wait(self._backoff.delay(failures - 1))

    def _list(self, target: _Target) -> None:
        group, version, plural = resource_for(target.kind)
        api_version = API_VERSIONS[target.kind]
        items: list[dict[str, Any]] = []
        page: str | None = None
        while True:
            body = self._timed("list", functools.partial(self._list_page, target, page))
            meta = body.get("metadata") or {}
            for item in body.get("items") or []:
                if isinstance(item, dict):
                    # The API server keeps kind and apiVersion on custom resource items;
                    # FluxObject needs the kind, so a server that dropped them is covered.
                    item.setdefault("kind", target.kind)
                    item.setdefault("apiVersion", api_version)
                    items.append(item)
            page = meta.get("continue") or None
            if page is None:
                break
        resource_version = meta.get("resourceVersion")
        if not isinstance(resource_version, str) or not resource_version:
            raise _WatchError(f"list of {group}/{version} {plural} has no resourceVersion")
        target.resource_version = resource_version
        if target.optional:
            # Before the objects reach the store: whoever sees one there sees the kind listed.
            with self._lock:
                found = self._absent.pop(target.label, None) is not None
            if found:
                log.info("%s can be listed now: cached", target.label)
        self._to_loop(self._apply_list, target, items)

    def _list_page(self, target: _Target, page: str | None) -> dict[str, Any]:
        group, version, plural = resource_for(target.kind)
        kwargs: dict[str, Any] = {
            "limit": self._page_size,
            "_preload_content": False,
            "_request_timeout": self._timeout,
        }
        if page is not None:
            kwargs["_continue"] = page
        try:
            if target.namespace is None:
                response = self._custom.list_cluster_custom_object(
                    group, version, plural, **kwargs
                )
            else:
                response = self._custom.list_namespaced_custom_object(
                    group, version, target.namespace, plural, **kwargs
                )
        except kubernetes.client.ApiException as exc:
            if exc.status == 410:  # an expired continue token: start the list again
                raise _Gone from exc
            raise
        return _read_json(response)

    def _watch(self, target: _Target) -> None:
        group, version, plural = resource_for(target.kind)
        kwargs: dict[str, Any] = {
            "watch": True,
            "resource_version": target.resource_version,
            "allow_watch_bookmarks": True,
            "timeout_seconds": self._watch_timeout,
            "_preload_content": False,
            # The server ends the watch after timeout_seconds; the read timeout only catches
            # a connection that silently died.
            "_request_timeout": (_CONNECT_TIMEOUT, self._watch_timeout + 30),
        }

        def open_stream() -> Any:
            try:
                if target.namespace is None:
                    return self._custom.list_cluster_custom_object(
                        group, version, plural, **kwargs
                    )
                return self._custom.list_namespaced_custom_object(
                    group, version, target.namespace, plural, **kwargs
                )
            except kubernetes.client.ApiException as exc:
                if exc.status == 410:
                    raise _Gone from exc
                raise

        response = self._timed("watch", open_stream)
        try:
            with self._lock:
                target.response = response
            if self._stopping.is_set():
                return
            self._clear_error(target)
            for line in _lines(response):
                if self._stopping.is_set():
                    return
                self._handle_event(target, line)
        finally:
            with self._lock:
                target.response = None
            response.close()
            response.release_conn()

    def _handle_event(self, target: _Target, line: str) -> None:
        event = json.loads(line)
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            raise _WatchError(f"malformed watch event for {target.label}")
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise _Gone
            raise _WatchError(f"watch error {obj.get('code')}: {obj.get('message')}")
        meta = obj.get("metadata")
        resource_version = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            obj.setdefault("kind", target.kind)
            obj.setdefault("apiVersion", API_VERSIONS[target.kind])
            self._to_loop(self._apply_event, kind, obj)
        elif kind != "BOOKMARK":
            return
        if isinstance(resource_version, str) and resource_version:
            target.resource_version = resource_version
        target.progress = True

    def _to_loop(self, callback: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or self._stopping.is_set():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under us during shutdown
            loop.call_soon_threadsafe(callback, *args)

    # -- store updates (on the loop) ----------------------------------------------------------

    def _apply_list(self, target: _Target, items: list[dict[str, Any]]) -> None:
        """Make the store hold exactly `items` for this kind (in this namespace, if any).

        Unchanged objects (same resourceVersion) are left alone, so a relist does not wake
        every store listener.
        """
        fresh = {FluxObject(raw).key: raw for raw in items}
        for obj in self.store.list(target.kind, target.namespace):
            if obj.key not in fresh:
                self.store.delete(obj.key)
        for key, raw in fresh.items():
            current = self.store.get(key)
            version = FluxObject(raw).resource_version
            if current is None or not version or current.resource_version != version:
                self.store.upsert(raw)
        target.listed = True

    def _apply_event(self, kind: str, raw: dict[str, Any]) -> None:
        if kind == "DELETED":
            self.store.delete(FluxObject(raw).key)
        else:
            self.store.upsert(raw)

    def _mark_absent(self, target: _Target, why: str) -> None:
        """An optional kind we cannot list (not installed, or not permitted): an empty, listed
        kind, said once per reason."""
        target.resource_version = None
        with self._lock:
            first = self._absent.get(target.label) != why
            self._absent[target.label] = why
            self._errors.pop(target.label, None)
        if first:
            cause = ("its CRD is not served" if why == NOT_INSTALLED
                     else "RBAC does not allow list/watch")
            log.warning("%s is %s (%s): not cached, looked for again every %g s",
                        target.label, why, cause, self._absent_recheck)
        # Also drops what was cached if the CRD went away.
        self._to_loop(self._apply_list, target, [])

    def _record_error(self, target: _Target, message: str) -> None:
        log.warning("list/watch of %s failed: %s", target.label, message)
        with self._lock:
            self._errors[target.label] = message

    def _clear_error(self, target: _Target) -> None:
        with self._lock:
            self._errors.pop(target.label, None)

    # -- Secrets ------------------------------------------------------------------------------

    async def read_secret(
        self, namespace: str, name: str, *, fresh: bool = False
    ) -> _SecretData | None:
        """The Secret's decoded data (get, never list), cached for `secret_ttl_seconds`."""
        key = (namespace, name)
        if not fresh:
            cached = self._secrets.get(key)
            if cached is not None and cached[0] > time.monotonic():
                return cached[1]
            pending = self._secret_reads.get(key)
            if pending is not None:  # one request per Secret, however many callers
                return await asyncio.shield(pending)
        task = asyncio.ensure_future(self._fetch_secret(namespace, name))
        self._secret_reads[key] = task
        task.add_done_callback(lambda done: self._forget_read(key, done))
        return await asyncio.shield(task)

    def _forget_read(self, key: tuple[str, str], done: asyncio.Future[_SecretData | None]) -> None:
        if self._secret_reads.get(key) is done:
            del self._secret_reads[key]
        if not done.cancelled():
            done.exception()  # retrieved here, so a read whose callers all left is not logged

    async def _fetch_secret(self, namespace: str, name: str) -> _SecretData | None:
        started = time.monotonic()
        data = await asyncio.to_thread(
            self._timed, "get_secret", lambda: self._read_secret_sync(namespace, name)
        )
        key = (namespace, name)
        cached = self._secrets.get(key)
        # A read that started before a `fresh` one finished must not put older data back.
        if cached is None or cached[2] <= started:
            ttl = self._secret_ttl if data is not None else NEGATIVE_SECRET_TTL
            self._secrets[key] = (time.monotonic() + min(ttl, self._secret_ttl), data, started)
        return data

    def _read_secret_sync(self, namespace: str, name: str) -> _SecretData | None:
        what = f"reading Secret {namespace}/{name}"
        try:
            response = self._core.read_namespaced_secret(
                name, namespace, _preload_content=False, _request_timeout=self._timeout
            )
            body = _read_json(response)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            # Only status and reason: never echo a body that concerns a Secret.
            raise _cluster_error(what, exc, detail=False) from None
        except Exception as exc:
            raise _cluster_error(what, exc, detail=False) from None
        data = body.get("data") or {}
        try:
            decoded = {
                k: base64.b64decode(v, validate=True)
                for k, v in data.items()
                if isinstance(k, str) and isinstance(v, str)
            }
        except binascii.Error:
            raise ClusterError(f"{what}: data is not valid base64") from None
        return MappingProxyType(decoded)

    # -- annotations --------------------------------------------------------------------------

    async def annotate(self, key: ObjectKey, annotations: Mapping[str, str], *,
                       resource_version: str | None = None) -> FluxObject:
        """JSON merge patch of only `metadata.annotations`; with `resource_version` the API
        server applies it only to that version (optimistic concurrency, 409 otherwise)."""
        group, version, plural = resource_for(key.kind)
        meta: dict[str, Any] = {"annotations": dict(annotations)}
        if resource_version is not None:
            meta["resourceVersion"] = resource_version
        body = {"metadata": meta}

        def patch() -> dict[str, Any]:
            try:
                response = self._custom.patch_namespaced_custom_object(
                    group,
                    version,
                    key.namespace,
                    plural,
                    key.name,
                    body,
                    _content_type=MERGE_PATCH,
                    _preload_content=False,
                    _request_timeout=self._timeout,
                )
                return _read_json(response)
            except Exception as exc:
                raise _cluster_error(f"annotating {key}", exc) from None

        raw = await asyncio.to_thread(self._timed, "patch", patch)
        return self._adopt(key, raw)

    async def read_object(self, key: ObjectKey) -> FluxObject | None:
        """GET the object from the API server (same RBAC verb as the watch cache's list)."""
        group, version, plural = resource_for(key.kind)

        def get() -> dict[str, Any] | None:
            try:
                response = self._custom.get_namespaced_custom_object(
                    group, version, key.namespace, plural, key.name,
                    _preload_content=False, _request_timeout=self._timeout,
                )
                return _read_json(response)
            except Exception as exc:
                error = _cluster_error(f"reading {key}", exc)
                if error.status == 404:
                    return None
                raise error from None

        raw = await asyncio.to_thread(self._timed, "get", get)
        return None if raw is None else self._adopt(key, raw)

    def _adopt(self, key: ObjectKey, raw: dict[str, Any]) -> FluxObject:
        """An object the API server just returned: into the cache too, unless the watch has
        already brought something newer (read-your-writes without going back in time)."""
        raw.setdefault("kind", key.kind)
        raw.setdefault("apiVersion", API_VERSIONS[key.kind])
        obj = FluxObject(raw)
        if self._caches(key) and _not_older(obj, self.store.get(key)):
            self.store.upsert(raw)
        return obj

    def _caches(self, key: ObjectKey) -> bool:
        """Whether the watches keep this object current (else caching it would go stale)."""
        return key.kind in self._kinds and (
            not self._namespaces or key.namespace in self._namespaces
        )

    # -- Lease --------------------------------------------------------------------------------

    async def try_acquire_lease(self, name: str, holder: str, duration_seconds: int) -> bool:
        """Create, take over (expired or ours) or renew the Lease; False if another holds it.

        Writes carry the resourceVersion we read, so of two replicas racing for an expired
        Lease exactly one wins; the loser sees 409 and gets False.
        """
        return await asyncio.to_thread(self._acquire_lease_sync, name, holder, duration_seconds)

    def _acquire_lease_sync(self, name: str, holder: str, duration: int) -> bool:
        namespace = self._lease_namespace
        what = f"Lease {namespace}/{name}"
        now = datetime.now(UTC)
        try:
            lease = self._timed("get_lease", lambda: self._lease_call("get", name))
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise _cluster_error(f"reading {what}", exc) from None
            lease = None
        except Exception as exc:
            raise _cluster_error(f"reading {what}", exc) from None
        if lease is None:
            body = {
                "apiVersion": f"{LEASE_GROUP}/{LEASE_VERSION}",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": _lease_spec({}, holder, duration, now, transition=False),
            }
            return self._write_lease("create_lease", name, body, what)
        spec = lease.get("spec") or {}
        current = spec.get("holderIdentity")
        if current == holder:
            new_spec = _lease_spec(spec, holder, duration, now, transition=False)
        elif not current or _lease_expired(spec, now):
            new_spec = _lease_spec(spec, holder, duration, now, transition=True)
        else:
            return False
        # metadata keeps the resourceVersion we read: the update is a compare-and-swap.
        return self._write_lease("update_lease", name, {**lease, "spec": new_spec}, what)

    def _write_lease(self, call: str, name: str, body: dict[str, Any], what: str) -> bool:
        verb = "create" if call == "create_lease" else "update"
        try:
            self._timed(call, lambda: self._lease_call(verb, name, body))
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:  # someone else created or renewed it first
                return False
            raise _cluster_error(f"writing {what}", exc) from None
        except Exception as exc:
            raise _cluster_error(f"writing {what}", exc) from None
        return True

    def _lease_call(self, verb: str, name: str, body: Any = None) -> dict[str, Any]:
        # Leases go through the generic object API: plain dicts, and MicroTime as we format it.
        args = (LEASE_GROUP, LEASE_VERSION, self._lease_namespace, LEASE_PLURAL)
        options: dict[str, Any] = {"_preload_content": False, "_request_timeout": self._timeout}
        if verb == "get":
            response = self._custom.get_namespaced_custom_object(*args, name, **options)
        elif verb == "create":
            response = self._custom.create_namespaced_custom_object(*args, body, **options)
        else:
            response = self._custom.replace_namespaced_custom_object(
                *args, name, body, **options
            )
        return _read_json(response)

    # -- metrics ------------------------------------------------------------------------------

    def _timed(self, call: str, fn: Callable[[], T]) -> T:
        started = time.perf_counter()
        failed = False
        try:
            return fn()
        except Exception as exc:
            status = getattr(exc, "status", None)
            failed = status not in _EXPECTED_STATUSES and not isinstance(exc, _Gone)
            raise
        finally:
            if self.observe is not None:
                try:
                    self.observe(call, time.perf_counter() - started, failed)
                except Exception:
                    log.exception("observe hook failed")


# -- helpers ----------------------------------------------------------------------------------


def _read_json(response: Any) -> dict[str, Any]:
    """Read a `_preload_content=False` response whole and hand its connection back."""
    try:
        data = response.data
    finally:
        response.release_conn()
    body = json.loads(data)
    if not isinstance(body, dict):
        raise ClusterError("the API server answered with something other than an object")
    return body


def _lines(response: Any) -> Iterator[str]:
    """The newline-delimited JSON lines of a watch stream, as the chunks arrive."""
    buffer = bytearray()
    for chunk in response.stream(amt=None, decode_content=False):
        buffer.extend(chunk)
        while (end := buffer.find(b"\n")) != -1:
            line = buffer[:end].decode("utf-8", errors="replace").strip()
            del buffer[: end + 1]
            if line:
                yield line


def _shutdown(response: Any) -> None:
    """Unblock a thread reading this response: shut the socket down under it."""
    try:
        shutdown = getattr(response, "shutdown", None)  # urllib3 >= 2.3
        if shutdown is not None:
            shutdown()
            return
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except Exception:  # already closed: nothing to unblock
        log.debug("closing a watch stream failed", exc_info=True)


def _join_all(threads: Sequence[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, kubernetes.client.ApiException):
        message = _status_message(exc)
        hint = " (is the CRD installed?)" if exc.status == 404 else ""
        return f"HTTP {exc.status} {exc.reason or ''}".rstrip() + hint + (
            f": {message}" if message else ""
        )
    return f"{type(exc).__name__}: {exc}"


def _status_message(exc: Any) -> str:
    """The `message` of the Status object an API error carries, if any."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return ""
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) else ""


def _cluster_error(what: str, exc: BaseException, *, detail: bool = True) -> ClusterError:
    """Map an API failure: 404 NotFound; 409, 429, 5xx and transport errors retryable.

    `detail=False` leaves out the server's message (used for anything about a Secret).
    """
    if isinstance(exc, ClusterError):
        return exc
    if not isinstance(exc, kubernetes.client.ApiException):
        return ClusterError(f"{what}: {type(exc).__name__}", retryable=True)
    status = int(exc.status or 0)
    message = f"{what}: HTTP {status} {exc.reason or ''}".rstrip()
    extra = _status_message(exc) if detail else ""
    if extra:
        message += f": {extra}"
    return error_for_status(message, status)


def _not_older(new: FluxObject, current: FluxObject | None) -> bool:
    """Whether `new` may replace `current` in the store.

    resourceVersions are opaque, but the API server's are etcd revisions (integers); when both
    parse, never let a patch answer overwrite a newer watch event that arrived first.
    """
    if current is None:
        return True
    try:
        return int(new.resource_version) >= int(current.resource_version)
    except ValueError:
        return True


def _format_micro(moment: datetime) -> str:
    """metav1.MicroTime's wire format: RFC 3339 with exactly six fractional digits."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _lease_expired(spec: Mapping[str, Any], now: datetime) -> bool:
    renewed = parse_rfc3339(spec.get("renewTime")) or parse_rfc3339(spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds")
    if renewed is None or not isinstance(duration, int):
        return True
    return renewed + timedelta(seconds=duration) < now


def _lease_spec(
    spec: Mapping[str, Any], holder: str, duration: int, now: datetime, *, transition: bool
) -> dict[str, Any]:
    stamp = _format_micro(now)
    transitions = spec.get("leaseTransitions")
    count = transitions if isinstance(transitions, int) else 0
    new = {**spec, "holderIdentity": holder, "leaseDurationSeconds": duration, "renewTime": stamp}
    if transition or not spec:
        new["acquireTime"] = stamp
        new["leaseTransitions"] = count + 1 if transition else count
    return new
