"""What Gitea's API sends and takes, as the bridge reads it (its swagger shapes), and the
paths it is called on. Pure: the calls themselves are `gitea.client`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from receiver.times import epoch_seconds


@dataclass(frozen=True, slots=True)
class CreateStatusOption:
    """The body of POST /repos/{owner}/{repo}/statuses/{sha} (swagger `CreateStatusOption`)."""

    state: str
    target_url: str
    description: str
    context: str

    def as_json(self) -> dict[str, str]:
        return {"state": self.state, "target_url": self.target_url,
                "description": self.description, "context": self.context}


@dataclass(frozen=True, slots=True)
class CommitStatus:
    """One status as Gitea returns it; note the state is the JSON field `status`."""

    state: str
    description: str
    target_url: str
    context: str
    id: int = 0
    # When Gitea last set it (`updated_at`, else `created_at`), epoch seconds; None if unsaid.
    at: float | None = None

    @classmethod
    def from_json(cls, doc: Any) -> CommitStatus | None:
        if not isinstance(doc, dict):
            return None

        def text(key: str) -> str:
            value = doc.get(key)
            return value.strip() if isinstance(value, str) else ""

        ident = doc.get("id")
        return cls(
            state=text("status") or text("state"),
            description=text("description"),
            target_url=text("target_url"),
            context=text("context"),
            id=ident if isinstance(ident, int) else 0,
            at=(_positive(epoch_seconds(doc.get("updated_at")))
                or _positive(epoch_seconds(doc.get("created_at")))),
        )


def _positive(seconds: float | None) -> float | None:
    return seconds if seconds is not None and seconds > 0 else None


def status_path(owner: str, repo: str, sha: str) -> str:
    return f"repos/{quote(owner, safe='')}/{quote(repo, safe='')}/statuses/{quote(sha, safe='')}"


@dataclass(frozen=True, slots=True)
class StatusPage:
    """One page of a commit's statuses; `total` is Gitea's X-Total-Count, if it sent one."""

    items: tuple[CommitStatus, ...]
    page: int
    limit: int
    total: int | None = None


def more_pages(page: StatusPage, read_so_far: int) -> bool:
    """Whether a listing goes on after `page`, having read `read_so_far` statuses in all.

    X-Total-Count decides when Gitea sends it; else a short page is the last one. An empty
    page always ends the listing.
    """
    if not page.items:
        return False
    if page.total is not None:
        return read_so_far < page.total
    return len(page.items) >= page.limit


@dataclass(frozen=True, slots=True)
class IssueComment:
    """One issue (pull request) comment as Gitea returns it (swagger `Comment`)."""

    id: int
    body: str
    login: str  # its poster's login; "" when Gitea names none

    @classmethod
    def from_json(cls, doc: Any) -> IssueComment | None:
        if not isinstance(doc, dict):
            return None
        ident, body, user = doc.get("id"), doc.get("body"), doc.get("user")
        if not isinstance(ident, int) or isinstance(ident, bool):
            return None
        login = user.get("login") if isinstance(user, dict) else None
        return cls(ident, body if isinstance(body, str) else "",
                   login if isinstance(login, str) else "")


@dataclass(frozen=True, slots=True)
class MergedPull:
    """What `GET commits/{sha}/pull` says of the pull request a commit was merged by."""

    number: int
    merged: bool
    merge_commit_sha: str
    merged_at: float | None = None  # epoch seconds


def repo_path(owner: str, repo: str) -> str:
    return f"repos/{quote(owner, safe='')}/{quote(repo, safe='')}"
