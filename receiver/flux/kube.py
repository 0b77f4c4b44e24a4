"""`KubeCluster`: the `Cluster` backed by a real API server through the official client.

The cache is filled by list+watch threads (`kube_watch`); the request/answer calls (Secrets,
patches, the Lease) run in `asyncio.to_thread`. All calls go out with `_preload_content=False`
and we parse the JSON ourselves (`kube_api`): custom objects have no models anyway, and it keeps
us clear of model (de)serialisation differences between client versions (e.g. Secret data and
Lease MicroTimes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import socket
import time
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import kubernetes

from receiver.flux import lease
from receiver.flux.cluster import NEGATIVE_SECRET_TTL, ClusterError, Observer
from receiver.flux.event_book import EventWrite, event_body
from receiver.flux.kube_api import (
    CONNECT_TIMEOUT,
    MERGE_PATCH,
    CoreV1,
    Timer,
    cluster_error,
    not_older,
    read_json,
    resource_for,
)
from receiver.flux.kube_watch import Watches, _Target
from receiver.flux.objects import (
    API_VERSIONS,
    OPTIONAL_KINDS,
    WATCHED_KINDS,
    FluxObject,
    ObjectKey,
    slim,
)
from receiver.flux.store import ObjectStore
from receiver.retry import Backoff

LEASE_GROUP, LEASE_VERSION, LEASE_PLURAL = "coordination.k8s.io", "v1", "leases"
_SecretData = Mapping[str, bytes]


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
        self._core = CoreV1(api_client)
        self._namespaces = tuple(dict.fromkeys(namespaces))
        self._kinds = tuple(dict.fromkeys(kinds))
        self._secret_ttl = secret_ttl_seconds
        self._lease_namespace = (
            lease_namespace
            or (self._namespaces[0] if self._namespaces else None)
            or os.environ.get("POD_NAMESPACE")
            or "flux-system"
        )
        self.observe = observe
        # Who writes the Events (reportingInstance): the pod, as the chart names it.
        self._instance = os.environ.get("POD_NAME") or socket.gethostname()
        self._timeout = (CONNECT_TIMEOUT, request_timeout_seconds)
        self._owns_client = owns_client
        self._timed = Timer(lambda: self.observe)
        scopes: Sequence[str | None] = self._namespaces or (None,)
        self._watches = Watches(
            store, self._custom,
            [_Target(kind, ns, kind in optional_kinds) for kind in self._kinds for ns in scopes],
            self._timed, backoff=backoff or Backoff(), watch_timeout_seconds=watch_timeout_seconds,
            request_timeout=self._timeout, page_size=list_page_size,
            absent_recheck_seconds=absent_recheck_seconds)
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
        return self._watches.synced

    @property
    def sync_errors(self) -> dict[str, str]:
        """The list/watch streams currently failing, by label ("Kind" or "Kind in ns")."""
        return self._watches.sync_errors

    @property
    def not_installed(self) -> list[str]:
        """Optional kinds whose CRD the API server does not serve (404), sorted."""
        return self._watches.not_installed

    @property
    def not_permitted(self) -> list[str]:
        """Optional kinds our RBAC may not list or watch, sorted."""
        return self._watches.not_permitted

    @property
    def lease_namespace(self) -> str:
        return self._lease_namespace

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._watches.start(asyncio.get_running_loop())

    async def stop(self, timeout: float = 5.0) -> None:
        await self._watches.stop(timeout)
        if self._owns_client:
            await asyncio.to_thread(self._api_client.close)

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
            response = self._core.read_namespaced_secret(name, namespace, timeout=self._timeout)
            body = read_json(response)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            # Only status and reason: never echo a body that concerns a Secret.
            raise cluster_error(what, exc, detail=False) from None
        except Exception as exc:
            raise cluster_error(what, exc, detail=False) from None
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
                return read_json(response)
            except Exception as exc:
                raise cluster_error(f"annotating {key}", exc) from None

        raw = await asyncio.to_thread(self._timed, "patch", patch)
        return self._adopt(key, raw)

    async def write_event(self, write: EventWrite) -> None:
        """Create (a new series) or merge-patch (a repeat) one core v1 Event."""
        body: Any = event_body(write, self._instance)
        namespace = write.note.regarding.namespace

        def call() -> None:
            try:
                if write.op == "create":
                    response = self._core.create_namespaced_event(
                        namespace, body, timeout=self._timeout)
                else:
                    response = self._core.patch_namespaced_event(
                        write.name, namespace, body, timeout=self._timeout)
                read_json(response)  # read whole: the connection goes back to the pool
            except kubernetes.client.ApiException as exc:
                if exc.status == 409 and write.op == "create":
                    return  # a retried create that had gone through
                raise cluster_error(f"writing event {namespace}/{write.name}", exc) from None
            except Exception as exc:
                raise cluster_error(f"writing event {namespace}/{write.name}", exc) from None

        await asyncio.to_thread(self._timed, f"{write.op}_event", call)

    async def read_object(self, key: ObjectKey) -> FluxObject | None:
        """GET the object from the API server (same RBAC verb as the watch cache's list)."""
        group, version, plural = resource_for(key.kind)

        def get() -> dict[str, Any] | None:
            try:
                response = self._custom.get_namespaced_custom_object(
                    group, version, key.namespace, plural, key.name,
                    _preload_content=False, _request_timeout=self._timeout,
                )
                return read_json(response)
            except Exception as exc:
                error = cluster_error(f"reading {key}", exc)
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
        if self._caches(key) and not_older(obj, self.store.get(key)):
            self.store.upsert(slim(raw))  # as the watch would have cached it
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
        try:
            current = self._timed("get_lease", lambda: self._lease_call("get", name))
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise cluster_error(f"reading {what}", exc) from None
            current = None
        except Exception as exc:
            raise cluster_error(f"reading {what}", exc) from None
        spec = lease.next_spec(None if current is None else (current.get("spec") or {}),
                               holder, duration, datetime.now(UTC))
        if spec is None:
            return False
        if current is None:
            body = {"apiVersion": f"{LEASE_GROUP}/{LEASE_VERSION}", "kind": "Lease",
                    "metadata": {"name": name, "namespace": namespace}, "spec": spec}
            return self._write_lease("create_lease", name, body, what)
        # metadata keeps the resourceVersion we read: the update is a compare-and-swap.
        return self._write_lease("update_lease", name, {**current, "spec": spec}, what)

    def _write_lease(self, call: str, name: str, body: dict[str, Any], what: str) -> bool:
        verb = "create" if call == "create_lease" else "update"
        try:
            self._timed(call, lambda: self._lease_call(verb, name, body))
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:  # someone else created or renewed it first
                return False
            raise cluster_error(f"writing {what}", exc) from None
        except Exception as exc:
            raise cluster_error(f"writing {what}", exc) from None
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
        return read_json(response)
