"""The kube backend's cache: one daemon thread per watched kind (and namespace, when
namespaced) lists, then watches from the last resourceVersion, again and again.

Everything a thread learns is handed to the event loop with `call_soon_threadsafe`, so the
`ObjectStore` is only ever touched on the loop. An optional kind (`OPTIONAL_KINDS`) whose CRD
is not installed (404), or that RBAC does not let us list (403), counts as listed and empty, is
reported by `not_installed` / `not_permitted`, and is looked for again every
`absent_recheck_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import kubernetes

from receiver.flux.kube_api import (
    CONNECT_TIMEOUT,
    describe,
    join_all,
    read_json,
    resource_for,
    shutdown,
    stream_lines,
)
from receiver.flux.objects import API_VERSIONS, FluxObject, slim
from receiver.flux.store import ObjectStore
from receiver.retry import Backoff

log = logging.getLogger("receiver.flux.kube")
T = TypeVar("T")
Timed = Callable[..., Any]  # kube_api.Timer: (call, fn, expected=...) -> fn()

NOT_INSTALLED, NOT_PERMITTED = "not installed", "not permitted"
# What an optional kind's list failing with these statuses means (anything else is a failure).
_ABSENT_STATUSES = {404: NOT_INSTALLED, 403: NOT_PERMITTED}


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
    response: Any = None  # the open watch stream; guarded by Watches._lock

    @property
    def label(self) -> str:
        return self.kind if self.namespace is None else f"{self.kind} in {self.namespace}"



class Watches:
    """The list+watch threads of every target, and what they report."""

    def __init__(self, store: ObjectStore, custom: kubernetes.client.CustomObjectsApi,
                 targets: Sequence[_Target], timed: Timed, *, backoff: Backoff,
                 watch_timeout_seconds: int, request_timeout: tuple[float, float],
                 page_size: int, absent_recheck_seconds: float) -> None:
        self.store = store
        self._custom = custom
        self._targets = list(targets)
        self._timed_call = timed
        self._backoff = backoff
        self._watch_timeout = int(watch_timeout_seconds)
        self._timeout = request_timeout
        self._page_size = page_size
        self._absent_recheck = absent_recheck_seconds
        self._lock = threading.Lock()
        self._errors: dict[str, str] = {}
        # Labels of optional targets we cannot list -> why: NOT_INSTALLED (404), NOT_PERMITTED (403).
        self._absent: dict[str, str] = {}
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _timed(self, call: str, fn: Callable[[], T]) -> T:
        result: T = self._timed_call(call, fn, lambda exc: isinstance(exc, _Gone))
        return result

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

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not None:
            return
        self._loop = loop
        for target in self._targets:
            target.thread = threading.Thread(
                target=self._run, args=(target,), name=f"watch {target.label}", daemon=True
            )
            target.thread.start()

    async def stop(self, timeout: float) -> None:
        """Stop every watch thread: set the flag, then cut the open streams under them."""
        self._stopping.set()
        with self._lock:
            streams = [t.response for t in self._targets if t.response is not None]
        for response in streams:
            shutdown(response)
        threads = [t.thread for t in self._targets if t.thread is not None]
        await asyncio.to_thread(join_all, threads, timeout)

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
                error = describe(exc)
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
                    items.append(slim(item))
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
        return read_json(response)

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
            "_request_timeout": (CONNECT_TIMEOUT, self._watch_timeout + 30),
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
            for line in stream_lines(response):
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
            self._to_loop(self._apply_event, kind, slim(obj))
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

