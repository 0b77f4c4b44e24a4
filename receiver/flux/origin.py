"""Git to OCI: which Git repository and commit an OCI artifact was built from. Pure.

`flux push artifact --source=<git url> --revision=<ref>@sha1:<hex>` writes the manifest
annotations `org.opencontainers.image.source` and `org.opencontainers.image.revision`;
source-controller copies manifest annotations verbatim into the OCIRepository's
`status.artifact.metadata`; kustomize-controller records the revision annotation of the artifact
it applied as `status.lastAppliedOriginRevision` and sends it as event metadata
`originRevision`. helm-controller records no origin revision: a HelmRelease with `chartRef`
is tied to its source's artifact through the chart version (`<version>+<digest[:12]>`) or
`status.lastAttemptedRevisionDigest` instead.

The rule throughout: a commit is named only when it can be tied to the artifact it came from.
An origin revision must name a SHA-1 commit (40 hex): Gitea's status API takes nothing else,
and a 64-hex value here is far more often an OCI digest than a SHA-256 commit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime

from receiver.flux.objects import FluxObject
from receiver.flux.revisions import HELM_REVISION_META

SOURCE_ANNOTATION = "org.opencontainers.image.source"
REVISION_ANNOTATION = "org.opencontainers.image.revision"
OCI_SOURCE_KINDS = frozenset({"OCIRepository"})

_SHA1 = re.compile(r"[0-9a-f]{40}")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
PACKAGE_REF_SCHEME = "oci://"


def origin_commit(revision: object) -> str | None:
    """The SHA-1 commit an origin revision names, lower case; None for anything else.

    Accepted: `<ref>@sha1:<40 hex>` (what `flux push artifact` is told), `sha1:<40 hex>`, a bare
    40-hex id and the legacy `<ref>/<40 hex>`. Not: a SHA-256 name, an OCI digest, a short id.
    """
    if not isinstance(revision, str):
        return None
    text = revision.strip().lower()
    ref, at, tail = text.rpartition("@")
    if at:
        return tail[5:] if ref and tail.startswith("sha1:") and _SHA1.fullmatch(tail[5:]) else None
    if text.startswith("sha1:"):
        return text[5:] if _SHA1.fullmatch(text[5:]) else None
    ref, slash, tail = text.rpartition("/")
    if slash and not ref:
        return None
    return tail if _SHA1.fullmatch(tail) else None


def is_oci(source: FluxObject | None) -> bool:
    return source is not None and source.kind in OCI_SOURCE_KINDS


def _artifact(source: FluxObject) -> Mapping[str, object]:
    artifact = source.status.get("artifact")
    return artifact if isinstance(artifact, dict) else {}


def artifact_revision(source: FluxObject) -> str:
    revision = _artifact(source).get("revision")
    return revision if isinstance(revision, str) else ""


def artifact_metadata(source: FluxObject) -> Mapping[str, str]:
    """`status.artifact.metadata`: the manifest annotations, as source-controller copied them."""
    metadata = _artifact(source).get("metadata")
    if not isinstance(metadata, dict):
        return {}
    return {k: v for k, v in metadata.items() if isinstance(k, str) and isinstance(v, str)}


def source_url(source: FluxObject) -> str:
    """The Git URL the artifact says it was built from ("" when it says none)."""
    return artifact_metadata(source).get(SOURCE_ANNOTATION, "").strip()


def artifact_commit(source: FluxObject) -> str | None:
    """The commit the source's current artifact was built from, if it names one."""
    return origin_commit(artifact_metadata(source).get(REVISION_ANNOTATION))


def _digest(revision: str) -> str | None:
    """The hex of the manifest digest in `<tag>@sha256:<hex>` or `sha256:<hex>`."""
    match = _DIGEST.search(revision.strip().lower())
    return match.group(1) if match else None


def ties_to_artifact(revision: str, source: FluxObject) -> bool:
    """Does a consumer's revision name the source's current artifact?

    A Kustomization records the artifact revision itself. A HelmRelease records its chart
    version with the first 12 hex of the manifest digest as build metadata, or the digest in
    `lastAttemptedRevisionDigest` (helm-controller's `mutateChartWithSourceRevision`).
    """
    current = artifact_revision(source)
    if not revision or not current:
        return False
    if revision.strip() == current.strip():
        return True
    digest = _digest(current)
    if digest is None:
        return False
    if _digest(revision) == digest:
        return True
    meta = HELM_REVISION_META.search(revision)
    return meta is not None and digest.startswith(meta.group(1))


def _tied_commit(revision: str, source: FluxObject) -> str | None:
    return artifact_commit(source) if ties_to_artifact(revision, source) else None


def consumer_at_artifact(obj: FluxObject, source: FluxObject) -> tuple[bool, bool]:
    """Has a consumer applied / attempted the source's current artifact?"""
    status = obj.status
    if obj.kind == "HelmRelease":
        # No lastAppliedRevision in HelmRelease v2: the latest release snapshot comes first.
        history = status.get("history")
        latest = history[0] if isinstance(history, list) and history else {}
        chart = str(latest.get("chartVersion", "")) if isinstance(latest, dict) else ""
        attempted = any(ties_to_artifact(str(status.get(k, "")), source)
                        for k in ("lastAttemptedRevision", "lastAttemptedRevisionDigest"))
        return ties_to_artifact(chart, source), attempted
    return (ties_to_artifact(str(status.get("lastAppliedRevision", "")), source),
            ties_to_artifact(str(status.get("lastAttemptedRevision", "")), source))


def consumer_commits(obj: FluxObject, source: FluxObject) -> tuple[str | None, str | None]:
    """(applied, attempted) commits of a consumer of an OCI source, as far as they are known.

    Kustomization: `lastAppliedOriginRevision`, and `lastAttemptedOriginRevision` if a later
    CRD adds it (kustomize-controller v1.9 has none). Otherwise, and for a HelmRelease (which
    records no origin revision), the commit the source's current artifact names, when that is
    the artifact the consumer applied / attempted (`consumer_at_artifact`).
    """
    commit = artifact_commit(source)
    applied_here, attempted_here = consumer_at_artifact(obj, source)
    applied = commit if applied_here else None
    attempted = commit if attempted_here else None
    if obj.kind == "HelmRelease":
        return applied, attempted
    status = obj.status
    applied = origin_commit(status.get("lastAppliedOriginRevision")) or applied
    attempted = origin_commit(status.get("lastAttemptedOriginRevision")) or attempted
    tried = str(status.get("lastAttemptedRevision", ""))
    if attempted is None and tried in ("", str(status.get("lastAppliedRevision", ""))):
        attempted = applied  # it last attempted what it applied
    return applied, attempted


def event_commit(metadata: Mapping[str, str], source: FluxObject) -> str | None:
    """The commit an event about a consumer of an OCI source is about.

    notification-controller's order: `commit` (the RFC-0008 annotation), then `originRevision`
    (kustomize-controller's, the artifact's revision annotation); else the source's metadata,
    but only if the event's `revision` is the source's current artifact (or, for a
    HelmRelease, its chart version carries that artifact's digest). `revision` itself is an
    OCI digest and names no commit.
    """
    for key in ("commit", "originRevision"):
        found = origin_commit(metadata.get(key))
        if found is not None:
            return found
    return _tied_commit(metadata.get("revision", ""), source)


# -- a package push and the artifact it produces ---------------------------------------------


def package_ref(registry: str, owner: str, name: str, version: str) -> str:
    """What a package delivery records as its `ref`: the OCI reference that was pushed."""
    sep = "@" if version.startswith("sha256:") else ":"
    return f"{PACKAGE_REF_SCHEME}{registry}/{owner}/{name}{sep}{version}"


def package_tag(ref: str) -> str | None:
    """The tag a package delivery's `ref` pushed; None for a Git ref or a push by digest."""
    if not ref.startswith(PACKAGE_REF_SCHEME):
        return None
    last = ref[len(PACKAGE_REF_SCHEME):].rsplit("/", 1)[-1]
    if "@" in last:
        return None
    _, colon, tag = last.partition(":")
    return tag if colon and tag else None


def _timestamp(value: object) -> float | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def has_pushed_artifact(source: FluxObject, tag: str, received: float,
                        handled_our_request: bool) -> bool:
    """Is the source's current artifact the one a push of `tag` at `received` produced?

    Its revision must be `<tag>@sha256:...`, and it must be new since the push: stored at or
    after it (`status.artifact.lastUpdateTime`, whole seconds), or fetched by a reconcile we
    requested after it. A tag alone is not enough: `latest` re-pushed names the old artifact
    until source-controller pulls the new one.
    """
    revision = artifact_revision(source)
    name, at, _ = revision.rpartition("@")
    if not at or name.lower() != tag.lower():
        return False
    if handled_our_request:
        return True
    stored = _timestamp(_artifact(source).get("lastUpdateTime"))
    return stored is not None and stored >= int(received)
