"""A small in-process Kubernetes API server, enough of it for the official Python client.

It keeps objects in memory per (group, version, plural, namespace, name) with one global
resourceVersion counter (like etcd's revision) and an event history, and serves list (with
limit/continue; a continue token expires, 410 Gone with reason Expired, once the list's
resourceVersion is compacted away or after `continue_ttl_seconds`; custom resource list items
keep their kind and apiVersion, as the API server serves them), watch (chunked
newline-delimited JSON, history replay, BOOKMARKs, 410 after compaction), get, create, update
(optimistic concurrency), JSON merge patch and delete. Tests drive it through plain methods and
assert on the request log.
"""

from __future__ import annotations

import contextlib
import copy
import json
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

MERGE_PATCH = "application/merge-patch+json"
# The Flux CRDs' spec.names.plural (tests/fixtures/crds): not always lower-case kind + "s".
_PLURALS = {"GitRepository": "gitrepositories", "OCIRepository": "ocirepositories",
            "HelmRepository": "helmrepositories", "ImagePolicy": "imagepolicies",
            "ImageRepository": "imagerepositories", "Canary": "canaries"}


class Resource(NamedTuple):
    group: str  # "" for the core API
    version: str
    plural: str


class Request(NamedTuple):
    """One request as the fake saw it (verb as in Kubernetes RBAC)."""

    verb: str
    resource: Resource
    namespace: str | None
    name: str | None
    query: dict[str, str]
    content_type: str
    body: Any


def resource_of(api_version: str, kind: str) -> Resource:
    group, _, version = api_version.rpartition("/")
    # Real plurals (the fake used to share kube.py's wrong lower-case-kind + "s" rule).
    return Resource(group, version, _PLURALS.get(kind) or kind.lower() + "s")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class _Sentinel:
    pass


_DROP = _Sentinel()  # cut the connection without ending the chunked stream


@dataclass(eq=False)
class _Watch:
    resource: Resource
    namespace: str | None
    bookmarks: bool
    events: queue.Queue[dict[str, Any] | _Sentinel] = field(default_factory=queue.Queue)

    def matches(self, resource: Resource, namespace: str) -> bool:
        return resource == self.resource and self.namespace in (None, namespace)


@dataclass
class _Failure:
    remaining: int
    status: int
    verb: str | None


class _ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeKube:
    """Start with `start()` (or use as a context manager); `url` is the API server address."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._objects: dict[tuple[Resource, str, str], dict[str, Any]] = {}
        self._rv = 0
        self._history: list[tuple[int, Resource, str, dict[str, Any]]] = []
        self._compacted = 0
        self._watches: set[_Watch] = set()
        self._failures: list[_Failure] = []
        self._unserved: set[Resource] = set()
        self._forbidden: set[Resource] = set()
        self._uid = 0
        self.requests: list[Request] = []
        # Real servers report an expired watch as an ERROR event; some paths use HTTP 410.
        self.gone_as_http = False
        # A continue token older than this is Expired (the API server's tokens die with etcd
        # compaction, every 5 minutes by default); None: only compaction expires them.
        self.continue_ttl_seconds: float | None = None
        # Called once at the next continue request (e.g. `compact`: it lands between pages).
        self.before_next_continue: Callable[[], None] | None = None
        self._kinds: dict[Resource, str] = {}
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeKube:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self.drop_watches()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- test controls --------------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        return self._rv

    def put(self, obj: Mapping[str, Any], *, notify: bool = True) -> dict[str, Any]:
        """Create or replace an object (ADDED / MODIFIED). `notify=False` keeps the event out
        of open watches (it stays in the history), like an event lost in a disconnect."""
        new: dict[str, Any] = copy.deepcopy(dict(obj))
        resource = resource_of(new["apiVersion"], new["kind"])
        meta = new.setdefault("metadata", {})
        namespace = meta.setdefault("namespace", "default")
        with self._lock:
            old = self._objects.get((resource, namespace, meta["name"]))
            return self._store(resource, new, old, notify=notify)

    def modify(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        change: Callable[[dict[str, Any]], None],
        *,
        notify: bool = True,
    ) -> dict[str, Any]:
        with self._lock:
            obj = self.get(api_version, kind, namespace, name)
            assert obj is not None, f"{kind} {namespace}/{name} does not exist"
            change(obj)
            return self.put(obj, notify=notify)

    def delete(
        self, api_version: str, kind: str, namespace: str, name: str, *, notify: bool = True
    ) -> None:
        with self._lock:
            self._remove(resource_of(api_version, kind), namespace, name, notify=notify)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            obj = self._objects.get((resource_of(api_version, kind), namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def compact(self) -> None:
        """Forget the history up to now and cut open watches: every resume from an older
        resourceVersion now gets 410 Gone, and the client must relist."""
        with self._lock:
            self._rv += 1  # the revision is global: something elsewhere changed
            self._compacted = self._rv
            self._history.clear()
        self.drop_watches()

    def drop_watches(self) -> None:
        """Abruptly close every open watch connection."""
        with self._lock:
            watches = list(self._watches)
        for watch in watches:
            watch.events.put(_DROP)

    def send_bookmark(self) -> None:
        """A BOOKMARK carrying the current resourceVersion to watches that asked for them."""
        with self._lock:
            for watch in self._watches:
                if watch.bookmarks:
                    meta = {"resourceVersion": str(self._rv)}
                    watch.events.put({"type": "BOOKMARK", "object": {"metadata": meta}})

    def open_watches(self) -> int:
        with self._lock:
            return len(self._watches)

    def fail_next(self, count: int, status: int = 500, verb: str | None = None) -> None:
        """Answer the next `count` requests (of `verb`, if given) with `status`."""
        with self._lock:
            self._failures.append(_Failure(count, status, verb))

    def unserve(self, api_version: str, kind: str) -> None:
        """Pretend the CRD is not installed: 404 for everything under it."""
        with self._lock:
            self._unserved.add(resource_of(api_version, kind))

    def serve(self, api_version: str, kind: str) -> None:
        with self._lock:
            self._unserved.discard(resource_of(api_version, kind))

    def forbid(self, api_version: str, kind: str, forbidden: bool = True) -> None:
        """Pretend the caller's RBAC lacks the kind: 403 for everything under it."""
        with self._lock:
            (self._forbidden.add if forbidden else self._forbidden.discard)(
                resource_of(api_version, kind))

    def count(self, verb: str, plural: str | None = None) -> int:
        with self._lock:
            return sum(
                1
                for r in self.requests
                if r.verb == verb and (plural is None or r.resource.plural == plural)
            )

    # -- storage ---------------------------------------------------------------------------

    def _store(
        self,
        resource: Resource,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        *,
        notify: bool = True,
    ) -> dict[str, Any]:
        meta = obj["metadata"]
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        if old is None:
            self._uid += 1
            meta["uid"] = f"uid-{self._uid}"
            meta["generation"] = 1
            meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        else:
            meta["uid"] = old["metadata"]["uid"]
            generation = old["metadata"].get("generation", 1)
            meta["generation"] = generation + (obj.get("spec") != old.get("spec"))
        self._objects[(resource, meta["namespace"], meta["name"])] = obj
        self._kinds[resource] = obj["kind"]
        self._emit("ADDED" if old is None else "MODIFIED", resource, obj, notify)
        return copy.deepcopy(obj)

    def _remove(self, resource: Resource, namespace: str, name: str, *, notify: bool) -> None:
        obj = self._objects.pop((resource, namespace, name), None)
        if obj is None:
            raise _ApiError(404, "NotFound", f'{resource.plural} "{name}" not found')
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._emit("DELETED", resource, obj, notify)

    def _emit(self, type_: str, resource: Resource, obj: dict[str, Any], notify: bool) -> None:
        namespace = obj["metadata"]["namespace"]
        self._history.append((self._rv, resource, namespace, {"type": type_, "object": obj}))
        if not notify:
            return
        for watch in self._watches:
            if watch.matches(resource, namespace):
                watch.events.put(copy.deepcopy({"type": type_, "object": obj}))

    # -- HTTP ------------------------------------------------------------------------------

    def handle(self, handler: _Handler) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        route = _route(parts.path)
        if route is None:
            handler.send_json(404, status_body(404, "NotFound", "the server could not find it"))
            return
        resource, namespace, name = route
        body = handler.read_body()
        content_type = handler.headers.get("Content-Type", "")
        verb = _verb(handler.command, name, query)
        request = Request(verb, resource, namespace, name, query, content_type, body)
        with self._lock:
            self.requests.append(request)
            failure = self._take_failure(verb)
            unserved = resource in self._unserved
            forbidden = resource in self._forbidden
        if failure is not None:
            handler.send_json(failure, status_body(failure, "InternalError", "injected failure"))
            return
        if unserved:
            handler.send_json(404, status_body(404, "NotFound", "the server could not find it"))
            return
        if forbidden:
            handler.send_json(403, status_body(403, "Forbidden", "RBAC: access denied"))
            return
        if verb == "watch":
            self._watch(handler, resource, namespace, query)
            return
        try:
            code, answer = self._dispatch(request)
        except _ApiError as err:
            code, answer = err.code, status_body(err.code, err.reason, err.message)
        handler.send_json(code, answer)

    def _take_failure(self, verb: str) -> int | None:
        for failure in self._failures:
            if failure.verb in (None, verb) and failure.remaining > 0:
                failure.remaining -= 1
                return failure.status
        return None

    def _dispatch(self, request: Request) -> tuple[int, dict[str, Any]]:
        verb, resource, namespace, name, query, content_type, body = request
        with self._lock:
            if verb == "list":
                return 200, self._list(resource, namespace, query)
            if namespace is None or (name is None and verb != "create"):
                raise _ApiError(405, "MethodNotAllowed", "not supported by the fake")
            if verb == "create":
                return 201, self._create(resource, namespace, body)
            assert name is not None
            current = self._objects.get((resource, namespace, name))
            if current is None:
                raise _ApiError(404, "NotFound", f'{resource.plural} "{name}" not found')
            if verb == "get":
                return 200, copy.deepcopy(current)
            if verb == "update":
                return 200, self._update(resource, current, body)
            if verb == "patch":
                return 200, self._patch(resource, current, content_type, body)
            if verb == "delete":
                self._remove(resource, namespace, name, notify=True)
                return 200, status_body(200, "", "deleted") | {"status": "Success"}
        raise _ApiError(405, "MethodNotAllowed", verb)

    def _list(
        self, resource: Resource, namespace: str | None, query: dict[str, str]
    ) -> dict[str, Any]:
        items = sorted(
            (obj for (res, ns, _), obj in self._objects.items()
             if res == resource and namespace in (None, ns)),
            key=lambda o: (o["metadata"]["namespace"], o["metadata"]["name"]),
        )
        offset, snapshot, issued = 0, self._rv, time.monotonic()
        if query.get("continue"):
            hook, self.before_next_continue = self.before_next_continue, None
            if hook is not None:
                hook()
            first, rv, when = query["continue"].split(":")
            offset, snapshot, issued = int(first), int(rv), float(when)
            ttl = self.continue_ttl_seconds
            if snapshot < self._compacted or (ttl is not None
                                               and time.monotonic() - issued > ttl):
                raise _ApiError(410, "Expired", "The provided continue parameter is too old to "
                                "display a consistent list result. You can start a new list "
                                "without the continue parameter.")
        limit = int(query.get("limit") or 0) or len(items) + 1
        page = items[offset : offset + limit]
        meta: dict[str, Any] = {"resourceVersion": str(snapshot)}
        if offset + limit < len(items):
            meta["continue"] = f"{offset + limit}:{snapshot}:{issued}"
        # Custom resources are served unstructured: every item keeps its kind and apiVersion,
        # and the list is a <Kind>List of the resource's group version.
        group_version = f"{resource.group}/{resource.version}" if resource.group else resource.version
        kind = self._kinds.get(resource, "")
        return {"kind": kind + "List", "apiVersion": group_version, "metadata": meta,
                "items": [copy.deepcopy(o) for o in page]}

    def _create(self, resource: Resource, namespace: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not body.get("metadata", {}).get("name"):
            raise _ApiError(400, "BadRequest", "metadata.name is required")
        obj = copy.deepcopy(body)
        obj["metadata"]["namespace"] = namespace
        if (resource, namespace, obj["metadata"]["name"]) in self._objects:
            raise _ApiError(409, "AlreadyExists", f'{resource.plural} already exists')
        return self._store(resource, obj, None)

    def _update(
        self, resource: Resource, current: dict[str, Any], body: Any
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _ApiError(400, "BadRequest", "body must be an object")
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            raise _ApiError(409, "Conflict", "the object has been modified; please retry")
        obj = copy.deepcopy(body)
        obj["metadata"]["namespace"] = current["metadata"]["namespace"]
        obj["metadata"]["name"] = current["metadata"]["name"]
        return self._store(resource, obj, current)

    def _patch(
        self, resource: Resource, current: dict[str, Any], content_type: str, body: Any
    ) -> dict[str, Any]:
        if content_type.split(";")[0].strip() != MERGE_PATCH:
            raise _ApiError(415, "UnsupportedMediaType", f"unsupported patch type {content_type}")
        if not isinstance(body, dict):
            raise _ApiError(400, "BadRequest", "merge patch must be an object")
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
            raise _ApiError(409, "Conflict", "the object has been modified; please retry")
        obj = merge_patch(current, body)
        obj["metadata"]["namespace"] = current["metadata"]["namespace"]
        obj["metadata"]["name"] = current["metadata"]["name"]
        return self._store(resource, obj, current)

    def _watch(
        self,
        handler: _Handler,
        resource: Resource,
        namespace: str | None,
        query: dict[str, str],
    ) -> None:
        timeout = float(query.get("timeoutSeconds") or 1800)
        watch = _Watch(resource, namespace, query.get("allowWatchBookmarks") == "true")
        since = query.get("resourceVersion") or "0"
        with self._lock:
            if since != "0" and int(since) < self._compacted:
                expired = status_body(410, "Expired", f"too old resource version: {since}")
                if self.gone_as_http:
                    handler.send_json(410, expired)
                    return
                backlog = [{"type": "ERROR", "object": expired}]
            elif since == "0":
                backlog = [
                    {"type": "ADDED", "object": copy.deepcopy(obj)}
                    for (res, ns, _), obj in self._objects.items()
                    if watch.matches(res, ns)
                ]
            else:
                backlog = [
                    copy.deepcopy(event)
                    for rv, res, ns, event in self._history
                    if rv > int(since) and watch.matches(res, ns)
                ]
            if not backlog or backlog[0]["type"] != "ERROR":
                self._watches.add(watch)
        try:
            self._stream(handler, watch, backlog, time.monotonic() + timeout)
        finally:
            with self._lock:
                self._watches.discard(watch)

    def _stream(
        self,
        handler: _Handler,
        watch: _Watch,
        backlog: list[dict[str, Any]],
        deadline: float,
    ) -> None:
        handler.close_connection = True
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        try:
            for event in backlog:
                handler.write_chunk(json.dumps(event).encode() + b"\n")
                if event["type"] == "ERROR":
                    handler.write_chunk(b"")
                    return
            while not self._closed.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    handler.write_chunk(b"")  # a watch that times out ends cleanly
                    return
                try:
                    item = watch.events.get(timeout=min(left, 0.05))
                except queue.Empty:
                    continue
                if isinstance(item, _Sentinel):
                    break
                handler.write_chunk(json.dumps(item).encode() + b"\n")
        except OSError:
            return
        handler.abort()


def _route(path: str) -> tuple[Resource, str | None, str | None] | None:
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) >= 3:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 4:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace: str | None = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    if len(rest) == 1:
        return Resource(group, version, rest[0]), namespace, None
    if len(rest) == 2:
        return Resource(group, version, rest[0]), namespace, rest[1]
    return None


def _verb(method: str, name: str | None, query: dict[str, str]) -> str:
    if method == "GET":
        if name is not None:
            return "get"
        return "watch" if query.get("watch") in ("true", "1") else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
        method, method.lower()
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, fake: FakeKube) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fake = fake


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _handle(self) -> None:
        assert isinstance(self.server, _Server)
        self.server.fake.handle(self)

    def read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return None
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def send_json(self, code: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def abort(self) -> None:
        """Cut the connection mid-stream, as a network failure would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        pass
