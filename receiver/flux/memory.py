"""An in-memory cluster loaded from Flux YAML manifests: `serve --manifests DIR`, `plan`, tests.

It behaves like the Kubernetes backend where the service can tell: annotate merges only the
annotations and bumps resourceVersion; a failed patch is retryable for exactly the statuses the
Kubernetes backend retries (`cluster.error_for_status`); Secrets are read whole and cached for
`secret_ttl_seconds` as the Kubernetes backend caches them (a missing one for at most 5 s), and
a `fresh` read bypasses that cache. Changing `secrets` therefore shows only after the cache
expires or on a fresh read, as a changed Secret does in a cluster. It can play Flux's part in
tests: mark a source as having fetched a revision, a consumer as applied or failed.
"""

from __future__ import annotations

import base64
import copy
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from receiver.flux import lease
from receiver.flux.cluster import NEGATIVE_SECRET_TTL, NotFound, Observer, error_for_status
from receiver.flux.event_book import EventWrite, event_body
from receiver.flux.objects import (
    ANNOTATE_ONLY_KINDS,
    API_VERSIONS,
    CANARY_WATCHED_KINDS,
    WATCHED_KINDS,
    FluxObject,
    ObjectKey,
    slim,
)
from receiver.flux.store import ObjectStore


class ManifestError(ValueError):
    """A manifest file could not be read; the message names the file and document."""


def load_documents(directory: Path) -> list[dict[str, Any]]:
    files = sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    if not directory.is_dir():
        raise ManifestError(f"{directory}: not a directory")
    docs: list[dict[str, Any]] = []
    for path in files:
        try:
            for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
                if doc is None:
                    continue
                if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str):
                    raise ManifestError(f"{path}: document {index} is not a Kubernetes object")
                if doc["kind"] == "List":  # `kubectl get -o yaml` output
                    docs.extend(i for i in doc.get("items") or [] if isinstance(i, dict))
                else:
                    docs.append(doc)
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: invalid YAML: {exc}") from None
    return docs


def _secret_data(doc: Mapping[str, Any]) -> dict[str, bytes]:
    data: dict[str, bytes] = {}
    for key, value in (doc.get("data") or {}).items():
        data[str(key)] = base64.b64decode(str(value))
    for key, value in (doc.get("stringData") or {}).items():
        data[str(key)] = str(value).encode()
    return data


PATCH_LOG = 1_000


class MemoryCluster:
    def __init__(self, store: ObjectStore, *, secret_ttl_seconds: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.secrets: dict[tuple[str, str], dict[str, bytes]] = {}
        # The patches applied, newest last: the last PATCH_LOG to 2 x PATCH_LOG of them (a
        # long `serve --manifests` must not keep every one: each carries the object's whole
        # delivery-marks annotation, kilobytes on a busy source).
        self.patches: list[tuple[ObjectKey, dict[str, str]]] = []
        self.secret_reads = 0  # reads that reached the "API server" (not the cache)
        self.events: dict[str, dict[str, Any]] = {}  # Kubernetes Events by name
        self.event_writes = 0  # creates and patches of Events
        self.secret_ttl_seconds = secret_ttl_seconds
        self.clock = clock
        self._secret_cache: dict[tuple[str, str], tuple[float, dict[str, bytes] | None]] = {}
        self._leases: dict[str, dict[str, Any]] = {}  # name -> Lease spec
        self.observe: Observer | None = None  # no API calls to report
        self.sync_errors: dict[str, str] = {}
        self.not_installed: list[str] = []
        self.not_permitted: list[str] = []
        self._version = 0
        self._synced = False

    @classmethod
    def from_directory(cls, store: ObjectStore, directory: Path, **kwargs: Any) -> MemoryCluster:
        cluster = cls(store, **kwargs)
        cluster.load(load_documents(directory))
        return cluster

    def load(self, docs: Iterable[Mapping[str, Any]]) -> None:
        for doc in docs:
            self.apply(doc)

    def apply(self, doc: Mapping[str, Any]) -> FluxObject | None:
        """Create or replace one object (a Secret goes to the secret store)."""
        raw: dict[str, Any] = copy.deepcopy(dict(doc))
        meta = raw.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        if raw.get("kind") == "Secret":
            self.secrets[(meta["namespace"], meta.get("name", ""))] = _secret_data(raw)
            return None
        # The kinds the bridge only annotates are kept too, so their patches land somewhere.
        if raw.get("kind") not in WATCHED_KINDS and raw.get("kind") not in ANNOTATE_ONLY_KINDS \
                and raw.get("kind") not in CANARY_WATCHED_KINDS:
            return None
        raw.setdefault("apiVersion", API_VERSIONS[raw["kind"]])
        meta.setdefault("generation", 1)
        self._version += 1
        meta["resourceVersion"] = str(self._version)
        return self.store.upsert(slim(raw))

    # -- Cluster protocol ----------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._synced

    async def start(self) -> None:
        self._synced = True

    async def stop(self) -> None:
        self._synced = False

    async def read_secret(
        self, namespace: str, name: str, *, fresh: bool = False
    ) -> Mapping[str, bytes] | None:
        key = (namespace, name)
        now = self.clock()
        cached = self._secret_cache.get(key)
        if not fresh and cached is not None and cached[0] > now:
            return cached[1]
        self.secret_reads += 1
        found = self.secrets.get(key)
        data = dict(found) if found is not None else None  # a read is a copy, as from the API
        ttl = self.secret_ttl_seconds if data is not None else min(
            NEGATIVE_SECRET_TTL, self.secret_ttl_seconds)
        self._secret_cache[key] = (now + ttl, data)
        return data

    async def annotate(self, key: ObjectKey, annotations: Mapping[str, str], *,
                       resource_version: str | None = None) -> FluxObject:
        current = self.store.get(key)
        if current is None:
            raise NotFound(f"{key.kind} {key.namespace}/{key.name} not found")
        if resource_version is not None and resource_version != current.resource_version:
            raise error_for_status(f"patch {key}: the object has been modified", 409)
        # Copy only what changes: cached objects are never mutated in place.
        raw = dict(current.raw)
        meta = dict(raw["metadata"])
        meta["annotations"] = {**(meta.get("annotations") or {}), **annotations}
        self._version += 1
        meta["resourceVersion"] = str(self._version)
        raw["metadata"] = meta
        self.patches.append((key, dict(annotations)))
        if len(self.patches) > 2 * PATCH_LOG:
            del self.patches[:-PATCH_LOG]
        return self.store.upsert(raw)

    async def read_object(self, key: ObjectKey) -> FluxObject | None:
        return self.store.get(key)

    async def try_acquire_lease(self, name: str, holder: str, duration_seconds: int) -> bool:
        """The same decision as the kube backend's (`lease.next_spec`), on a spec kept here."""
        spec = lease.next_spec(self._leases.get(name), holder, duration_seconds,
                               datetime.now(UTC))
        if spec is None:
            return False
        self._leases[name] = spec
        return True

    async def write_event(self, write: EventWrite) -> None:
        """Kept as the API server would keep it: `events` by name, every write counted."""
        self.event_writes += 1
        body = event_body(write, "memory")
        if write.op == "create":
            self.events.setdefault(write.name, body)
            return
        if write.name not in self.events:
            raise NotFound(f"event {write.name} not found")
        self.events[write.name] = {**self.events[write.name], **body}

    # -- playing Flux in tests -----------------------------------------------------------------

    def _update_status(self, key: ObjectKey, **status: Any) -> FluxObject:
        current = self.store.get(key)
        if current is None:
            raise NotFound(str(key))
        raw = copy.deepcopy(dict(current.raw))
        raw.setdefault("status", {}).update(status)
        raw["status"]["observedGeneration"] = raw["metadata"].get("generation", 1)
        handled = raw["metadata"].get("annotations", {}).get("reconcile.fluxcd.io/requestedAt")
        if handled:
            raw["status"]["lastHandledReconcileAt"] = handled
        self._version += 1
        raw["metadata"]["resourceVersion"] = str(self._version)
        return self.store.upsert(raw)

    @staticmethod
    def _ready(ok: bool, reason: str, message: str,
               at: float | None = None) -> list[dict[str, str]]:
        return [
            {
                "type": "Ready",
                "status": "True" if ok else "False",
                "reason": reason,
                "message": message,
                "lastTransitionTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
            }
        ]

    def mark_source_fetched(self, key: ObjectKey, revision: str) -> FluxObject:
        return self._update_status(
            key,
            artifact={"revision": revision},
            conditions=self._ready(True, "Succeeded", f"stored artifact for revision '{revision}'"),
        )

    def mark_artifact(self, key: ObjectKey, revision: str,
                      metadata: Mapping[str, str] | None = None) -> FluxObject:
        """What source-controller writes for a new OCI artifact: its revision, the manifest's
        annotations as `metadata`, and when it was stored (`lastUpdateTime`)."""
        artifact: dict[str, Any] = {
            "revision": revision,
            "lastUpdateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if metadata:
            artifact["metadata"] = dict(metadata)
        return self._update_status(
            key, artifact=artifact,
            conditions=self._ready(True, "Succeeded", f"stored artifact for digest '{revision}'"))

    def mark_applied(self, key: ObjectKey, revision: str, origin_revision: str = "", *,
                     at: float | None = None) -> FluxObject:
        """Ready at `revision` (since `at`, default now); `origin_revision`:
        kustomize-controller's `lastAppliedOriginRevision` (the artifact's
        `org.opencontainers.image.revision`)."""
        if key.kind == "HelmRelease":
            return self._mark_released(key, revision)
        origin = {"lastAppliedOriginRevision": origin_revision} if origin_revision else {}
        return self._update_status(
            key,
            lastAppliedRevision=revision,
            lastAttemptedRevision=revision,
            conditions=self._ready(True, "ReconciliationSucceeded",
                                   f"Applied revision: {revision}", at),
            **origin,
        )

    def _mark_released(self, key: ObjectKey, chart_version: str) -> FluxObject:
        """What helm-controller (HelmRelease v2) writes after a release: a new `history`
        snapshot first (its CRD has no `lastAppliedRevision`) and `lastAttemptedRevision`."""
        current = self.store.get(key)
        if current is None:
            raise NotFound(str(key))
        previous = current.status.get("history")
        history = list(previous) if isinstance(previous, list) else []
        # The cache keeps only the latest snapshot (`slim`): the release number goes on from it.
        latest = history[0] if history and isinstance(history[0], dict) else {}
        number = latest.get("version")
        version = number + 1 if isinstance(number, int) else len(history) + 1
        chart = ((current.spec.get("chart") or {}).get("spec") or {}).get("chart") or key.name
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        snapshot = {
            "name": key.name, "namespace": key.namespace, "version": version,
            "status": "deployed", "chartName": str(chart), "chartVersion": chart_version,
            "configDigest": "sha256:" + "0" * 64, "digest": "sha256:" + "1" * 64,
            "firstDeployed": now, "lastDeployed": now,
        }
        return self._update_status(
            key,
            history=[snapshot, *history][:5],
            lastAttemptedRevision=chart_version,
            conditions=self._ready(True, "UpgradeSucceeded",
                                   f"Helm upgrade succeeded for release {key.namespace}/"
                                   f"{key.name}.v{snapshot['version']} with chart "
                                   f"{chart}@{chart_version}"),
        )

    def mark_canary(self, key: ObjectKey, phase: str, *, weight: int = 0, iterations: int = 0,
                    failed_checks: int = 0, at: float | None = None) -> FluxObject:
        """What Flagger writes on a Canary: its phase, traffic weight, iteration, failed checks
        and when the phase was set (`at`, default now) (plays Flagger in tests)."""
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
        current = self.store.get(key)
        conditions = (current.status.get("conditions") if current is not None else None) or []
        promoted = next((c for c in conditions if c.get("type") == "Promoted"), None)
        if promoted is None or promoted.get("reason") != phase:
            # As Flagger: the Promoted condition changes only with the phase.
            promoted = {"type": "Promoted", "reason": phase, "lastUpdateTime": when,
                        "lastTransitionTime": when,
                        "status": {"Succeeded": "True", "Initialized": "True",
                                   "Failed": "False"}.get(phase, "Unknown")}
        return self._update_status(key, phase=phase, canaryWeight=weight, iterations=iterations,
                                   failedChecks=failed_checks, lastTransitionTime=when,
                                   conditions=[promoted])

    def mark_progressing(self, key: ObjectKey, revision: str) -> FluxObject:
        return self._update_status(
            key,
            lastAttemptedRevision=revision,
            conditions=[
                {"type": "Ready", "status": "Unknown", "reason": "Progressing",
                 "message": f"Reconciliation in progress for revision {revision}"},
                {"type": "Reconciling", "status": "True", "reason": "Progressing",
                 "message": "Reconciliation in progress"},
            ],
        )

    def mark_failed(
        self, key: ObjectKey, revision: str, reason: str = "BuildFailed", message: str = "failed"
    ) -> FluxObject:
        return self._update_status(
            key, lastAttemptedRevision=revision, conditions=self._ready(False, reason, message)
        )
