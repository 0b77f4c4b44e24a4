"""The Kubernetes API as the kube backend calls it: resources of the Flux kinds, raw JSON
responses (`_preload_content=False`), watch streams, and errors mapped to `ClusterError`."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import kubernetes

from receiver.flux.cluster import ClusterError, Observer, error_for_status
from receiver.flux.objects import API_VERSIONS, FluxObject

log = logging.getLogger("receiver.flux.kube")

T = TypeVar("T")

MERGE_PATCH = "application/merge-patch+json"
CONNECT_TIMEOUT = 10.0
# Answers that are outcomes rather than failures of the API server (not counted as errors).
EXPECTED_STATUSES = frozenset({404, 409, 410})


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
    "Canary": "canaries",
    "Deployment": "deployments",
    "DaemonSet": "daemonsets",
    "ResourceSetInputProvider": "resourcesetinputproviders",
}


def resource_for(kind: str) -> tuple[str, str, str]:
    """(group, version, plural) of a Flux kind, as its CRD names them."""
    api_version = API_VERSIONS.get(kind)
    plural = PLURALS.get(kind)
    if api_version is None or plural is None:
        raise ClusterError(f"unsupported kind {kind!r}")
    group, _, version = api_version.partition("/")
    return group, version, plural




class Timer:
    """Runs API calls and reports each to the current `observe` hook (which the app may set
    after construction)."""

    def __init__(self, observe: Callable[[], Observer | None]) -> None:
        self._observe = observe

    def __call__(self, call: str, fn: Callable[[], T],
                 expected: Callable[[BaseException], bool] = lambda exc: False) -> T:
        started = time.perf_counter()
        failed = False
        try:
            return fn()
        except Exception as exc:
            status = getattr(exc, "status", None)
            failed = status not in EXPECTED_STATUSES and not expected(exc)
            raise
        finally:
            observe = self._observe()
            if observe is not None:
                try:
                    observe(call, time.perf_counter() - started, failed)
                except Exception:
                    log.exception("observe hook failed")


class CoreV1:
    """The core/v1 calls the bridge makes (read a Secret; create and merge-patch an Event),
    without the client's `CoreV1Api` where that costs: in the clients built on pydantic (their
    `ApiClient` has `param_serialize`), loading `CoreV1Api` builds a model for every core/v1
    type, about 20 MB of memory for three calls. Those calls go through the same `ApiClient`
    (its configuration, authentication and connection pool), as the generated methods do;
    with an older client its `CoreV1Api` is used. Each call returns the raw response (read it
    with `read_json`) or raises `ApiException` for a status outside 2xx, as
    `_preload_content=False` does."""

    def __init__(self, api_client: Any) -> None:
        self._client = api_client
        self._api = (None if hasattr(api_client, "param_serialize")
                     else kubernetes.client.CoreV1Api(api_client))

    def read_namespaced_secret(self, name: str, namespace: str, *, timeout: Any) -> Any:
        if self._api is not None:
            return self._api.read_namespaced_secret(
                name, namespace, _preload_content=False, _request_timeout=timeout)
        return self._call("GET", "/api/v1/namespaces/{namespace}/secrets/{name}",
                          {"namespace": namespace, "name": name}, timeout)

    def create_namespaced_event(self, namespace: str, body: Any, *, timeout: Any) -> Any:
        if self._api is not None:
            return self._api.create_namespaced_event(
                namespace, body, _preload_content=False, _request_timeout=timeout)
        return self._call("POST", "/api/v1/namespaces/{namespace}/events",
                          {"namespace": namespace}, timeout, body, "application/json")

    def patch_namespaced_event(self, name: str, namespace: str, body: Any, *,
                               timeout: Any) -> Any:
        if self._api is not None:
            return self._api.patch_namespaced_event(
                name, namespace, body, _content_type=MERGE_PATCH, _preload_content=False,
                _request_timeout=timeout)
        return self._call("PATCH", "/api/v1/namespaces/{namespace}/events/{name}",
                          {"namespace": namespace, "name": name}, timeout, body, MERGE_PATCH)

    def _call(self, method: str, path: str, path_params: dict[str, str], timeout: Any,
              body: Any = None, content_type: str | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        request = self._client.param_serialize(
            method=method, resource_path=path, path_params=path_params, query_params=[],
            header_params=headers, body=body, post_params=[], files={},
            auth_settings=["BearerToken"], collection_formats={})
        response = self._client.call_api(*request, _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise kubernetes.client.ApiException(http_resp=response)
        return response.response


def read_json(response: Any) -> dict[str, Any]:
    """Read a `_preload_content=False` response whole and hand its connection back."""
    try:
        data = response.data
    finally:
        response.release_conn()
    body = json.loads(data)
    if not isinstance(body, dict):
        raise ClusterError("the API server answered with something other than an object")
    return body


def stream_lines(response: Any) -> Iterator[str]:
    """The newline-delimited JSON lines of a watch stream, as the chunks arrive."""
    buffer = bytearray()
    for chunk in response.stream(amt=None, decode_content=False):
        buffer.extend(chunk)
        while (end := buffer.find(b"\n")) != -1:
            line = buffer[:end].decode("utf-8", errors="replace").strip()
            del buffer[: end + 1]
            if line:
                yield line


def shutdown(response: Any) -> None:
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


def join_all(threads: Sequence[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


def describe(exc: BaseException) -> str:
    if isinstance(exc, kubernetes.client.ApiException):
        message = status_message(exc)
        hint = " (is the CRD installed?)" if exc.status == 404 else ""
        return f"HTTP {exc.status} {exc.reason or ''}".rstrip() + hint + (
            f": {message}" if message else ""
        )
    return f"{type(exc).__name__}: {exc}"


def status_message(exc: Any) -> str:
    """The `message` of the Status object an API error carries, if any."""
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return ""
    message = body.get("message") if isinstance(body, dict) else None
    return message if isinstance(message, str) else ""


def cluster_error(what: str, exc: BaseException, *, detail: bool = True) -> ClusterError:
    """Map an API failure: 404 NotFound; 409, 429, 5xx and transport errors retryable.

    `detail=False` leaves out the server's message (used for anything about a Secret).
    """
    if isinstance(exc, ClusterError):
        return exc
    if not isinstance(exc, kubernetes.client.ApiException):
        return ClusterError(f"{what}: {type(exc).__name__}", retryable=True)
    status = int(exc.status or 0)
    message = f"{what}: HTTP {status} {exc.reason or ''}".rstrip()
    extra = status_message(exc) if detail else ""
    if extra:
        message += f": {extra}"
    return error_for_status(message, status)


def not_older(new: FluxObject, current: FluxObject | None) -> bool:
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


