"""Flux revision strings and "is this object done at commit S?". Pure.

Revisions: `main@sha1:<hex>`, `v1.2.0@sha1:<hex>`, `sha1:<hex>`, `refs/pull/1/head@sha1:<hex>`,
SHA-256 object names (`@sha256:<64 hex>`), and the legacy `main/<hex>` / bare `<hex>`. The hash
is what follows the last ':' or else the last '/' (fluxcd/pkg ExtractHashFromRevision).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from receiver.flux.objects import ARTIFACT_KINDS, INPUT_PROVIDER_KIND, FluxObject
from receiver.times import epoch_seconds

_HEX = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
HELM_REVISION_META = re.compile(r"\+([0-9a-f]{12})(?:\.\d+)?$")


def commit_of(revision: str) -> str | None:
    """The commit id a Git revision names, lower-case; None if it names none."""
    if not isinstance(revision, str):
        return None
    return _commit_of(revision)


# Each evaluation of a delivery asks this of the same few status revisions several times.
@functools.lru_cache(maxsize=4096)
def _commit_of(revision: str) -> str | None:
    if not revision.strip():
        return None
    text = revision.strip()
    if ":" in text:
        tail = text.rsplit(":", 1)[1]
    elif "/" in text:
        tail = text.rsplit("/", 1)[1]
    else:
        tail = text
    tail = tail.lower()
    return tail if _HEX.match(tail) else None


def same_commit(revision: str, sha: str) -> bool:
    found = commit_of(revision)
    return found is not None and found == sha.lower()


def _helm_commit_prefix(chart_version: str) -> str | None:
    """A HelmRelease from Git with reconcileStrategy Revision: `6.5.0+5394cb7f48ab[.3]`."""
    match = HELM_REVISION_META.search(chart_version or "")
    return match.group(1) if match else None


# Target states a delivery reports, in the order they normally occur.
QUEUED = "queued"
ANNOTATED = "annotated"
RECONCILING = "reconciling"
READY = "ready"
FAILED = "failed"
TIMED_OUT = "timed_out"
SKIPPED = "skipped"
FINAL_STATES = frozenset({READY, FAILED, TIMED_OUT, SKIPPED})

# Ready=False reasons that are terminal for this attempt (as each Flux controller reports them).
_FAILURE_REASONS = frozenset({
    "BuildFailed", "ReconciliationFailed", "HealthCheckFailed", "PruneFailed", "ArtifactFailed",
    "ValidationFailed", "InstallFailed", "UpgradeFailed", "TestFailed", "RollbackFailed",
    "UninstallFailed", "RetriesExceeded", "Remediated", "FetchFailed", "GitOperationFailed",
    "StorageOperationFailed", "InvalidChartReference", "AccessDenied", "InvalidPath",
})


# Stalled reasons that only say the controller gave up retrying (helm-controller, once a
# release's remediation retries are used up): the failure itself is in Ready, e.g.
# UpgradeFailed with Helm's error, and that is what a reader needs to see.
_GAVE_UP_REASONS = frozenset({"RetriesExceeded"})


@dataclass(frozen=True, slots=True)
class Progress:
    state: str  # RECONCILING, READY or FAILED (never the bookkeeping states)
    reason: str = ""
    message: str = ""


def _ready(obj: FluxObject) -> tuple[str, str, str]:
    cond = obj.condition("Ready") or {}
    return str(cond.get("status", "Unknown")), str(cond.get("reason", "")), str(cond.get("message", ""))


def _current_generation(obj: FluxObject) -> bool:
    observed = obj.status.get("observedGeneration")
    return not isinstance(observed, int) or observed >= obj.generation


def at_rest(obj: FluxObject) -> bool:
    """Ready at its current generation: the controller finished a reconcile and holds what it
    reports (not half-way through one, and not failing to fetch or apply)."""
    return _ready(obj)[0] == "True" and _current_generation(obj)


def applied_revision(obj: FluxObject) -> str:
    """The revision an object last applied (consumer) or fetched (source)."""
    if obj.kind in ARTIFACT_KINDS:
        artifact = obj.status.get("artifact")
        return str(artifact.get("revision", "")) if isinstance(artifact, dict) else ""
    if obj.kind == "HelmRelease":
        # HelmRelease v2 has no lastAppliedRevision: the latest release snapshot comes first.
        history = obj.status.get("history")
        if isinstance(history, list) and history and isinstance(history[0], dict):
            return str(history[0].get("chartVersion", ""))
        return ""
    return str(obj.status.get("lastAppliedRevision", ""))


def attempted_revision(obj: FluxObject) -> str:
    return str(obj.status.get("lastAttemptedRevision", "")) or applied_revision(obj)


def names_commit(obj: FluxObject, revision: str, sha: str) -> bool:
    """Does `revision`, one of this object's revisions, name commit `sha`? A HelmRelease's
    chart version carries an abbreviated commit (or its annotation names it)."""
    if obj.kind == "HelmRelease":
        prefix = _helm_commit_prefix(revision)
        if prefix is not None:
            return sha.lower().startswith(prefix)
        commit = obj.annotations.get("event.toolkit.fluxcd.io/commit", "")
        return bool(commit) and commit.lower() == sha.lower()
    return same_commit(revision, sha)


def followable(obj: FluxObject) -> bool:
    """Can we tell that this object is done at a given commit?

    A HelmRelease from Git names the commit only with reconcileStrategy Revision (the chart
    version carries it) or the `event.toolkit.fluxcd.io/commit` annotation; otherwise its
    status says a chart version, never which commit produced it. One with `chartRef` to an
    OCIRepository names the artifact, and the artifact names the commit.
    """
    if obj.kind == INPUT_PROVIDER_KIND:
        # It lists what Gitea has; its status names no commit. Followed only to "handled".
        return False
    if obj.kind != "HelmRelease":
        return True
    if obj.annotations.get("event.toolkit.fluxcd.io/commit"):
        return True
    chart_ref = obj.spec.get("chartRef")
    if isinstance(chart_ref, dict) and chart_ref.get("kind") == "OCIRepository":
        return True  # its chart version carries the artifact's digest (see `origin`)
    chart_spec = (obj.spec.get("chart") or {}).get("spec") or {}
    return isinstance(chart_spec, dict) and chart_spec.get("reconcileStrategy") == "Revision"


def progress_at(obj: FluxObject, sha: str, here: tuple[bool, bool] | None = None) -> Progress:
    """Where an object stands for commit `sha` (per kind, as each Flux controller reports it).

    `here`: whether it applied / attempted what is followed, when its revisions do not say
    (a consumer of an OCI source: see `delivery_state`).
    """
    status, reason, message = _ready(obj)
    if here is not None:
        applied_here, attempted_here = here
    else:
        applied_here = names_commit(obj, applied_revision(obj), sha)
        attempted_here = names_commit(obj, attempted_revision(obj), sha)
    if status == "True" and _current_generation(obj) and applied_here:
        return Progress(READY, reason, message)
    if status == "Unknown" and applied_here and attempted_here:
        # Reconciling again what it already applied (`flux reconcile`, its interval): the
        # commit is deployed all the same. A verdict of `ready` must not flicker back to
        # `in_progress` for the few seconds this takes; a failure of it still shows (below).
        return Progress(READY, reason or "Reconciling", message)
    stalled = obj.condition("Stalled") or {}
    if stalled.get("status") == "True" and attempted_here:
        if stalled.get("reason") in _GAVE_UP_REASONS and status == "False" and reason:
            return Progress(FAILED, reason, message)
        return Progress(FAILED, str(stalled.get("reason", reason)), str(stalled.get("message", "")))
    if status == "False" and attempted_here and reason in _FAILURE_REASONS:
        return Progress(FAILED, reason, message)
    return Progress(RECONCILING, reason, message)


def handled_since(obj: FluxObject, since: float) -> bool:
    """Has the controller handled a reconcile request made at or after `since` (unix)?"""
    handled = obj.status.get("lastHandledReconcileAt")
    stamp = epoch_seconds(handled)
    return stamp is not None and stamp >= since - 0.001
