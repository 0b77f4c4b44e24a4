"""Package deliveries: a pushed tag, no commit. Their OCI sources are followed at the pushed
artifact, and consumers at the commit that artifact names (`flux.origin`), or at its revision
when it names none. Pure."""

from __future__ import annotations

from collections.abc import Callable

from receiver.delivery import marks as delivery_marks
from receiver.delivery.record import ROLE_ANNOTATE, DeliveryRecord
from receiver.delivery.view import TargetView, Timeouts
from receiver.flux.objects import FluxObject
from receiver.flux.origin import (
    artifact_commit,
    artifact_revision,
    consumer_at_artifact,
    consumer_commits,
    has_pushed_artifact,
    is_oci,
    package_tag,
)
from receiver.flux.revisions import (
    ANNOTATED,
    FAILED,
    QUEUED,
    READY,
    RECONCILING,
    TIMED_OUT,
    handled_since,
    progress_at,
)


def is_package_delivery(record: DeliveryRecord) -> bool:
    """A package push: its record names the pushed tag (`origin.package_ref`), no commit."""
    return not record.sha and package_tag(record.ref) is not None


def has_push(record: DeliveryRecord, source: FluxObject) -> bool:
    """Has an OCI source of a package delivery got the pushed artifact (`origin`)? Always
    True for other deliveries and sources: their commit is known, or nothing is awaited."""
    tag = package_tag(record.ref) if not record.sha else None
    if tag is None or not is_oci(source):
        return True
    ours = any(t.key == source.key and t.role == ROLE_ANNOTATE for t in record.targets)
    requested = (ours and delivery_marks.has(source.annotations, record.mark)
                 and handled_since(source, record.received))
    return has_pushed_artifact(source, tag, record.received, requested)


def package_commit(record: DeliveryRecord, source: FluxObject | None) -> str | None:
    """The commit a package delivery's consumers of `source` deploy: the one the pushed
    artifact names, once the source has it. None until then, or if it names none."""
    if source is None or not is_package_delivery(record) or not is_oci(source):
        return None
    return artifact_commit(source) if has_push(record, source) else None


def package_consumer(record: DeliveryRecord, obj: FluxObject, source: FluxObject, role: str,
                      view: Callable[..., TargetView], marked: bool, age: float,
                      timeouts: Timeouts) -> TargetView:
    """A consumer of an OCI source in a package delivery, followed at the pushed artifact:
    at the commit it names (`origin.consumer_commits`), or at its revision if it names none."""
    if has_push(record, source):
        sha = artifact_commit(source)
        if sha is not None:
            applied, attempted = consumer_commits(obj, source)
            here = (applied == sha, attempted == sha)
        else:
            here = consumer_at_artifact(obj, source)
        progress = progress_at(obj, sha or "", here)
        if progress.state in (READY, FAILED):
            return view(progress.state, progress.reason, progress.message)
    else:
        sha, here, progress = None, (False, False), None
    if age > timeouts.consumer_seconds:
        return view(TIMED_OUT, "Timeout", f"not ready after {timeouts.consumer_seconds:g}s")
    if role == ROLE_ANNOTATE and not marked and not here[1]:
        return view(QUEUED)  # annotated once the source has the artifact (`reconcile`)
    if progress is None:
        # Not there yet: a reconcile now would apply the previous artifact.
        return view(ANNOTATED if marked else RECONCILING)
    named = f"from commit {sha}" if sha else "which names no commit"
    return view(RECONCILING, progress.reason or "ArtifactPulled",
                progress.message or f"artifact {artifact_revision(source)} {named}")


