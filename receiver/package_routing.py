"""Gitea `package` event + Receiver + cache -> the ordered objects to annotate, and why. Pure.

A package event names a registry host (the Gitea instance's), an owner, a package and a
version. The decisions, in the order a reader meets them:
1. which OCIRepositories the package feeds: `spec.url` is `oci://<host>/<owner>/<name>` (host
   aliases apply, see `giturls.normalise_oci_url`) and `spec.ref` would take the version, with
   source-controller's precedence `digest` > `semver` (+ `semverFilter`) > `tag` > `latest`;
2. their consumers (Kustomizations, HelmReleases by `chartRef`): an artifact is whole, so every
   consumer of a fed source is touched;
3. which ImageRepositories scan it: `spec.image` is `<host>/<owner>/<name>` (same key as an
   OCIRepository URL), the tag is not in its `spec.exclusionList`, and at least one ImagePolicy
   referencing it would take the tag (`image_policy.policy_takes`); those ImagePolicies are its
   consumers. With no ImagePolicy referencing it nothing reads the scan, so it is skipped. These
   two kinds are cached only when their CRD is installed (`objects.OPTIONAL_KINDS`);
4. kinds the bridge does not cache (HelmRepository, HelmChart: RBAC `patch` only) are annotated
   by name when listed, as Flux does, and their HelmReleases are touched when the chart name
   and version range take the pushed version;
5. a `deleted` event, or a package type no Flux source reads, reconciles nothing, and says so.
The Receiver's `resources` bound what is annotated; touched consumers are tracked, as for Git
(ImagePolicies are annotated when listed, not tracked: no commit status follows them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from receiver.flux.objects import OPTIONAL_KINDS, FluxObject, ObjectKey
from receiver.flux.revisions import followable
from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import PackagePush
from receiver.giturls import registry_host
from receiver.image_policy import excluded_by, latest_tag, policy_takes
from receiver.resources import Resolved, resolve_resources
from receiver.routing import Plan, Target, _target, plan_push
from receiver.selector import Selection
from receiver.semver import ConstraintError, artifact_tag, tag_selected, tag_taken

# Package types whose versions a Flux source can pull.
OCI_TYPES = frozenset({"container"})  # images, Flux artifacts and Helm charts over OCI alike
HELM_TYPES = frozenset({"container", "helm"})
# Listed kinds the bridge does not cache but a package of these types may feed.
PACKAGE_FED_KINDS: dict[str, frozenset[str]] = {
    "HelmRepository": HELM_TYPES,
    "HelmChart": HELM_TYPES,
}


def _str(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _semver_text(version: str) -> str:
    """Helm chart tags carry `_` where semver has `+` (OCI tags cannot hold `+`)."""
    return version.replace("_", "+")


def oci_ref_match(spec_ref: Any, version: str, revision: str = "") -> tuple[bool, str]:
    """Would an OCIRepository with this `spec.ref` take the pushed `version`? With the reason.

    source-controller's precedence: `digest` > `semver` (+ `semverFilter`) > `tag`, and no ref
    means tag `latest`. `revision` is `status.artifact.revision` (`<tag>@sha256:<hex>`): a
    semver source takes a version only when it is not below the tag it pulled last, as for a
    Git semver ref. A manifest pushed by digest moves no tag.
    """
    ref = spec_ref if isinstance(spec_ref, dict) else {}
    if digest := _str(ref.get("digest")):
        return False, f"pinned to digest {digest}"
    if version.startswith("sha256:"):
        return False, "pushed by digest, which moves no tag"
    if constraint := _str(ref.get("semver")):
        pattern = _str(ref.get("semverFilter"))
        if pattern:
            try:
                if re.search(pattern, version) is None:
                    return False, f"semver {constraint} with semverFilter {pattern}"
            except re.error:
                return False, f"invalid semverFilter {pattern!r}"
        try:
            return tag_taken(_semver_text(version), constraint,
                             _semver_text(artifact_tag(revision)))
        except ConstraintError:
            return False, f"invalid semver constraint {constraint!r}"
    tag = _str(ref.get("tag")) or "latest"
    # Tags are case-insensitive in Gitea's registry, which lower-cases them.
    return version == tag.lower(), f"tag {tag}"


def chart_version_match(version_range: str, version: str) -> tuple[bool, str]:
    """Would a chart `spec.version` range (default `*`) take the pushed chart version?"""
    constraint = version_range or "*"
    try:
        return tag_selected(_semver_text(version), constraint), f"chart version {constraint}"
    except ConstraintError:
        return False, f"invalid chart version {constraint!r}"


def _revision(obj: FluxObject) -> str:
    artifact = obj.status.get("artifact")
    revision = artifact.get("revision") if isinstance(artifact, dict) else None
    return revision if isinstance(revision, str) else ""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _helm_release_takes(release: FluxObject, source: ObjectKey,
                        package: PackagePush) -> tuple[bool, str]:
    """Does a HelmRelease reading an uncached HelmRepository / HelmChart take this chart?"""
    where = f"{source.kind}/{source.namespace}/{source.name}"
    if source.kind == "HelmChart":
        return True, (f"its chart comes from {where}, which is listed and not cached: "
                      "chart name and version range not checked")
    chart_spec = _dict(_dict(release.spec.get("chart")).get("spec"))
    chart = _str(chart_spec.get("chart"))
    if chart.lower() != package.name.lower():
        return False, f"its chart {chart or '(none)'} is not the package {package.name}"
    ok, why = chart_version_match(_str(chart_spec.get("version")), package.version)
    if not ok:
        return False, f"{why} does not take {package.version}"
    return True, f"chart {chart} from {where} (listed, not cached: URL not checked) and {why}"


def plan_package(
    receiver: FluxObject,
    package: PackagePush,
    store: ObjectStore,
    *,
    allow_cross_namespace: bool = True,
    resolved: Resolved | None = None,
) -> Plan:
    """The plan for a package event, in the shape of a Git push's (`routing.plan_push`)."""
    if resolved is None:
        resolved = resolve_resources(receiver, store, allow_cross_namespace=allow_cross_namespace)
    name = f"{receiver.namespace}/{receiver.name}"
    listed = resolved.keys
    issues = [Target(i.api_version, i.kind, i.namespace, i.name, i.reason)
              for i in resolved.issues]
    blind = [Target(api, key.kind, key.namespace, key.name, "") for api, key in
             resolved.annotate_only]

    def nothing(note: str) -> Plan:
        left = [_target(o, note) for o in resolved.objects(store)]
        left += [Target(t.api_version, t.kind, t.namespace, t.name, note) for t in blind]
        return Plan(name, (), (), tuple(sorted((*left, *issues), key=lambda t: t.key)),
                    note=note)

    if package.deleted:
        return nothing(f"{package.label} deleted: deleted versions are not reconciled")
    if package.type not in HELM_TYPES:
        return nothing(f"{package.label}: no Flux source reads {package.type} packages")

    skipped: dict[ObjectKey, Target] = {}
    matched: dict[ObjectKey, tuple[FluxObject, str]] = {}
    host = registry_host(package.instance) or ""
    url = f"oci://{host}/{package.owner}/{package.name}"
    key = store.normalise_url(url) if host and package.type in OCI_TYPES else None
    for src in store.oci_sources_for_url(key) if key else []:
        ok, why = oci_ref_match(src.spec.get("ref"), package.version, _revision(src))
        if not ok:
            skipped[src.key] = _target(src, f"{why} does not take {package.version}")
        elif src.suspended:
            skipped[src.key] = _target(src, "suspended")
        else:
            matched[src.key] = (src, f"registry {url} and {why} match the package")

    images = _route_images(store, key if package.type in OCI_TYPES else None,
                           url.removeprefix("oci://"), package.version)
    skipped.update(images.skipped)

    touched: dict[ObjectKey, Target] = {}
    for src_key, (src, _) in matched.items():
        for consumer in store.consumers_of(src_key):
            if consumer.suspended:
                skipped[consumer.key] = _target(consumer, "suspended")
            else:
                touched[consumer.key] = _target(
                    consumer, f"its source {src.kind}/{src.namespace}/{src.name} takes "
                    f"{package.version}")

    annotate_only: list[Target] = []
    listed_images: list[Target] = []
    for target in blind:
        if target.kind in OPTIONAL_KINDS:
            # Cached: routed by image and tag policy below, not annotated blindly.
            if package.type not in OCI_TYPES:
                skipped[target.key] = Target(
                    target.api_version, target.kind, target.namespace, target.name,
                    f"a {target.kind} does not read {package.type} packages")
            elif target.key in images.targets:
                listed_images.append(images.targets[target.key])
            elif target.key not in skipped:
                skipped[target.key] = Target(target.api_version, target.kind, target.namespace,
                                             target.name, _unrelated_image(store, target, url))
            continue
        types = PACKAGE_FED_KINDS.get(target.kind)
        if types is not None and package.type not in types:
            skipped[target.key] = Target(
                target.api_version, target.kind, target.namespace, target.name,
                f"a {target.kind} does not read {package.type} packages")
            continue
        reason = (f"{target.kind} is not cached: its URL and version selection are not "
                  "checked, annotated by name as Flux does" if types is not None else
                  f"{target.kind} is not routed by registry or version: annotated on every "
                  "request, as Flux does")
        annotate_only.append(Target(target.api_version, target.kind, target.namespace,
                                    target.name, reason))
        if target.kind not in ("HelmRepository", "HelmChart"):
            continue
        for release in store.consumers_of(target.key):
            if release.kind != "HelmRelease" or release.key in touched:
                continue
            ok, why = _helm_release_takes(release, target.key, package)
            if not ok:
                skipped.setdefault(release.key, _target(release, why))
            elif release.suspended:
                skipped[release.key] = _target(release, "suspended")
            else:
                touched[release.key] = _target(release, why)
                skipped.pop(release.key, None)

    targets = [_target(src, why) for k, (src, why) in matched.items() if k in listed]
    # ImageRepositories before their ImagePolicies, as sources before consumers.
    targets += sorted(listed_images, key=lambda t: (t.kind != "ImageRepository", t.key))
    targets += [t for k, t in sorted(touched.items()) if k in listed]
    related = matched.keys() | touched.keys() | skipped.keys()
    for obj in resolved.objects(store):
        if obj.key not in related:
            skipped[obj.key] = _target(obj, _unrelated(obj, url))
    return Plan(
        receiver=name,
        targets=tuple(targets),
        tracked=tuple(t for k, t in sorted(touched.items())
                      if (o := store.get(k)) is None or followable(o)),
        skipped=tuple(sorted((*skipped.values(), *issues), key=lambda t: t.key)),
        annotate_only=tuple(annotate_only),
    )


@dataclass(frozen=True, slots=True)
class _ImageRoutes:
    """ImageRepositories that scan the pushed tag and the ImagePolicies that take it (targets,
    by key), and the related ones that do not (skipped), with the reasons."""

    targets: dict[ObjectKey, Target]
    skipped: dict[ObjectKey, Target]


def _route_images(store: ObjectStore, key: str | None, image: str,
                  version: str) -> _ImageRoutes:
    targets: dict[ObjectKey, Target] = {}
    skipped: dict[ObjectKey, Target] = {}
    for repo in store.image_repositories_for_url(key) if key else []:
        if version.startswith("sha256:"):
            skipped[repo.key] = _target(repo, "pushed by digest, which moves no tag")
            continue
        if repo.suspended:
            skipped[repo.key] = _target(repo, "suspended")
            continue
        if (pattern := excluded_by(repo.spec.get("exclusionList"), version)) is not None:
            skipped[repo.key] = _target(repo, f"its exclusionList pattern {pattern!r} "
                                              f"drops {version} from the scan")
            continue
        where = f"ImageRepository/{repo.namespace}/{repo.name}"
        policies = store.image_policies_for(repo.key)
        takers: list[str] = []
        for policy in policies:
            taken, why = policy_takes(policy.spec, version, latest_tag(policy.raw))
            if not taken:
                skipped[policy.key] = _target(policy, f"does not take {version}: {why}")
            elif policy.suspended:
                skipped[policy.key] = _target(policy, "suspended")
            else:
                takers.append(f"ImagePolicy/{policy.namespace}/{policy.name} ({why})")
                targets[policy.key] = _target(policy, f"its {where} scans {version}, and it "
                                                      f"takes it: {why}")
        if takers:
            more = f" and {len(takers) - 1} more take" if len(takers) > 1 else " takes"
            targets[repo.key] = _target(repo, f"image {image}: {takers[0]}{more} {version}")
        elif policies:
            skipped[repo.key] = _target(repo, f"image {image}, but no ImagePolicy that "
                                              f"references it takes {version}")
        else:
            skipped[repo.key] = _target(repo, f"image {image}, but no ImagePolicy references "
                                              "it: nothing would read the scan")
    return _ImageRoutes(targets, skipped)


def _unrelated_image(store: ObjectStore, target: Target, url: str) -> str:
    """Why a listed ImageRepository / ImagePolicy the package does not feed is skipped."""
    if store.get(target.key) is None:
        return (f"{target.kind} is not in the cache (not found, or its CRD is not installed): "
                "not annotated for a package")
    if target.kind == "ImageRepository":
        return f"its image is not {url.removeprefix('oci://')}"
    return "its ImageRepository is not fed by the package"


def _unrelated(obj: FluxObject, url: str) -> str:
    if obj.kind == "OCIRepository":
        return f"its URL is not {url}"
    if obj.kind == "GitRepository":
        return "a Git source: package events do not feed it"
    return "its source is not fed by the package"


def plan_selection(
    receiver: FluxObject,
    selection: Selection,
    store: ObjectStore,
    *,
    allow_cross_namespace: bool = True,
    resolved: Resolved | None = None,
    gitea_prefixes: frozenset[str] = frozenset(),
) -> Plan:
    """The plan for what the selector read: a package event here, anything else by
    `routing.plan_push`. The service and `plan` both call this, so they agree."""
    if selection.package is not None:
        return plan_package(receiver, selection.package, store,
                            allow_cross_namespace=allow_cross_namespace, resolved=resolved)
    return plan_push(receiver, selection.push, store,
                     allow_cross_namespace=allow_cross_namespace, resolved=resolved,
                     note=selection.note, gitea_prefixes=gitea_prefixes)
