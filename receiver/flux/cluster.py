"""The one small interface the service, `plan` and the tests share for talking to a cluster.

Two implementations: `memory.MemoryCluster` (manifests from a directory; also plays Flux's part
in tests) and `kube.KubeCluster` (the official client, list+watch). Both keep their objects in an
`ObjectStore` and keep the webhook-path index of Receivers current.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from receiver.flux.event_book import EventWrite
from receiver.flux.objects import FluxObject, ObjectKey
from receiver.flux.store import ObjectStore
from receiver.retry import retryable_status


class ClusterError(Exception):
    """A call to the cluster failed. `retryable` marks conflicts, throttling and 5xx."""

    def __init__(self, message: str, *, status: int = 0, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class NotFound(ClusterError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=404)


# How long a 404 for a Secret is believed: a Receiver created just before its Secret recovers
# fast. Both backends use it.
NEGATIVE_SECRET_TTL = 5.0


def error_for_status(message: str, status: int) -> ClusterError:
    """The error an API answer maps to, for every backend: 404 is NotFound."""
    if status == 404:
        return NotFound(message)
    return ClusterError(message, status=status, retryable=retryable_status(status, after_reread=True))


# observe(call, seconds, error): told of every API call, from whichever thread made it.
Observer = Callable[[str, float, bool], None]


class Cluster(Protocol):
    """The port every cluster backend fills: the Kubernetes API (`kube`) or manifests
    (`memory`). What the app reads of a backend is here, nothing found by `hasattr`."""

    store: ObjectStore
    observe: Observer | None  # set by the app; a backend without API calls never calls it

    @property
    def synced(self) -> bool:
        """True once every watched kind has been listed at least once."""
        ...

    @property
    def sync_errors(self) -> dict[str, str]:
        """The list/watch streams failing now, by label; empty when none (or no watches)."""
        ...

    @property
    def not_installed(self) -> list[str]:
        """Optional kinds whose CRD the cluster does not serve."""
        ...

    @property
    def not_permitted(self) -> list[str]:
        """Optional kinds the bridge's RBAC may not list or watch."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def read_secret(self, namespace: str, name: str, *, fresh: bool = False) -> Mapping[
        str, bytes
    ] | None:
        """The Secret's decoded data, from a short-lived cache unless `fresh`. None if absent."""
        ...

    async def annotate(self, key: ObjectKey, annotations: Mapping[str, str], *,
                       resource_version: str | None = None) -> FluxObject:
        """JSON-merge-patch only these annotations; returns the patched object.

        With `resource_version` the patch applies only to that version of the object (a 409
        `ClusterError` otherwise): how two replicas agree on who annotated first.
        """
        ...

    async def read_object(self, key: ObjectKey) -> FluxObject | None:
        """The object as the API server has it now (not the cache); None if it is gone."""
        ...

    async def try_acquire_lease(self, name: str, holder: str, duration_seconds: int) -> bool:
        """Hold (or renew) a coordination.k8s.io Lease; False while someone else holds it."""
        ...

    async def write_event(self, write: EventWrite) -> None:
        """Create or patch one core v1 Event (`event_book.event_body`); NotFound when a patched
        Event is gone."""
        ...


def secret_token(data: Mapping[str, bytes] | None) -> str | None:
    """The Receiver token: key `token`, used raw (untrimmed), as Flux does."""
    if not data or "token" not in data:
        return None
    try:
        return data["token"].decode()
    except UnicodeDecodeError:
        return None
