"""Pull-request previews: which live objects are one, what state each is in, and which commit
statuses they imply (on the pull request's head commit). Pure.

A preview is what a flux-operator ResourceSet renders per pull request: a GitRepository at
`ref.commit: <head sha>` and the Kustomization or HelmRelease deploying it, annotated with
Flux's event metadata: `event.toolkit.fluxcd.io/change_request` (the pull request number),
`event.toolkit.fluxcd.io/commit` (the head commit it should run) and extra keys such as
`event.toolkit.fluxcd.io/preview-url`. notification-controller forwards those annotations as
event metadata without the prefix (`change_request`, `commit`, `preview-url`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from receiver.flux.objects import CONSUMER_KINDS, FluxObject
from receiver.flux.revisions import applied_revision, commit_of
from receiver.gitea.ref_payloads import PullRequestEvent
from receiver.status.decisions import DesiredStatus, build_status, desired_from_object
from receiver.status.descriptions import (
    ERROR,
    FAILURE,
    PENDING,
    SUCCESS,
    describe,
    gitea_state,
    truncate,
)
from receiver.status.flux_events import EVENT_PREFIX
from receiver.status.repos import Normaliser, RepoRef, repo_of
from receiver.templates import StatusTemplates

CHANGE_REQUEST = EVENT_PREFIX + "change_request"
COMMIT = EVENT_PREFIX + "commit"
PREVIEW_URL = EVENT_PREFIX + "preview-url"
# The kinds a preview is made of; a source is listed too (a commit it cannot fetch is the
# first thing a reviewer needs to see).
PREVIEW_KINDS = ("GitRepository", "Kustomization", "HelmRelease")
WAITING = "Waiting for Flux to deploy this commit"
MAX_NUMBER_DIGITS = 18  # Gitea's issue index is an int64
MAX_URL = 2048
DETAIL_LIMIT = 300


@dataclass(frozen=True, slots=True, order=True)
class PullKey:
    """One pull request of one repository (the repository's normalised key)."""

    repo_key: str
    owner: str
    repo: str
    number: int


@dataclass(frozen=True, slots=True)
class PreviewItem:
    """One preview object as the comment shows it."""

    kind: str
    namespace: str
    name: str
    state: str  # a Gitea status state: pending, success, failure, error
    detail: str
    commit: str | None  # the commit it should run (the annotation), else the one it runs
    preview_url: str = ""
    context: str = ""  # its commit status context; "" for a source (sources get none)

    @property
    def sort_key(self) -> tuple[int, str, str]:
        return (PREVIEW_KINDS.index(self.kind) if self.kind in PREVIEW_KINDS else 99,
                self.namespace, self.name)


def change_request(obj: FluxObject) -> int | None:
    """The pull request number an object is a preview for, if it names a valid one."""
    return parse_number(obj.annotations.get(CHANGE_REQUEST, ""))


def parse_number(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 < value < 10 ** MAX_NUMBER_DIGITS else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > MAX_NUMBER_DIGITS:
        return None
    number = int(text)
    return number if number > 0 else None


def preview_url(value: str) -> str:
    """An http(s) URL fit to link to, else "" (no other scheme, no spaces or markup)."""
    url = value.strip()
    if len(url) > MAX_URL or not url.lower().startswith(("https://", "http://")):
        return ""
    if any(c.isspace() or c in '<>"()[]`\\' or not c.isprintable() for c in url):
        return ""
    return url


def pull_of(obj: FluxObject, source: FluxObject | None, normalise: Normaliser) -> PullKey | None:
    """The pull request a preview object belongs to; None when it is not a preview or its
    repository cannot be told."""
    if obj.kind not in PREVIEW_KINDS:
        return None
    number = change_request(obj)
    if number is None:
        return None
    repo = repo_of(obj, source, normalise)
    if repo is None:
        return None
    return pull_key(repo, number)


def pull_key(repo: RepoRef, number: int) -> PullKey:
    return PullKey(repo.key, repo.owner, repo.name, number)


def _ready(obj: FluxObject) -> tuple[str, str, str]:
    cond = obj.condition("Ready") or {}
    return (str(cond.get("status", "")), str(cond.get("reason", "")),
            str(cond.get("message", "")))


def _detail(reason: str, message: str) -> str:
    return truncate(describe(reason, message) if reason else message, DETAIL_LIMIT)


def _source_item(obj: FluxObject, wanted: str | None) -> tuple[str, str, str | None]:
    fetched = commit_of(applied_revision(obj))
    ready, reason, message = _ready(obj)
    if ready == "False":
        return gitea_state(reason, "error") or ERROR, _detail(reason, message), wanted or fetched
    if ready == "True" and (wanted is None or fetched == wanted):
        return SUCCESS, "Fetched", fetched
    return PENDING, "Fetching the commit", wanted or fetched


def preview_item(obj: FluxObject, source: FluxObject | None, templates: StatusTemplates,
                 normalise: Normaliser) -> PreviewItem:
    """A preview object's state at the commit it should run.

    Its live state counts only when it is about that commit (the `commit` annotation, when
    set): a consumer still running the previous head is `pending` on the new one, unless its
    source already failed to fetch it (the source's reason is then the consumer's).
    """
    wanted = commit_of(obj.annotations.get(COMMIT, ""))
    url = preview_url(obj.annotations.get(PREVIEW_URL, ""))
    if obj.kind not in CONSUMER_KINDS:
        state, detail, commit = _source_item(obj, wanted)
        return PreviewItem(obj.kind, obj.namespace, obj.name, state, detail, commit, url)
    desired = desired_from_object(obj, source, templates, normalise)
    context = desired.context if desired is not None else _context(obj, source, templates,
                                                                    normalise)
    if obj.suspended:
        return PreviewItem(obj.kind, obj.namespace, obj.name, PENDING, "Suspended",
                           wanted, url, context)
    if desired is not None and (wanted is None or desired.sha == wanted):
        return PreviewItem(obj.kind, obj.namespace, obj.name, desired.state,
                           _consumer_detail(obj, desired), desired.sha, url, context)
    if source is not None and source.kind == "GitRepository":
        state, detail, _ = _source_item(source, wanted)
        if state in (FAILURE, ERROR):
            return PreviewItem(obj.kind, obj.namespace, obj.name, state,
                               f"Source {source.namespace}/{source.name}: {detail}", wanted,
                               url, context)
    ready, reason, message = _ready(obj)
    if wanted is None and ready == "False" and reason:
        # No commit named and no status implied (a failure before any attempt): still say it.
        return PreviewItem(obj.kind, obj.namespace, obj.name,
                           gitea_state(reason, "error") or FAILURE, _detail(reason, message),
                           None, url, context)
    return PreviewItem(obj.kind, obj.namespace, obj.name, PENDING, WAITING, wanted, url,
                       context)


def _consumer_detail(obj: FluxObject, desired: DesiredStatus) -> str:
    """The status description, or the longer Ready message when it failed."""
    if desired.state in (FAILURE, ERROR):
        _, reason, message = _ready(obj)
        if reason:
            return _detail(reason, message)
    return desired.description


def _context(obj: FluxObject, source: FluxObject | None, templates: StatusTemplates,
             normalise: Normaliser) -> str:
    repo = repo_of(obj, source, normalise)
    if repo is None:
        return ""
    return build_status(templates, obj.kind, obj.namespace, obj.name, repo, "", PENDING,
                        "").context


def preview_status(obj: FluxObject, source: FluxObject | None, templates: StatusTemplates,
                   normalise: Normaliser) -> DesiredStatus | None:
    """The commit status a preview consumer implies on the commit its `commit` annotation
    names, when its live state alone implies none there (still running the previous head,
    or its source failing to fetch the new one). None for everything else: the live-state
    status (`desired_from_object`) already says it."""
    if obj.kind not in CONSUMER_KINDS or obj.suspended or change_request(obj) is None:
        return None
    wanted = commit_of(obj.annotations.get(COMMIT, ""))
    if wanted is None:
        return None
    desired = desired_from_object(obj, source, templates, normalise)
    if desired is not None and desired.sha == wanted:
        return None
    repo = repo_of(obj, source, normalise)
    if repo is None:
        return None
    item = preview_item(obj, source, templates, normalise)
    return build_status(templates, obj.kind, obj.namespace, obj.name, repo, wanted, item.state,
                        truncate(item.detail))


# -- pull_request webhooks -------------------------------------------------------------------

# Actions after which the head commit's previews will be (re)deployed.
HEAD_ACTIONS = frozenset({"opened", "reopened", "synchronized"})


def pending_for_pull_request(
    event: PullRequestEvent, objects: Iterable[tuple[FluxObject, FluxObject | None]],
    templates: StatusTemplates, normalise: Normaliser,
) -> list[DesiredStatus]:
    """`pending` on the new head commit for each preview consumer of that pull request, at
    once: its objects will redeploy it (a status already there is left to Gitea's view)."""
    if event.action not in HEAD_ACTIONS:
        return []
    keys = {normalise(url) for url in event.repo_urls} - {None}
    out: list[DesiredStatus] = []
    for obj, source in objects:
        if obj.kind not in CONSUMER_KINDS or obj.suspended:
            continue
        pull = pull_of(obj, source, normalise)
        if pull is None or pull.number != event.number or pull.repo_key not in keys:
            continue
        repo = repo_of(obj, source, normalise)
        if repo is None:
            continue
        out.append(build_status(templates, obj.kind, obj.namespace, obj.name, repo,
                                event.head_sha, PENDING, WAITING))
    return out
