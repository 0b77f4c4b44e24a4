"""What a Gitea `pull_request`, `create` or `delete` event says (a pull request, or a branch or
tag made or removed), read as defensively as a push (`gitea.payloads`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from receiver.gitea.payloads import (
    MAX_FULL_NAME_BYTES,
    MAX_REF_BYTES,
    PayloadError,
    Push,
    as_object,
    as_text,
    checked,
    commit_sha,
    repository_urls,
    required_ref,
    required_sha,
)

MAX_LABELS = 256  # Gitea allows many labels per issue; routing only compares their names
MAX_LABEL_BYTES = 256


@dataclass(frozen=True, slots=True)
class PullRequestEvent:
    """A Gitea `pull_request` event (`X-Gitea-Event: pull_request`, PullRequestPayload),
    reduced to what a pull-request input provider exports and filters on."""

    action: str  # opened, reopened, synchronized, edited, label_updated, closed, ...
    number: int
    head_ref: str  # the head branch's name, as Gitea's pull request list gives it
    head_sha: str
    base_ref: str
    labels: tuple[str, ...]
    repo_urls: tuple[str, ...]  # the base repository's: the one a provider's spec.url names
    full_name: str
    merged: bool = False

    @property
    def label(self) -> str:
        return f"pull request #{self.number} ({self.action})"


@dataclass(frozen=True, slots=True)
class RefEvent:
    """A branch or tag created, moved or deleted: Gitea's `create` and `delete` events, or
    a push reduced to the same (`from_push`)."""

    event: str  # create | delete | push
    ref_type: str  # branch | tag
    name: str  # short name: main, v1.2.0
    sha: str  # "" for a deletion
    repo_urls: tuple[str, ...]
    full_name: str

    @property
    def deleted(self) -> bool:
        return self.event == "delete" or not self.sha

    @property
    def label(self) -> str:
        verb = {"create": "created", "delete": "deleted"}.get(self.event, "pushed")
        return f"{self.ref_type} {self.name} {'deleted' if self.deleted else verb}"



def _repository(doc: dict[str, Any]) -> tuple[tuple[str, ...], str]:
    repo = as_object(doc.get("repository"))
    urls = repository_urls(repo)
    full_name = checked(as_text(repo.get("full_name")), "repository.full_name", MAX_FULL_NAME_BYTES)
    return urls, full_name


def parse_gitea_pull_request(doc: Any) -> PullRequestEvent:
    """A Gitea `pull_request` webhook payload (JSON already decoded). PayloadError when a field
    routing needs is missing or garbled."""
    if not isinstance(doc, dict):
        raise PayloadError("payload must be a JSON object")
    action = checked(as_text(doc.get("action")).lower(), "action", 64)
    if not action:
        raise PayloadError("pull request event has no action")
    pull = as_object(doc.get("pull_request"))
    number = doc.get("number")
    if not isinstance(number, int) or isinstance(number, bool):
        number = pull.get("number")
    if not isinstance(number, int) or isinstance(number, bool) or number <= 0:
        raise PayloadError("pull request event has no number")
    head, base = as_object(pull.get("head")), as_object(pull.get("base"))
    head_ref = required_ref(head.get("ref"), "pull_request.head.ref",
                            "pull request event has no pull_request.head.ref")
    head_sha = required_sha(head.get("sha"), "pull_request.head.sha must be a full commit id")
    raw_labels = pull.get("labels")
    labels: list[str] = []
    if isinstance(raw_labels, list):
        if len(raw_labels) > MAX_LABELS:
            raise PayloadError(f"pull_request.labels has more than {MAX_LABELS} entries")
        for i, item in enumerate(raw_labels):
            name = as_text(as_object(item).get("name"))
            if name:
                labels.append(checked(name, f"pull_request.labels[{i}].name", MAX_LABEL_BYTES))
    urls, full_name = _repository(doc)
    return PullRequestEvent(
        action=action, number=number, head_ref=head_ref, head_sha=head_sha,
        base_ref=checked(as_text(base.get("ref")), "pull_request.base.ref", MAX_REF_BYTES),
        labels=tuple(labels), repo_urls=urls, full_name=full_name,
        merged=pull.get("merged") is True)


REF_TYPES = frozenset({"branch", "tag"})


def parse_gitea_ref_event(doc: Any) -> RefEvent:
    """A Gitea `create` or `delete` webhook payload (CreatePayload / DeletePayload): `ref` is
    the short name, `ref_type` branch or tag. A create names the commit (`sha`); a delete has
    none (and a `pusher_type`)."""
    if not isinstance(doc, dict):
        raise PayloadError("payload must be a JSON object")
    ref_type = as_text(doc.get("ref_type")).lower()
    if ref_type not in REF_TYPES:
        raise PayloadError("ref_type must be branch or tag")
    name = checked(as_text(doc.get("ref")), "ref", MAX_REF_BYTES)
    for prefix in ("refs/heads/", "refs/tags/"):
        name = name.removeprefix(prefix)
    if not name:
        raise PayloadError("payload has no ref")
    sha = commit_sha(doc.get("sha"))
    if "sha" in doc and not sha:
        raise PayloadError("sha must be a full 40- or 64-character commit id")
    urls, full_name = _repository(doc)
    return RefEvent("create" if sha else "delete", ref_type, name, sha, urls, full_name)


def ref_event_of(push: Push) -> RefEvent | None:
    """The branch or tag a push moves (or deletes), or None for another ref."""
    if push.branch is not None:
        ref_type, name = "branch", push.branch
    elif push.tag is not None:
        ref_type, name = "tag", push.tag
    else:
        return None
    return RefEvent("delete" if push.deleted else "push", ref_type, name, push.sha,
                    push.repo_urls, push.full_name)
