"""What a commit status says: the Gitea state for a Flux reason and severity (one table,
`STATE_TABLE`), and the description. Pure.

Descriptions are built so that the same outcome always reads the same: Flux repeats
`ReconciliationSucceeded` on every interval with a new duration in its message, and a status
derived from the live object (resync) must read like the one derived from the event, or every
resync would post again. Durations are masked when two statuses are compared."""

from __future__ import annotations

import re

PENDING, SUCCESS, FAILURE, ERROR, WARNING, SKIPPED = (
    "pending", "success", "failure", "error", "warning", "skipped")

# Flux reason -> (state for an info event, state for an error event). None: post nothing.
# Rows are grouped by why they map as they do; `gitea_state` applies the defaults below them.
STATE_TABLE: dict[str, tuple[str | None, str | None]] = {
    # Still working, or waiting on something else: the verdict on the commit is not in yet.
    "Progressing": (PENDING, PENDING),
    "ProgressingWithRetry": (PENDING, FAILURE),  # as an error: the last attempt failed
    "DependencyNotReady": (PENDING, PENDING),
    "SourceNotReady": (PENDING, PENDING),
    # The commit is deployed (Kustomization, HelmRelease) or fetched (GitRepository).
    "ReconciliationSucceeded": (SUCCESS, None),
    "Succeeded": (SUCCESS, None),
    "NewArtifact": (SUCCESS, None),
    "InstallSucceeded": (SUCCESS, None),
    "UpgradeSucceeded": (SUCCESS, None),
    "TestSucceeded": (SUCCESS, None),
    # The commit's content failed: build, apply, health, Helm release, or a remediation after
    # one (a rollback that succeeded still means this commit's release failed).
    "BuildFailed": (FAILURE, FAILURE),
    "ReconciliationFailed": (FAILURE, FAILURE),
    "HealthCheckFailed": (FAILURE, FAILURE),
    "PruneFailed": (FAILURE, FAILURE),
    "ValidationFailed": (FAILURE, FAILURE),
    "InstallFailed": (FAILURE, FAILURE),
    "UpgradeFailed": (FAILURE, FAILURE),
    "TestFailed": (FAILURE, FAILURE),
    "RollbackSucceeded": (FAILURE, FAILURE),
    "RollbackFailed": (FAILURE, FAILURE),
    "UninstallSucceeded": (FAILURE, FAILURE),
    "UninstallFailed": (FAILURE, FAILURE),
    "RetriesExceeded": (FAILURE, FAILURE),
    "MissingRollbackTarget": (FAILURE, FAILURE),
    # Not the commit's fault: the source, credentials, permissions or Flux's own configuration.
    # (ArtifactFailed also covers a missing path; Flux cannot tell us which, so: error.)
    "ArtifactFailed": (ERROR, ERROR),
    "AccessDenied": (ERROR, ERROR),
    "AuthenticationFailed": (ERROR, ERROR),
    "FetchFailed": (ERROR, ERROR),
    "GitOperationFailed": (ERROR, ERROR),
    "StorageOperationFailed": (ERROR, ERROR),
    "DirectoryCreationFailed": (ERROR, ERROR),
    "InvalidCELExpression": (ERROR, ERROR),
    "FeatureGateDisabled": (ERROR, ERROR),
    "ValuesError": (ERROR, ERROR),
    "InvalidChartReference": (ERROR, ERROR),
    "ChartPullFailed": (ERROR, ERROR),
    "StateError": (ERROR, ERROR),
    # A newer revision cancelled the health check: no verdict, and none will come for this
    # commit. Not success, not the commit's failure; `warning` ends the pending.
    "HealthCheckCanceled": (WARNING, WARNING),
}
# Defaults: an unknown error reason is a failure (as Flux's own gitea Provider does); an
# unknown info reason says nothing about the commit (drift notices, change sets of other
# kinds) and is not posted. Trace events never reach a Provider.
_DEFAULT = (None, FAILURE)

DESCRIPTION_LIMIT = 140
ELLIPSIS = "\u2026"
PUSH_DESCRIPTION = "Push received, waiting for Flux"

# Messages that repeat what the status already says and change on every run.
_VOLATILE_MESSAGES = (
    re.compile(r"^Reconciliation finished in \S+, next run in \S+$"),
    re.compile(r"^Applied revision: \S+$"),
    re.compile(r"^Reconciliation in progress(?: for revision \S+)?$"),
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
# Go time.Duration strings: 1.2s, 10m0s, 250ms, 1h2m3.5s.
_UNIT = r"\d+(?:\.\d+)?(?:h|ms|m|s|us|µs|ns)"
_DURATION = re.compile(rf"\b{_UNIT}(?:{_UNIT})*\b")

# -- state and text ------------------------------------------------------------------------


def gitea_state(reason: str, severity: str) -> str | None:
    """The Gitea state for a Flux reason and severity (`STATE_TABLE`); None: post nothing."""
    if severity not in ("info", "error"):
        return None
    info, error = STATE_TABLE.get(reason, _DEFAULT)
    return info if severity == "info" else error


def reason_words(reason: str) -> str:
    """`HealthCheckFailed` -> `Health check failed` (Flux's gitea Provider lower-cases it)."""
    words = _CAMEL.sub(" ", reason.strip()).lower()
    return words[:1].upper() + words[1:]


# What a description must never carry: C0 and C1 control characters (NUL makes Gitea on
# PostgreSQL refuse the status; ESC starts terminal sequences), the bidirectional controls
# (U+061C, U+200E/F, U+202A-E, U+2066-9: they reorder what a reader sees) and lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                     "\ud800-\udfff"
                     # Invisible: soft hyphen, zero-width and joiners, line and paragraph
                     # separators, invisible operators, byte order mark, interlinear
                     # annotation, Unicode tags (which can spell hidden text).
                     "\u00ad\u180e\u200b-\u200d\u2028\u2029\u2060-\u2064\u206a-\u206f"
                     "\ufeff\ufff9-\ufffb\U000e0000-\U000e007f]")


# A terminal escape sequence (ESC [ ... final byte) goes whole, not only its ESC.
_ANSI_CSI = re.compile("\x1b\\[[0-?]*[ -/]*[@-~]")


def _safe(text: str) -> str:
    return _UNSAFE.sub(" ", _ANSI_CSI.sub("", text))


def truncate(text: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """At most `limit` characters, controls replaced by spaces."""
    text = _safe(text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + ELLIPSIS


_BUILD_DIR = re.compile(r"/tmp/kustomization-\d+/")  # noqa: S108 - a pattern, not a path we use


def describe(reason: str, message: str) -> str:
    """A one-line description: reason in words, then the message unless it is noise."""
    words = " ".join(reason_words(_safe(reason)).split())
    # kustomize-controller builds in a fresh temp dir each run: drop it, or every repeat of
    # the same failure reads as a new description (and a new status post).
    text = " ".join(_BUILD_DIR.sub("", _safe(message)).split())
    if any(p.match(text) for p in _VOLATILE_MESSAGES):
        text = ""
    return truncate(f"{words}: {text}" if text and words else text or words)


def comparable(description: str) -> str:
    """A description with durations masked: `... after 5m0.3s` equals `... after 5m1.2s`."""
    return _DURATION.sub("<d>", description)
