"""Push payloads shaped exactly as Gitea 1.26 builds them (modules/structs/hook.go PushPayload).

Gitea marshals with json.MarshalIndent(p, "", "  ") and Go's HTML escaping, and signs those
bytes; `gitea_bytes` reproduces that so signatures are checked over what Gitea really sends.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import quote_plus

ROOT_URL = "https://gitea.example.com/"
ZERO = "0" * 40


def sha_for(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - test ids, not security


def go_json(doc: Any, indent: int | None = 2) -> bytes:
    """Go's encoding/json output: HTML-escaped <, >, & and U+2028/U+2029."""
    text = json.dumps(doc, indent=indent, ensure_ascii=False,
                      separators=(",", ": ") if indent else (",", ":"))
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text.encode()


def _user(name: str) -> dict[str, Any]:
    return {
        "id": 1, "login": name, "login_name": "", "source_id": 0, "full_name": "",
        "email": f"{name}@noreply.gitea.example.com", "avatar_url": f"{ROOT_URL}avatars/x",
        "html_url": f"{ROOT_URL}{name}", "language": "", "is_admin": False,
        "last_login": "0001-01-01T00:00:00Z", "created": "2026-01-02T03:04:05Z",
        "restricted": False, "active": False, "prohibit_login": False, "location": "",
        "website": "", "description": "", "visibility": "public", "followers_count": 0,
        "following_count": 0, "starred_repos_count": 0, "username": name,
    }


def repository(full_name: str, root: str = ROOT_URL) -> dict[str, Any]:
    owner, name = full_name.split("/")
    host = root.split("://", 1)[1].rstrip("/")
    return {
        "id": 7, "owner": _user(owner), "name": name, "full_name": full_name,
        "description": "", "empty": False, "private": True, "fork": False, "template": False,
        "mirror": False, "size": 120, "language": "", "languages_url": "",
        "html_url": f"{root}{full_name}", "url": f"{root}api/v1/repos/{full_name}",
        "link": "", "ssh_url": f"git@{host.split(':')[0]}:{full_name}.git",
        "clone_url": f"{root}{full_name}.git", "original_url": "", "website": "",
        "stars_count": 0, "forks_count": 0, "watchers_count": 1, "open_issues_count": 0,
        "open_pr_counter": 0, "release_counter": 0, "default_branch": "main",
        "archived": False, "created_at": "2026-01-02T03:04:05Z",
        "updated_at": "2026-11-20T10:00:00Z", "archived_at": "1970-01-01T00:00:00Z",
        "permissions": {"admin": True, "push": True, "pull": True},
        "has_code": True, "has_issues": True, "has_wiki": True, "has_pull_requests": True,
        "has_projects": True, "has_releases": True, "has_packages": True,
        "has_actions": True, "ignore_whitespace_conflicts": False,
        "allow_merge_commits": True, "allow_rebase": True, "allow_rebase_explicit": True,
        "allow_squash_merge": True, "allow_fast_forward_only_merge": True,
        "allow_rebase_update": True, "default_delete_branch_after_merge": False,
        "default_merge_style": "merge", "default_allow_maintainer_edit": False,
        "avatar_url": "", "internal": False, "mirror_interval": "", "object_format_name": "sha1",
        "mirror_updated": "0001-01-01T00:00:00Z", "topics": [], "licenses": [],
    }


def commit(full_name: str, message: str, added: list[str] | None = None,
           modified: list[str] | None = None, removed: list[str] | None = None,
           root: str = ROOT_URL) -> dict[str, Any]:
    sha = sha_for(full_name + message)
    person = {"name": "Dev", "email": "dev@example.com", "username": "dev"}
    return {
        "id": sha, "message": message + "\n", "url": f"{root}{full_name}/commit/{sha}",
        "author": person, "committer": person, "verification": None,
        "timestamp": "2026-11-27T12:00:00Z", "added": added or [], "removed": removed or [],
        "modified": modified or [],
    }


def push(full_name: str = "platform/fleet", ref: str = "refs/heads/main",
         commits: list[dict[str, Any]] | None = None, total: int | None = None,
         before: str | None = None, after: str | None = None,
         root: str = ROOT_URL) -> dict[str, Any]:
    commits = commits if commits is not None else [
        commit(full_name, "change", modified=["README.md"], root=root)]
    head = commits[0] if commits else None
    after = after if after is not None else (head["id"] if head else sha_for(ref))
    before = before if before is not None else sha_for("before" + ref)
    return {
        "ref": ref, "before": before, "after": after,
        "compare_url": f"{root}{full_name}/compare/{before}...{after}",
        "commits": commits, "total_commits": len(commits) if total is None else total,
        "head_commit": head, "repository": repository(full_name, root),
        "pusher": _user("dev"), "sender": _user("dev"),
    }


def tag_push(full_name: str, tag: str, sha: str, root: str = ROOT_URL) -> dict[str, Any]:
    """A tag push: ref refs/tags/<t>, before zero, no commits, head_commit the tagged commit."""
    head = commit(full_name, f"release {tag}", root=root)
    head["id"] = sha
    doc = push(full_name, f"refs/tags/{tag}", commits=[], total=0, before=ZERO, after=sha,
               root=root)
    doc["head_commit"] = head
    return doc


def gitea_bytes(doc: Any) -> bytes:
    return go_json(doc, indent=2)


def form_body(doc: Any) -> tuple[bytes, bytes]:
    """(HTTP body, signed bytes) for a webhook with content type form."""
    signed = gitea_bytes(doc)
    return b"payload=" + quote_plus(signed.decode()).encode(), signed


def _label(name: str, index: int) -> dict[str, Any]:
    return {"id": index + 1, "name": name, "exclusive": False, "is_archived": False,
            "color": "e11d21", "description": "", "url": f"{ROOT_URL}api/v1/labels/{index + 1}"}


def pull_request(full_name: str = "platform/fleet", number: int = 7, action: str = "opened",
                 head: str = "feature", sha: str | None = None, base: str = "main",
                 labels: tuple[str, ...] = (), root: str = ROOT_URL) -> dict[str, Any]:
    """A `pull_request` event as Gitea 1.26 builds it (PullRequestPayload), the fields a
    preview reads filled in, the rest as Gitea leaves them."""
    sha = sha if sha is not None else sha_for(f"{full_name}#{number}@{head}")
    repo = repository(full_name, root)

    def branch(ref: str, commit_id: str) -> dict[str, Any]:
        return {"label": ref, "ref": ref, "sha": commit_id, "repo_id": 7, "repo": repo}

    pr = {
        "id": 100 + number, "url": f"{root}{full_name}/pulls/{number}", "number": number,
        "user": _user("dev"), "title": f"Change {number}", "body": "",
        "labels": [_label(n, i) for i, n in enumerate(labels)], "milestone": None,
        "assignee": None, "assignees": None, "requested_reviewers": None,
        "requested_reviewers_teams": None, "state": "closed" if action == "closed" else "open",
        "draft": False, "is_locked": False, "comments": 0, "review_comments": 0,
        "additions": 1, "deletions": 0, "changed_files": 1,
        "html_url": f"{root}{full_name}/pulls/{number}",
        "diff_url": f"{root}{full_name}/pulls/{number}.diff",
        "patch_url": f"{root}{full_name}/pulls/{number}.patch", "mergeable": True,
        "merged": False, "merged_at": None, "merge_commit_sha": None, "merged_by": None,
        "allow_maintainer_edit": False, "base": branch(base, sha_for(base)),
        "head": branch(head, sha), "merge_base": sha_for(base),
        "due_date": None, "created_at": "2026-12-01T10:00:00Z",
        "updated_at": "2026-12-01T10:00:00Z", "closed_at": None, "pin_order": 0,
    }
    return {"action": action, "number": number, "pull_request": pr,
            "requested_reviewer": None, "repository": repo, "sender": _user("dev"),
            "commit_id": "", "review": None}


def ref_created(full_name: str, ref: str, ref_type: str, sha: str,
                root: str = ROOT_URL) -> dict[str, Any]:
    """A `create` event (CreatePayload): `ref` is the short name."""
    return {"sha": sha, "ref": ref, "ref_type": ref_type,
            "repository": repository(full_name, root), "sender": _user("dev")}


def ref_deleted(full_name: str, ref: str, ref_type: str, root: str = ROOT_URL) -> dict[str, Any]:
    """A `delete` event (DeletePayload): no commit."""
    return {"ref": ref, "ref_type": ref_type, "pusher_type": "user",
            "repository": repository(full_name, root), "sender": _user("dev")}
