"""Typed, read-only views over Flux objects kept as plain dicts.

The cache keeps what the API server (or a manifest file) gave us; these views give the routing
and status code named accessors without copying or validating the whole object.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

_intern = sys.intern

RECONCILE_ANNOTATION = "reconcile.fluxcd.io/requestedAt"
# Our own annotation prefix: extra paths for a consumer, and the like.
BRIDGE_PREFIX = "gitea-flux-bridge.io/"
PATHS_ANNOTATION = BRIDGE_PREFIX + "paths"

SOURCE_GROUP = "source.toolkit.fluxcd.io"
KUSTOMIZE_GROUP = "kustomize.toolkit.fluxcd.io"
HELM_GROUP = "helm.toolkit.fluxcd.io"
NOTIFICATION_GROUP = "notification.toolkit.fluxcd.io"
IMAGE_GROUP = "image.toolkit.fluxcd.io"
SOURCE_EXTENSIONS_GROUP = "source.extensions.fluxcd.io"
# flux-operator's API: a ResourceSetInputProvider lists branches, tags or pull requests.
OPERATOR_GROUP = "fluxcd.controlplane.io"
INPUT_PROVIDER_KIND = "ResourceSetInputProvider"

# The versions served by the Flux release we target (flux2 v2.9.x); each CRD serves one.
API_VERSIONS: dict[str, str] = {
    "GitRepository": f"{SOURCE_GROUP}/v1",
    "OCIRepository": f"{SOURCE_GROUP}/v1",
    "Bucket": f"{SOURCE_GROUP}/v1",
    "HelmChart": f"{SOURCE_GROUP}/v1",
    "HelmRepository": f"{SOURCE_GROUP}/v1",
    "Kustomization": f"{KUSTOMIZE_GROUP}/v1",
    "HelmRelease": f"{HELM_GROUP}/v2",
    "Receiver": f"{NOTIFICATION_GROUP}/v1",
    # Kinds a Receiver may list that the bridge annotates but does not route by repository.
    "ExternalArtifact": f"{SOURCE_GROUP}/v1",
    "ImageRepository": f"{IMAGE_GROUP}/v1",
    "ImagePolicy": f"{IMAGE_GROUP}/v1",
    "ImageUpdateAutomation": f"{IMAGE_GROUP}/v1",
    "ArtifactGenerator": f"{SOURCE_EXTENSIONS_GROUP}/v1beta1",
    # Progressive delivery (`statuses.canaries`): Flagger's Canary and the workloads it targets,
    # cached only when canaries are on.
    "Canary": "flagger.app/v1beta1",
    "Deployment": "apps/v1",
    "DaemonSet": "apps/v1",
    # Not in the Receiver CRD's enum as Flux ships it; flux-operator adds it when it installs
    # Flux. Routed by repository, event and filters (`push.input_providers`).
    INPUT_PROVIDER_KIND: f"{OPERATOR_GROUP}/v1",
}
# The kinds routed by repository, ref and path (Git pushes) and always cached.
ROUTED_KINDS = ("Receiver", "GitRepository", "OCIRepository", "Kustomization", "HelmRelease")
# Cached when their CRD is installed and RBAC lets us list them, for package events: a missing
# CRD (image-reflector-controller is an optional Flux component) or grant (RBAC managed outside
# the chart, older than the Helm kinds' list/watch) is reported and does not hold readiness back.
# ResourceSetInputProviders (flux-operator) are cached alike, for Gitea branch, tag and pull
# request events.
OPTIONAL_KINDS = ("ImageRepository", "ImagePolicy", "HelmRepository", "HelmChart",
                  INPUT_PROVIDER_KIND)
# The kinds the bridge caches (list+watch).
WATCHED_KINDS = ROUTED_KINDS + OPTIONAL_KINDS
# Every kind a Receiver's `resources` may name (the Receiver CRD's enum, NC v1.9).
RECEIVER_KINDS = ("Bucket", "GitRepository", "Kustomization", "HelmRelease", "HelmChart",
                  "HelmRepository", "ImageRepository", "ImagePolicy", "ImageUpdateAutomation",
                  "OCIRepository", "ArtifactGenerator", "ExternalArtifact")
# Listed kinds the bridge cannot route by repository, ref or path: annotated on every Git push
# and bare request, as Flux does, by a patch of the named object. Most are not cached (RBAC
# `patch` only); the OPTIONAL_KINDS are, for package events (`package_routing`).
ANNOTATE_ONLY_KINDS = tuple(k for k in RECEIVER_KINDS if k not in ROUTED_KINDS)
# Annotated first among those, as sources come first in Flux's `--with-source` order.
ANNOTATE_ONLY_SOURCES = frozenset({"Bucket", "HelmChart", "HelmRepository", "ExternalArtifact",
                                   "ArtifactGenerator", "ImageRepository"})
# Flagger's Canary and the workload kinds its `spec.targetRef` may name that Flux applies: cached
# (optional: Flagger may not be installed) only when `statuses.canaries` is on. Workloads are
# cached slim: their labels say which Kustomization or HelmRelease applied them, nothing else
# of them is read.
CANARY_KINDS = ("Canary",)
WORKLOAD_KINDS = ("Deployment", "DaemonSet")
CANARY_WATCHED_KINDS = CANARY_KINDS + WORKLOAD_KINDS
SOURCE_KINDS = frozenset({"GitRepository", "OCIRepository", "Bucket", "HelmChart", "HelmRepository"})
# The sources whose `status.artifact` is what they fetched (its revision is the one applied).
ARTIFACT_KINDS = frozenset({"GitRepository", "OCIRepository", "Bucket", "HelmChart"})
CONSUMER_KINDS = frozenset({"Kustomization", "HelmRelease"})

# Flux's receiver fills in apiVersion only for these kinds (receiver_handlers.go defaults);
# Kustomization and HelmRelease entries must carry one.
RECEIVER_DEFAULT_API_VERSIONS: dict[str, str] = {
    "Bucket": f"{SOURCE_GROUP}/v1",
    "HelmChart": f"{SOURCE_GROUP}/v1",
    "HelmRepository": f"{SOURCE_GROUP}/v1",
    "GitRepository": f"{SOURCE_GROUP}/v1",
    "OCIRepository": f"{SOURCE_GROUP}/v1",
    "ImageRepository": "image.toolkit.fluxcd.io/v1",
    "ArtifactGenerator": "source.extensions.fluxcd.io/v1beta1",
}


class ObjectKey(NamedTuple):
    """Identity of a namespaced object in the cache."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


_UNSET = object()


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


class FluxObject:
    """One cached object. `raw` is never mutated after it enters the cache, so the identity
    fields are read once here (routing reads them thousands of times per second)."""

    __slots__ = ("_annotations", "_conditions", "_paths", "_source", "api_version", "key",
                 "kind", "metadata", "name", "namespace", "raw", "spec", "status")

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.raw = raw
        # Derived once on first use by consumer_source / consumer_paths.
        self._source: SourceRef | object | None = _UNSET
        self._paths: tuple[str, ...] | None = None
        self._annotations: dict[str, str] | None = None
        self._conditions: dict[str, dict[str, Any]] | None = None
        self.kind = _str(raw.get("kind"))
        # Read once: a delivery's evaluation reads them a dozen times per target.
        self.metadata: dict[str, Any] = _dict(raw.get("metadata"))
        self.spec: dict[str, Any] = _dict(raw.get("spec"))
        self.status: dict[str, Any] = _dict(raw.get("status"))
        metadata = self.metadata
        self.name = _str(metadata.get("name"))
        self.namespace = _str(metadata.get("namespace")) or "default"
        self.key = ObjectKey(self.kind, self.namespace, self.name)
        self.api_version = _str(raw.get("apiVersion")) or API_VERSIONS.get(self.kind, "")

    def __repr__(self) -> str:
        return f"FluxObject({self.key})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FluxObject) and self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def labels(self) -> dict[str, str]:
        return {k: v for k, v in _dict(self.metadata.get("labels")).items() if isinstance(v, str)}

    @property
    def annotations(self) -> dict[str, str]:
        """The string annotations, filtered once (`raw` never changes); callers only read it.
        Every delivery evaluation reads them for each target, several times."""
        if self._annotations is None:
            raw = _dict(self.metadata.get("annotations"))
            self._annotations = {k: v for k, v in raw.items() if isinstance(v, str)}
        return self._annotations

    @property
    def generation(self) -> int:
        value = self.metadata.get("generation")
        return value if isinstance(value, int) else 0

    @property
    def resource_version(self) -> str:
        return _str(self.metadata.get("resourceVersion"))

    @property
    def suspended(self) -> bool:
        return self.spec.get("suspend") is True

    def condition(self, type_: str) -> dict[str, Any] | None:
        """The first condition of this type (as a controller writes one of each)."""
        if self._conditions is None:
            found: dict[str, dict[str, Any]] = {}
            conditions = self.status.get("conditions")
            for cond in conditions if isinstance(conditions, list) else ():
                if isinstance(cond, dict):
                    kind = cond.get("type")
                    if isinstance(kind, str) and kind not in found:
                        found[kind] = cond
            self._conditions = found
        return self._conditions.get(type_)


@dataclass(frozen=True, slots=True)
class SourceRef:
    """A consumer's pointer to its source, with Flux's namespace defaulting applied."""

    kind: str
    namespace: str
    name: str

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.namespace, self.name)


def consumer_source(obj: FluxObject) -> SourceRef | None:
    """The source a Kustomization or HelmRelease reads from, or None if it has none we follow.

    A HelmRelease with `spec.chart` names its source in `spec.chart.spec.sourceRef`; with
    `spec.chartRef` it points at an OCIRepository/HelmChart directly.
    """
    if obj._source is not _UNSET:
        return obj._source  # type: ignore[return-value]
    spec = obj.spec
    found: SourceRef | None = None
    if obj.kind == "Kustomization":
        ref = _dict(spec.get("sourceRef"))
    elif obj.kind == "HelmRelease":
        chart_spec = _dict(_dict(spec.get("chart")).get("spec"))
        ref = _dict(chart_spec.get("sourceRef")) or _dict(spec.get("chartRef"))
    else:
        ref = {}
    kind, name = _str(ref.get("kind")), _str(ref.get("name"))
    if kind and name:
        found = SourceRef(kind, _str(ref.get("namespace")) or obj.namespace, name)
    obj._source = found
    return found


def helm_chart_of(obj: FluxObject) -> ObjectKey | None:
    """The HelmChart a HelmRelease installs from: its `chartRef` when that names a HelmChart,
    else the one helm-controller generates from `spec.chart`, named `<namespace>-<name>` of the
    HelmRelease, in `spec.chart.spec.sourceRef.namespace` or the HelmRelease's namespace.
    (`consumer_source` gives the HelmRepository for `spec.chart`: the chart sits in between.)"""
    if obj.kind != "HelmRelease":
        return None
    chart_ref = _dict(obj.spec.get("chartRef"))
    if _str(chart_ref.get("kind")) == "HelmChart" and _str(chart_ref.get("name")):
        return ObjectKey("HelmChart", _str(chart_ref.get("namespace")) or obj.namespace,
                         _str(chart_ref.get("name")))
    chart = _dict(obj.spec.get("chart"))
    source = _dict(_dict(chart.get("spec")).get("sourceRef"))
    if not _str(source.get("name")):
        return None
    return ObjectKey("HelmChart", _str(source.get("namespace")) or obj.namespace,
                     f"{obj.namespace}-{obj.name}")


def normalise_path(path: str) -> str:
    """`./apps`, `apps/`, `/apps` and `apps` name the same directory; the root is ''."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


def consumer_paths(obj: FluxObject) -> tuple[str, ...]:
    """The repository paths whose change touches a consumer (normalised, root = '')."""
    if obj._paths is not None:
        return obj._paths
    paths: list[str] = []
    if obj.kind == "Kustomization":
        paths.append(normalise_path(_str(obj.spec.get("path"))))
    elif obj.kind == "HelmRelease":
        chart_spec = _dict(_dict(obj.spec.get("chart")).get("spec"))
        chart = _str(chart_spec.get("chart"))
        if chart:
            paths.append(normalise_path(chart))
        for values_file in chart_spec.get("valuesFiles") or []:
            if isinstance(values_file, str):
                paths.append(normalise_path(values_file))
    extra = obj.annotations.get(PATHS_ANNOTATION, "")
    for item in extra.replace(",", ";").split(";"):
        if item.strip():
            paths.append(normalise_path(item.strip()))
    obj._paths = tuple(dict.fromkeys(paths))
    return obj._paths


def slim(raw: dict[str, Any]) -> dict[str, Any]:
    """What the cache keeps of an object: all of it but what no reader of the cache looks at
    and what grows with the cluster (`_unread`), with its strings shared (`_share_strings`),
    except a workload (`WORKLOAD_KINDS`), of which only its identity, labels and who changed
    it when (a Deployment's pod template is most of its bytes). `raw` itself is not changed
    but for its strings, each replaced by an equal one."""
    if raw.get("kind") not in WORKLOAD_KINDS:
        return _share_strings(_unread(raw))
    meta = _dict(raw.get("metadata"))
    identity = ("name", "namespace", "labels", "resourceVersion", "generation", "uid")
    kept: dict[str, Any] = {k: meta[k] for k in identity if k in meta}
    # Who changed it last and when (`canary.workload_changed_at`), without the field sets.
    managers = meta.get("managedFields")
    if isinstance(managers, list):
        kept["managedFields"] = [
            {k: entry[k] for k in ("manager", "operation", "subresource", "time") if k in entry}
            for entry in managers if isinstance(entry, dict)]
    return _share_strings({"apiVersion": raw.get("apiVersion"), "kind": raw.get("kind"),
                           "metadata": kept})


# The spec fields no reader of the cache looks at, by kind. A HelmRelease's
# `values` and `postRenderers` and a Kustomization's `patches` and `postBuild` are most of a real
# consumer's bytes (a chart's values run to kilobytes); a source's artifact keeps its revision,
# digest, metadata and `lastUpdateTime`, not where source-controller stores it.
_UNREAD_SPEC: dict[str, frozenset[str]] = {
    "HelmRelease": frozenset({"values", "postRenderers"}),
    "Kustomization": frozenset({"patches", "postBuild"}),
}
_UNREAD_ARTIFACT = frozenset({"url", "path", "size"})
_MANAGED_FIELDS = frozenset({"managedFields"})
_INVENTORY = frozenset({"inventory"})


def _without(mapping: dict[str, Any], keys: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k not in keys}


def _unread(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` without `metadata.managedFields` (the API server's field ownership: about half of
    a listed Flux object's bytes), the bulk of a consumer's spec that routing never reads
    (`_UNREAD_SPEC`), a source artifact's storage address (`_UNREAD_ARTIFACT`), a
    Kustomization's `status.inventory` (an entry per object it applied) and a HelmRelease's
    `status.history` past the latest snapshot (helm-controller keeps up to `maxHistory`, 5 by
    default; only `history[0]` is read). Nothing reads them: the resource filters' `res` has
    the metadata, never the spec or status. `raw` is not changed: what goes is left out of
    new dicts."""
    out = raw
    meta = raw.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        out = {**out, "metadata": _without(meta, _MANAGED_FIELDS)}
    kind = _str(raw.get("kind"))
    spec, unread_spec = raw.get("spec"), _UNREAD_SPEC.get(kind)
    if unread_spec and isinstance(spec, dict) and not unread_spec.isdisjoint(spec):
        out = {**out, "spec": _without(spec, unread_spec)}
    status = raw.get("status")
    if not isinstance(status, dict):
        return out
    if kind == "Kustomization" and "inventory" in status:
        out = {**out, "status": _without(status, _INVENTORY)}
    elif kind == "HelmRelease":
        history = status.get("history")
        if isinstance(history, list) and len(history) > 1:
            out = {**out, "status": {**status, "history": history[:1]}}
    elif kind in ARTIFACT_KINDS:
        artifact = status.get("artifact")
        if isinstance(artifact, dict) and not _UNREAD_ARTIFACT.isdisjoint(artifact):
            out = {**out, "status": {**status, "artifact": _without(artifact, _UNREAD_ARTIFACT)}}
    return out


_UNIQUE = frozenset({"uid", "resourceVersion"})


def _share_strings(node: dict[str, Any]) -> dict[str, Any]:
    """Replace every string value under `node` by the one equal string the process keeps
    (`sys.intern`; it is freed with its last user), in place. A fleet repeats its kinds, API
    versions, namespaces, labels, condition types and reasons, times and revisions in object
    after object: one copy of each makes a cached object about a third smaller. Keys are left
    alone (the JSON decoder already shares those within a list page), and so are values no
    other object has (`_UNIQUE`): sharing those would only cost the table's entry."""
    for key, value in node.items():
        kind = type(value)
        if kind is str:
            if key not in _UNIQUE:
                node[key] = _intern(value)
        elif kind is dict:
            _share_strings(value)
        elif kind is list:
            _share_list(value)
    return node


def _share_list(items: list[Any]) -> None:
    for i, value in enumerate(items):
        kind = type(value)
        if kind is str:
            items[i] = _intern(value)
        elif kind is dict:
            _share_strings(value)
        elif kind is list:
            _share_list(value)


def cache_kinds(canaries: bool) -> dict[str, tuple[str, ...]]:
    """The kube backend's `kinds` and `optional_kinds`: with canaries on, Flagger's Canary and
    the workload kinds too, optional (Flagger may not be installed, or RBAC may leave them
    out: said on `/readyz`, not fatal)."""
    if not canaries:
        return {"kinds": WATCHED_KINDS, "optional_kinds": OPTIONAL_KINDS}
    return {"kinds": WATCHED_KINDS + CANARY_WATCHED_KINDS,
            "optional_kinds": OPTIONAL_KINDS + CANARY_WATCHED_KINDS}
