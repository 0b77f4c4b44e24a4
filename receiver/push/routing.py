"""Push + Receiver + cache -> the ordered objects to annotate, the ones to follow, and why. Pure.

The decisions, in the order a reader meets them:
1. which GitRepositories the push feeds (normalised URL, then `spec.ref` with Flux's precedence);
2. which GitRepositories include those (annotated after them, as Flux needs);
3. which consumers (Kustomizations, HelmReleases from Git) the changed files touch;
4. what the Receiver's `resources` allow us to annotate (listed), and what we only track.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from receiver.flux.objects import (
    CONSUMER_KINDS,
    SOURCE_KINDS,
    FluxObject,
    ObjectKey,
    consumer_paths,
    consumer_source,
)
from receiver.flux.revisions import followable
from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import Push
from receiver.push.resources import Resolved, resolve_resources
from receiver.push.semver import ConstraintError, artifact_tag, tag_taken

PHASE_SOURCE = "source"
PHASE_CONSUMER = "consumer"


@dataclass(frozen=True, slots=True)
class Target:
    api_version: str
    kind: str
    namespace: str
    name: str
    reason: str

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.kind, self.namespace, self.name)

    @property
    def phase(self) -> str:
        return PHASE_SOURCE if self.kind in SOURCE_KINDS else PHASE_CONSUMER

    def as_dict(self) -> dict[str, str]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "reason": self.reason,
        }


def _target(obj: FluxObject, reason: str) -> Target:
    return Target(obj.api_version, obj.kind, obj.namespace, obj.name, reason)


def _unrelated_reason(obj: FluxObject) -> str:
    if obj.kind in SOURCE_KINDS:
        return "not a source of the pushed repository"
    source = consumer_source(obj)
    if source is None:
        return "has no source the bridge follows"
    return f"its source {source.kind}/{source.namespace}/{source.name} is not fed by the push"


@dataclass(frozen=True, slots=True)
class Plan:
    receiver: str
    targets: tuple[Target, ...]  # annotate in this order: sources, then consumers
    # Touched consumers, listed or not, whose readiness at the commit can be told: what a
    # delivery follows and what gets `pending` statuses.
    tracked: tuple[Target, ...]
    # Candidates left out: sources of the pushed repository, consumers of matched sources,
    # unusable `resources` entries.
    skipped: tuple[Target, ...] = field(default=())
    # Why the plan had no push to route by ("" when it had one): what the reply says.
    note: str = ""
    # The Receiver's listed objects, and those of them (or not) the push concerns: the rest,
    # `unrelated`, have nothing to do with the pushed repository. Neither their skip reasons
    # nor their set are built unless asked for (`plan` prints them; the /hook reply counts
    # them), so a Receiver that lists thousands of objects costs no work per push for them.
    listed: frozenset[ObjectKey] = field(default=frozenset())
    related: frozenset[ObjectKey] = field(default=frozenset())
    # Listed objects of kinds the bridge does not route (Bucket, HelmChart, Image*...): patched
    # with Flux's annotation on every request, as Flux does, not followed. Sources first.
    annotate_only: tuple[Target, ...] = field(default=())
    # Set by `compact`: the unrelated objects counted, no longer listed.
    unrelated_count: int | None = None

    @property
    def unrelated(self) -> frozenset[ObjectKey]:
        """Listed objects the push does not concern (built on demand: as many as listed)."""
        return self.listed - self.related

    def _unrelated_count(self) -> int:
        if self.unrelated_count is not None:
            return self.unrelated_count
        # The intersection walks the smaller set: the few objects the push concerns.
        return len(self.listed) - len(self.listed & self.related)

    def compact(self) -> Plan:
        """What a delivery keeps for its replies: the unrelated objects only counted (a set of
        keys per push was the largest part of a stored delivery)."""
        if self.unrelated_count is not None:
            return self
        return replace(self, listed=frozenset(), related=frozenset(),
                       unrelated_count=self._unrelated_count())

    def all_skipped(self, store: ObjectStore) -> tuple[Target, ...]:
        objs = (store.get(k) for k in self.unrelated)
        extra = [_target(o, _unrelated_reason(o)) for o in objs if o is not None]
        return tuple(sorted((*self.skipped, *extra), key=lambda t: t.key))

    @property
    def consumers(self) -> tuple[Target, ...]:
        return tuple(t for t in self.targets if t.phase == PHASE_CONSUMER)

    def as_dict(self, store: ObjectStore | None = None) -> dict[str, Any]:
        """With `store`: every skipped object with its reason (what `plan` prints); without:
        the related ones and a count of the unrelated ones (what the /hook reply carries)."""
        out: dict[str, Any] = {
            "receiver": self.receiver,
            "targets": [t.as_dict() for t in self.targets],
            "tracked": [t.as_dict() for t in self.tracked],
        }
        if self.note:
            out["note"] = self.note
        if self.annotate_only:
            out["annotate_only"] = [t.as_dict() for t in self.annotate_only]
        if store is not None:
            out["skipped"] = [t.as_dict() for t in self.all_skipped(store)]
        else:
            out["skipped"] = [t.as_dict() for t in self.skipped]
            out["skipped_unrelated"] = self._unrelated_count()
        return out


# -- 1. refs -------------------------------------------------------------------------------


def ref_match(spec_ref: Any, push: Push, revision: str = "") -> tuple[bool, str]:
    """Would a GitRepository with this `spec.ref` take the pushed ref? With the reason.

    Flux's effective precedence is commit > name > tag > semver > branch, and no ref at all
    means branch `master` (not the remote's default branch). `revision` is the source's
    `status.artifact.revision`: a semver source takes a tag only above what it checks out.
    """
    ref = spec_ref if isinstance(spec_ref, dict) else {}

    def field_(name: str) -> str:
        value = ref.get(name)
        return value.strip() if isinstance(value, str) else ""

    if field_("commit"):
        return False, "pinned to a commit"
    if name := field_("name"):
        return (name == push.ref), f"ref name {name}"
    if tag := field_("tag"):
        return (push.tag == tag), f"tag {tag}"
    if constraint := field_("semver"):
        if push.tag is None:  # semver follows tags only
            return False, f"semver {constraint}"
        try:
            return tag_taken(push.tag, constraint, artifact_tag(revision))
        except ConstraintError:
            return False, f"invalid semver constraint {constraint!r}"
    branch = field_("branch") or "master"
    return (push.branch == branch), f"branch {branch}"


# -- 3. paths ------------------------------------------------------------------------------


def _under(path: str, directory: str) -> bool:
    return directory == "" or path == directory or path.startswith(directory + "/")


def ancestors(paths: Iterable[str]) -> frozenset[str]:
    """Every directory that holds a changed file, and the files themselves, plus the root ''.

    A consumer path is touched exactly when it is in this set, so each consumer costs a few
    set lookups however many files the push changed.
    """
    found = {""}
    for path in paths:
        # Walk up until a directory we already have: siblings share their parents.
        while path and path not in found:
            found.add(path)
            cut = path.rfind("/")
            path = path[:cut] if cut > 0 else ""
    return frozenset(found)


def _outside(paths: Iterable[str], known: frozenset[str]) -> str | None:
    """The first changed file that lies under none of the known paths (a shared base?)."""
    if "" in known:
        return None
    verdicts: dict[str, bool] = {}  # directory -> lies under a known path
    for path in sorted(paths):
        walked: list[str] = []
        inside = False
        current = path
        while current:
            if current in verdicts:
                inside = verdicts[current]
                break
            walked.append(current)
            if current in known:
                inside = True
                break
            cut = current.rfind("/")
            current = current[:cut] if cut > 0 else ""
        for seen in walked:
            verdicts[seen] = inside
        if not inside:
            return path
    return None


def consumer_touch(
    consumer: FluxObject, push: Push, touched_dirs: frozenset[str], orphan: str | None,
    via_include: bool,
) -> str | None:
    """Why the push touches this consumer of a matched source, or None if it does not."""
    if via_include:
        return "its source includes the pushed repository"
    if not push.paths_complete:
        return "file list incomplete: every consumer of the source counts as touched"
    if consumer.kind == "HelmRelease":
        chart_spec = (consumer.spec.get("chart") or {}).get("spec") or {}
        if isinstance(chart_spec, dict) and chart_spec.get("reconcileStrategy") == "Revision":
            return "chart reconcileStrategy Revision: every commit is a new chart version"
    hit = [d for d in consumer_paths(consumer) if d in touched_dirs]
    if hit:
        files = sorted(p for p in push.paths if any(_under(p, d) for d in hit))
        return f"changed files under its path: {', '.join(files[:3])}" + (
            f" (+{len(files) - 3} more)" if len(files) > 3 else ""
        )
    if orphan is not None:
        return f"changed file outside every known path of the source: {orphan}"
    return None


# -- the plan ------------------------------------------------------------------------------


def _sorted_sources(objs: Iterable[FluxObject]) -> list[FluxObject]:
    return sorted(objs, key=lambda o: o.key)


def by_name(full_name: str, store: ObjectStore,
            prefixes: frozenset[str]) -> list[tuple[FluxObject, str]]:
    """GitRepositories an `owner/name` push names: their URL is `owner/name` on a configured
    Gitea host (or alias), so a mirrored pair is matched on both instances. Without any
    configured host every GitRepository whose URL ends in `owner/name` is."""
    name = full_name.lower()
    found = []
    for src, url in store.sources_for_name(name):
        if not prefixes or url.removesuffix("/" + name) in prefixes:
            found.append((src, url))
    return found


NO_DETAILS_NOTE = "no push details"


def _annotate_only(resolved: Resolved, note: str) -> tuple[Target, ...]:
    return tuple(
        Target(api_version, key.kind, key.namespace, key.name,
               f"listed in the receiver ({note})" if note else
               f"{key.kind} is not routed by repository, ref or path: annotated on every "
               "request, as Flux does")
        for api_version, key in resolved.annotate_only)


def plan_without_push(receiver: FluxObject, resolved: Resolved, store: ObjectStore,
                      note: str = NO_DETAILS_NOTE) -> Plan:
    """No push details (a bare call, a body that is no push): reconcile the listed resources,
    sources first, as Flux does; `note` says why, in the plan and in every target's reason."""
    targets: list[Target] = []
    skipped: list[Target] = [
        Target(i.api_version, i.kind, i.namespace, i.name, i.reason) for i in resolved.issues
    ]
    ordered = sorted(resolved.objects(store), key=lambda o: (o.kind not in SOURCE_KINDS, o.key))
    for obj in ordered:
        if obj.suspended:
            skipped.append(_target(obj, "suspended"))
        else:
            targets.append(_target(obj, f"listed in the receiver ({note})"))
    tracked = tuple(t for t in targets if t.kind in CONSUMER_KINDS)
    return Plan(f"{receiver.namespace}/{receiver.name}", tuple(targets), tracked, tuple(skipped),
                note=note, annotate_only=_annotate_only(resolved, note))


def plan_push(
    receiver: FluxObject,
    push: Push | None,
    store: ObjectStore,
    *,
    allow_cross_namespace: bool = True,
    resolved: Resolved | None = None,
    note: str = NO_DETAILS_NOTE,
    gitea_prefixes: frozenset[str] = frozenset(),
) -> Plan:
    """`resolved`: the Receiver's resources already resolved against this store (a cache);
    `note`: why there is no push, when `push` is None; `gitea_prefixes`: where the configured
    Gitea instances keep repositories (`giturls.gitea_prefixes`), for an `owner/name` push."""
    if resolved is None:
        resolved = resolve_resources(receiver, store, allow_cross_namespace=allow_cross_namespace)
    if push is None:
        return plan_without_push(receiver, resolved, store, note)
    listed = resolved.keys
    skipped: dict[ObjectKey, Target] = {}
    # Entries of spec.resources that could not be used are always reported.
    issues = {
        t.key: t
        for t in (Target(i.api_version, i.kind, i.namespace, i.name, i.reason)
                  for i in resolved.issues)
    }

    # 1. sources fed by the pushed repository and ref
    candidates: dict[ObjectKey, FluxObject] = {}
    repository = "repository"
    for url in push.repo_urls:
        normalised = store.normalise_url(url)
        if normalised:
            for src in store.sources_for_url(normalised):
                candidates[src.key] = src
    at: dict[ObjectKey, str] = {}
    if not push.repo_urls and push.full_name:
        repository = f"repository {push.full_name}"
        for src, url in by_name(push.full_name, store, gitea_prefixes):
            candidates[src.key] = src
            at[src.key] = f" (at {url})"
    matched: dict[ObjectKey, tuple[FluxObject, str]] = {}
    for src in _sorted_sources(candidates.values()):
        if push.deleted:
            skipped[src.key] = _target(src, "the push deletes the ref")
            continue
        artifact = src.status.get("artifact")
        revision = artifact.get("revision") if isinstance(artifact, dict) else None
        ok, why = ref_match(src.spec.get("ref"), push,
                            revision if isinstance(revision, str) else "")
        if not ok:
            skipped[src.key] = _target(src, f"{why} does not take {push.ref}")
        elif src.suspended:
            skipped[src.key] = _target(src, "suspended")
        else:
            matched[src.key] = (src, f"{repository}{at.get(src.key, '')} and {why} match the push")

    # 2. sources that include a matched one, transitively, after it
    included_by_push: set[ObjectKey] = set()
    frontier = list(matched)
    while frontier:
        inner = frontier.pop(0)
        for outer in store.includers_of(inner):
            if outer.key in matched or outer.suspended:
                continue
            matched[outer.key] = (outer, f"includes {inner.kind}/{inner.namespace}/{inner.name}")
            included_by_push.add(outer.key)
            frontier.append(outer.key)

    # 3. consumers of matched sources that the changed files touch
    touched: dict[ObjectKey, Target] = {}
    followable_keys: dict[ObjectKey, bool] = {}
    touched_dirs = ancestors(push.paths)
    for src_key, (_src, _) in matched.items():
        consumers = store.consumers_of(src_key)
        known = frozenset(p for c in consumers for p in consumer_paths(c))
        orphan = _outside(push.paths, known) if push.paths_complete else None
        for consumer in consumers:
            if consumer.key in touched:
                continue
            why_touch = consumer_touch(
                consumer, push, touched_dirs, orphan, src_key in included_by_push)
            if why_touch is None:
                skipped.setdefault(
                    consumer.key, _target(consumer, "no changed file under its paths")
                )
            elif consumer.suspended:
                skipped[consumer.key] = _target(consumer, "suspended")
            else:
                touched[consumer.key] = _target(consumer, why_touch)
                followable_keys[consumer.key] = followable(consumer)
                skipped.pop(consumer.key, None)

    # 4. annotate only what the Receiver lists; track every touched consumer
    targets = [
        _target(src, why) for key, (src, why) in matched.items() if key in listed
    ] + [t for key, t in sorted(touched.items()) if key in listed]
    related = frozenset((*matched, *touched, *skipped))
    return Plan(
        receiver=f"{receiver.namespace}/{receiver.name}",
        targets=tuple(targets),
        # Followed are the touched consumers whose readiness at the commit can be told.
        tracked=tuple(t for key, t in sorted(touched.items()) if followable_keys.get(key, True)),
        skipped=tuple(t for _, t in sorted({**skipped, **issues}.items())),
        listed=resolved.keys,
        related=related,
        annotate_only=_annotate_only(resolved, ""),
    )
