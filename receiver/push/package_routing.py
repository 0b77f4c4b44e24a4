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
   consumers. With no ImagePolicy referencing it nothing reads the scan, so it is skipped;
4. which HelmRepositories and HelmCharts would fetch it as a chart: a `container` push feeds a
   HelmRepository of `spec.type: oci` whose `spec.url` + `/` + a HelmChart's `spec.chart` is
   `oci://<host>/<owner>/<name>` (aliases apply), a `helm` push (Gitea's HTTP Helm repository)
   one of another type at `<instance>/api/packages/<owner>/helm` whose HelmChart's `spec.chart`
   is `<name>`; the HelmChart's `spec.version` range (default `*`, `_` read as `+`) takes the
   version, not below the chart version it holds. A HelmRepository with no such HelmChart is
   skipped (nothing would fetch the chart); the HelmReleases installing from those HelmCharts
   (`objects.helm_chart_of`) are their consumers, after them, as `flux reconcile
   --with-source` orders them. The image and Helm kinds are cached only when their CRD is
   installed and RBAC lets the bridge list them (`objects.OPTIONAL_KINDS`): one that is not in
   the cache is not annotated for a package;
5. a `deleted` event, or a package type no Flux source reads, reconciles nothing, and says so.
The Receiver's `resources` bound what is annotated; touched consumers are tracked, as for Git
(ImagePolicies are annotated when listed, not tracked: no commit status follows them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from receiver.flux.objects import INPUT_PROVIDER_KIND, FluxObject, ObjectKey
from receiver.flux.revisions import followable
from receiver.flux.store import ObjectStore
from receiver.gitea.package_payloads import PackagePush
from receiver.gitea.ref_payloads import ref_event_of
from receiver.giturls import registry_host
from receiver.push import input_providers
from receiver.push.goregexp import go_pattern
from receiver.push.image_policy import excluded_by, latest_tag, policy_takes
from receiver.push.resources import Resolved, resolve_resources
from receiver.push.routing import Plan, Target, _target, plan_push
from receiver.push.selector import Selection
from receiver.push.semver import ConstraintError, artifact_tag, tag_taken

# Package types whose versions a Flux source can pull.
OCI_TYPES = frozenset({"container"})  # images, Flux artifacts and Helm charts over OCI alike
HELM_TYPES = frozenset({"container", "helm"})
# The package types each cached kind a Receiver names by name may be fed by
# (`objects.OPTIONAL_KINDS`); any other listed kind is annotated on every request, as Flux does.
HELM_KINDS = frozenset({"HelmRepository", "HelmChart"})
PACKAGE_FED_KINDS: dict[str, frozenset[str]] = {
    "ImageRepository": OCI_TYPES,
    "ImagePolicy": OCI_TYPES,
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
            # A Go regexp, evaluated by RE2 as Flux's (a version is the pusher's choice).
            compiled = go_pattern(pattern)
            if compiled.compiled is None:
                return False, f"invalid semverFilter {pattern!r}"
            if compiled.search(version) is None:
                return False, f"semver {constraint} with semverFilter {pattern}"
        try:
            return tag_taken(_semver_text(version), constraint,
                             _semver_text(artifact_tag(revision)))
        except ConstraintError:
            return False, f"invalid semver constraint {constraint!r}"
    tag = _str(ref.get("tag")) or "latest"
    # Tags are case-insensitive in Gitea's registry, which lower-cases them.
    return version == tag.lower(), f"tag {tag}"


def chart_version_match(version_range: str, version: str, current: str = "") -> tuple[bool, str]:
    """Would a HelmChart with this `spec.version` range (default `*`) holding chart version
    `current` ("" if unknown) take the pushed chart version? With the reason.

    source-controller fetches the highest version in range, so, as for a semver source, a
    version below the one it holds is not taken.
    """
    constraint = version_range.strip() or "*"
    try:
        taken, why = tag_taken(_semver_text(version), constraint, _semver_text(current))
    except ConstraintError:
        return False, f"invalid chart version {constraint!r}"
    # `tag_taken` words it for a semver source: "semver <range>[ (...)]".
    return taken, "chart version " + why.removeprefix("semver ")


def _revision(obj: FluxObject) -> str:
    artifact = obj.status.get("artifact")
    revision = artifact.get("revision") if isinstance(artifact, dict) else None
    return revision if isinstance(revision, str) else ""


def _chart_held(chart: FluxObject) -> str:
    """The chart version a HelmChart holds: its `status.artifact.revision`, without a digest."""
    return _revision(chart).partition("@")[0]


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
    helm = _route_helm(store, package, host)
    skipped.update(helm.skipped)

    touched: dict[ObjectKey, Target] = {}
    for src_key, (src, _) in matched.items():
        for consumer in store.consumers_of(src_key):
            if consumer.suspended:
                skipped[consumer.key] = _target(consumer, "suspended")
            else:
                touched[consumer.key] = _target(
                    consumer, f"its source {src.kind}/{src.namespace}/{src.name} takes "
                    f"{package.version}")
    touched.update(helm.consumers)

    annotate_only: list[Target] = []
    routed = {**helm.sources, **images.targets}
    listed_routed: list[Target] = []
    for target in blind:
        types = PACKAGE_FED_KINDS.get(target.kind)
        if types is None:
            annotate_only.append(Target(
                target.api_version, target.kind, target.namespace, target.name,
                f"{target.kind} is not routed by registry or version: annotated on every "
                "request, as Flux does"))
        elif package.type not in types:
            skipped[target.key] = Target(
                target.api_version, target.kind, target.namespace, target.name,
                f"a {target.kind} does not read {package.type} packages")
        elif target.key in routed:
            listed_routed.append(routed[target.key])
        elif target.key not in skipped:
            skipped[target.key] = Target(target.api_version, target.kind, target.namespace,
                                         target.name, _unrelated_cached(store, target, package, url))

    targets = [_target(src, why) for k, (src, why) in matched.items() if k in listed]
    # Sources before what reads them (`--with-source`): HelmRepositories, HelmCharts, then
    # ImageRepositories before their ImagePolicies.
    targets += sorted(listed_routed, key=lambda t: (_ROUTED_ORDER[t.kind], t.key))
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


_ROUTED_ORDER = {"HelmRepository": 0, "HelmChart": 1, "ImageRepository": 2, "ImagePolicy": 3}


@dataclass(frozen=True, slots=True)
class _HelmRoutes:
    """HelmRepositories and HelmCharts that would fetch the pushed chart (sources), the
    HelmReleases installing from those HelmCharts (consumers), and the related ones that do
    not (skipped), by key, with the reasons."""

    sources: dict[ObjectKey, Target]
    consumers: dict[ObjectKey, Target]
    skipped: dict[ObjectKey, Target]


def _helm_repositories(store: ObjectStore, package: PackagePush,
                       host: str) -> list[tuple[FluxObject, str, str]]:
    """HelmRepositories the pushed chart may be fetched through, each with its URL as routed
    and the `spec.chart` that names the package there."""
    if package.type not in OCI_TYPES:
        # Gitea's HTTP Helm repository serves every chart of an owner at one URL.
        url = _helm_http_url(package)
        key = store.normalise_url(url)
        return [(r, url, package.name) for r in store.helm_repositories_for_url(key)] if key \
            else []
    if not host:
        return []
    # `spec.url` + "/" + `spec.chart` is the pushed repository: a nested package name may be
    # split anywhere between the two, so each split is one index lookup.
    found: list[tuple[FluxObject, str, str]] = []
    segments = package.name.split("/")
    for cut in range(len(segments)):
        url = "/".join((f"oci://{host}", package.owner, *segments[:cut]))
        key = store.normalise_url(url)
        chart = "/".join(segments[cut:])
        found += [(r, url, chart) for r in store.helm_repositories_for_url(key)] if key else []
    return found


def _helm_http_url(package: PackagePush) -> str:
    """Gitea's HTTP Helm repository of the package's owner (`helm` packages)."""
    return f"{package.instance.rstrip('/')}/api/packages/{package.owner}/helm"


def _other_type(repo: FluxObject, package: PackagePush) -> str | None:
    """Why a HelmRepository cannot read this package type, or None: an `oci` one reads the
    container registry, one of another type (`default`) an HTTP Helm repository."""
    repo_type = _str(repo.spec.get("type")) or "default"
    if (repo_type == "oci") is (package.type in OCI_TYPES):
        return None
    return f"a HelmRepository of type {repo_type} does not read {package.type} packages"


def _route_helm(store: ObjectStore, package: PackagePush, host: str) -> _HelmRoutes:
    sources: dict[ObjectKey, Target] = {}
    consumers: dict[ObjectKey, Target] = {}
    skipped: dict[ObjectKey, Target] = {}
    version = package.version
    for repo, url, chart in _helm_repositories(store, package, host):
        if (other := _other_type(repo, package)) is not None:
            skipped[repo.key] = _target(repo, other)
            continue
        if version.startswith("sha256:"):
            skipped[repo.key] = _target(repo, "pushed by digest, which moves no tag")
            continue
        where = f"HelmRepository/{repo.namespace}/{repo.name}"
        charts = store.helm_charts_for(repo.key, chart)
        takers: dict[ObjectKey, Target] = {}
        for obj in charts:
            ok, why = chart_version_match(_str(obj.spec.get("version")), version,
                                          _chart_held(obj))
            if not ok:
                skipped[obj.key] = _target(obj, f"{why} does not take {version}")
                reader = f"{why} does not take {version} (its source {obj.key})"
            elif obj.suspended or repo.suspended:
                # A HelmChart fetches through its HelmRepository (the index of an HTTP one).
                skipped[obj.key] = _target(obj, "suspended" if obj.suspended else
                                           f"its {where} is suspended")
                reader = f"its source {obj.key} is suspended"
            else:
                takers[obj.key] = _target(obj, f"chart {chart} from {where}: {why} takes "
                                               f"{version}")
                continue
            # Its HelmReleases are related: say why they are not touched.
            for release in store.helm_releases_for(obj.key):
                skipped[release.key] = _target(release, reader)
        if repo.suspended:
            skipped[repo.key] = _target(repo, "suspended")
        elif takers:
            first = next(iter(takers))
            more = f" and {len(takers) - 1} more take" if len(takers) > 1 else " takes"
            sources[repo.key] = _target(repo, f"registry {url}: {first} (chart {chart}){more} "
                                              f"{version}")
        elif charts:
            skipped[repo.key] = _target(repo, f"registry {url}, but no HelmChart of chart "
                                              f"{chart} from it takes {version}")
        else:
            skipped[repo.key] = _target(repo, f"registry {url}, but no HelmChart reads chart "
                                              f"{chart} from it: nothing would fetch it")
        sources.update(takers)
        for chart_key in takers:
            for release in store.helm_releases_for(chart_key):
                if release.suspended:
                    skipped[release.key] = _target(release, "suspended")
                else:
                    consumers[release.key] = _target(release, f"its source {chart_key} takes "
                                                              f"{version}")
    return _HelmRoutes(sources, consumers, skipped)


def _unrelated_cached(store: ObjectStore, target: Target, package: PackagePush,
                      url: str) -> str:
    """Why a listed cached kind (`objects.OPTIONAL_KINDS`) the package does not feed is
    skipped."""
    obj = store.get(target.key)
    if obj is None:
        # The Helm kinds' CRDs come with source-controller: an older RBAC is what keeps them out.
        why = ("RBAC does not let the bridge list it" if target.kind in HELM_KINDS else
               "its CRD is not installed")
        return f"{target.kind} is not in the cache (not found, or {why}): not annotated for a " \
               "package"
    if target.kind == "ImageRepository":
        return f"its image is not {url.removeprefix('oci://')}"
    if target.kind == "HelmRepository":
        if (other := _other_type(obj, package)) is not None:
            return other
        if package.type in OCI_TYPES:
            return f"its URL and HelmCharts do not name {url}"
        return f"its URL is not {_helm_http_url(package)}"
    if target.kind == "HelmChart":
        return f"its chart {_str(obj.spec.get('chart')) or '(none)'} is not fed by the package"
    return "its ImageRepository is not fed by the package"


def _unrelated(obj: FluxObject, url: str) -> str:
    if obj.kind == "OCIRepository":
        return f"its URL is not {url}"
    if obj.kind == "GitRepository":
        return "a Git source: package events do not feed it"
    if obj.kind == INPUT_PROVIDER_KIND:
        return "an input provider lists Git branches, tags or pull requests, not packages"
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
    """The plan for what the selector read: a package event here, a pull request, create or
    delete event by `input_providers`, anything else by `routing.plan_push` (a push also
    reaches the branch and tag input providers). The service and `plan` both call this, so
    they agree."""
    if resolved is None:
        resolved = resolve_resources(receiver, store, allow_cross_namespace=allow_cross_namespace)
    if selection.package is not None:
        return plan_package(receiver, selection.package, store,
                            allow_cross_namespace=allow_cross_namespace, resolved=resolved)
    event = selection.pull_request or selection.ref_event
    if event is not None:
        return input_providers.plan_event(receiver, event, store, resolved=resolved,
                                          gitea_prefixes=gitea_prefixes)
    plan = plan_push(receiver, selection.push, store,
                     allow_cross_namespace=allow_cross_namespace, resolved=resolved,
                     note=selection.note, gitea_prefixes=gitea_prefixes)
    if selection.push is None:
        return plan
    return input_providers.with_ref_providers(plan, ref_event_of(selection.push), store,
                                              resolved, gitea_prefixes)
