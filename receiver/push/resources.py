"""A Receiver's `spec.resources`, resolved against the cache with Flux's own semantics. Pure.

Flux rules kept (receiver_handlers.go): the namespace defaults to the Receiver's; apiVersion
defaults only for source kinds (a Kustomization or HelmRelease entry without one is an error);
`name: "*"` needs `matchLabels` and selects in one namespace; a named object that does not
exist is an error. Unlike Flux, an error on one entry does not hide the others: each is
reported next to the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from receiver.flux.objects import (
    ANNOTATE_ONLY_KINDS,
    ANNOTATE_ONLY_SOURCES,
    INPUT_PROVIDER_KIND,
    RECEIVER_DEFAULT_API_VERSIONS,
    ROUTED_KINDS,
    FluxObject,
    ObjectKey,
)
from receiver.flux.store import ObjectStore


@dataclass(frozen=True, slots=True)
class ResourceIssue:
    """An entry of `spec.resources` that names nothing the bridge can annotate."""

    api_version: str
    kind: str
    namespace: str
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Resolved:
    """Which objects a Receiver lists. Keys, not objects: a cached resolution stays right
    while the objects' status and annotations change (see `ObjectStore.shape_version`)."""

    ordered: tuple[ObjectKey, ...]
    issues: tuple[ResourceIssue, ...]
    keys: frozenset[ObjectKey]
    # Named objects of kinds the bridge does not route (ANNOTATE_ONLY_KINDS), with their
    # apiVersion, sources first: annotated on every request, as Flux does.
    annotate_only: tuple[tuple[str, ObjectKey], ...] = ()
    # Objects every entry listing them gives a `filter` (spec.resources[].filter), with those
    # expressions: Flux annotates such an object only when one of them is true. An object
    # also listed by an entry without a filter is not here: that entry annotates it anyway.
    entry_filters: tuple[tuple[ObjectKey, tuple[str, ...]], ...] = ()
    # The listed input providers (a push reads them on every request: an organisation-wide
    # Receiver lists thousands of objects, of which these are a handful).
    providers: tuple[ObjectKey, ...] = ()

    def objects(self, store: ObjectStore) -> list[FluxObject]:
        """The listed objects as they are in the cache now."""
        return _cached(store, self.ordered)

    def provider_objects(self, store: ObjectStore) -> list[FluxObject]:
        """The listed input providers as they are in the cache now."""
        return _cached(store, self.providers)


def _cached(store: ObjectStore, keys: tuple[ObjectKey, ...]) -> list[FluxObject]:
    return [o for o in (store.get(k) for k in keys) if o is not None]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def resolve_resources(
    receiver: FluxObject, store: ObjectStore, *, allow_cross_namespace: bool = True
) -> Resolved:
    found: dict[ObjectKey, FluxObject] = {}
    issues: list[ResourceIssue] = []
    blind: dict[ObjectKey, str] = {}
    filters: dict[ObjectKey, list[str]] = {}  # per object, each listing entry's filter or ""
    for entry in receiver.spec.get("resources") or []:
        if not isinstance(entry, dict):
            continue
        expression = _text(entry.get("filter")).strip()
        kind, name = _text(entry.get("kind")), _text(entry.get("name"))
        namespace = _text(entry.get("namespace")) or receiver.namespace
        api_version = _text(entry.get("apiVersion")) or RECEIVER_DEFAULT_API_VERSIONS.get(kind, "")

        def issue(reason: str, *, _k: str = kind, _n: str = name, _ns: str = namespace,
                  _a: str = api_version) -> None:
            issues.append(ResourceIssue(_a, _k, _ns, _n, reason))

        if not kind or not name:
            issue("resource entry needs kind and name")
        elif namespace != receiver.namespace and not allow_cross_namespace:
            issue("cross-namespace references are not allowed")
        elif not api_version:
            issue(f"apiVersion must be specified for kind {kind!r}")
        elif kind in ANNOTATE_ONLY_KINDS:
            if name == "*":
                # Listing needs `list` on the kind, which the bridge is not granted for most (it
                # patches them, nothing more); the cached image kinds may not be installed, so
                # every such kind is named alike. Flux would annotate every match.
                issue(f"name '*' is not resolved for kind {kind}, which the bridge does not "
                      "list: name the objects")
            else:
                blind.setdefault(ObjectKey(kind, namespace, name), api_version)
                filters.setdefault(ObjectKey(kind, namespace, name), []).append(expression)
        elif (kind not in ROUTED_KINDS and kind != INPUT_PROVIDER_KIND) or kind == "Receiver":
            issue(f"kind {kind} is not reconciled by the bridge")
        elif name == "*":
            labels = entry.get("matchLabels")
            if not isinstance(labels, dict) or not labels:
                issue("name '*' requires matchLabels")
                continue
            selector = {str(k): str(v) for k, v in labels.items()}
            for obj in sorted(store.list(kind, namespace, selector), key=lambda o: o.key):
                found.setdefault(obj.key, obj)
                filters.setdefault(obj.key, []).append(expression)
        else:
            named = store.get(ObjectKey(kind, namespace, name))
            if named is None:
                issue(f"unable to read {kind} {namespace}/{name}: not found")
            else:
                found.setdefault(named.key, named)
                filters.setdefault(named.key, []).append(expression)
    annotate_only = tuple(sorted(((a, k) for k, a in blind.items()),
                                 key=lambda e: (e[1].kind not in ANNOTATE_ONLY_SOURCES, e[1])))
    entry_filters = tuple((key, tuple(exprs)) for key, exprs in filters.items()
                          if all(exprs))
    providers = tuple(k for k in found if k.kind == INPUT_PROVIDER_KIND)
    return Resolved(tuple(found), tuple(issues), frozenset(found), annotate_only, entry_filters,
                    providers)
