"""Gitea's commit status API (1.26.3), one pooled httpx client per configured instance.

Three calls: create a status, list a commit's statuses one page at a time, newest first (to
see what Gitea shows before posting, and for the resync), and read Gitea's version (which
states it accepts, see `version`). For pull-request comments: list, create, edit and delete a
pull request's issue comments, read the authenticated user (whose comments are ours) and find
the pull request a merge commit came from. Errors come out as `GiteaError` with
`retryable` set for timeouts, connection errors, 429 and 5xx, which the caller backs off on;
any other 4xx is final. A 401 re-reads the token once (it may have been rotated in its Secret)
before it counts as final.
Tokens are sent as `Authorization: token <T>` and never appear in an error message.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx

from receiver import __version__
from receiver.config import GiteaInstance, SecretSource
from receiver.gitea.api_types import (
    CommitStatus,
    CreateStatusOption,
    IssueComment,
    MergedPull,
    StatusPage,
    repo_path,
    status_path,
)
from receiver.retry import retryable_status
from receiver.times import epoch_seconds

USER_AGENT = f"gitea-flux-bridge/{__version__}"
# Gitea caps a page at [api] MAX_RESPONSE_ITEMS, 50 by default (without `limit` it sends
# [api] DEFAULT_PAGING_NUM, 30 by default); we always ask for the cap.
STATUS_PAGE_SIZE = 50
# Gitea's names are the wrong way round: `leastindex` orders by the per-commit index
# *descending* (newest first) and `highestindex` ascending (models/git/commit_status.go).
NEWEST_FIRST = "leastindex"
MAX_RETRY_AFTER_SECONDS = 300.0

TokenReader = Callable[[SecretSource, bool], Awaitable[str]]
# (instance, call, code, seconds): every request's outcome, for the latency metric.
Observer = Callable[[str, str, str, float], None]


class GiteaError(Exception):
    def __init__(
        self, message: str, *, status: int = 0, retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _error_detail(response: httpx.Response) -> str:
    try:
        doc = response.json()
    except ValueError:
        return ""
    message = doc.get("message") if isinstance(doc, dict) else None
    return str(message)[:200] if message else ""


def _total_count(response: httpx.Response) -> int | None:
    try:
        total = int(response.headers.get("x-total-count", ""))
    except ValueError:
        return None
    return total if total >= 0 else None


def _json(response: httpx.Response, what: str) -> Any:
    try:
        return response.json()
    except ValueError:
        raise GiteaError(f"{what}: not JSON", retryable=True) from None


class GiteaClient:
    def __init__(
        self,
        instances: Iterable[GiteaInstance],
        read_token: TokenReader,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._instances = {i.name: i for i in instances}
        self._read_token = read_token
        self.observe: Observer | None = None
        self._tokens: dict[str, str] = {}
        self._clients = {
            name: self._make_client(instance, transport)
            for name, instance in self._instances.items()
        }

    @staticmethod
    def _make_client(
        instance: GiteaInstance, transport: httpx.AsyncBaseTransport | None
    ) -> httpx.AsyncClient:
        verify: ssl.SSLContext | bool = True
        if instance.ca_bundle is not None and transport is None:
            verify = ssl.create_default_context(cafile=str(instance.ca_bundle))
        return httpx.AsyncClient(
            base_url=instance.url + "/api/v1/",
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            timeout=httpx.Timeout(instance.timeout_seconds),
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
            verify=verify,
            transport=transport,
        )

    @property
    def instance_names(self) -> list[str]:
        return list(self._instances)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    async def _token(self, name: str, fresh: bool) -> str:
        if fresh or name not in self._tokens:
            try:
                token = (await self._read_token(self._instances[name].token, fresh)).strip()
            except Exception as exc:  # a missing Secret or file: retry later, it may appear
                raise GiteaError(f"cannot read the token of instance {name}: "
                                 f"{type(exc).__name__}", retryable=True) from None
            if not token:
                raise GiteaError(f"the token of instance {name} is empty", retryable=True)
            self._tokens[name] = token
        return self._tokens[name]

    def _observed(self, name: str, call: str, code: str, started: float) -> None:
        if self.observe is not None:
            self.observe(name, call, code, time.monotonic() - started)

    async def _request(
        self, name: str, method: str, path: str, *, params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None, call: str = "", content: bytes | None = None,
    ) -> httpx.Response:
        if name not in self._clients:
            raise GiteaError(f"no Gitea instance named {name}")
        client = self._clients[name]
        token = await self._token(name, False)
        for first in (True, False):
            started = time.monotonic()
            try:
                response = await client.request(
                    method, path, params=params, json=body, content=content,
                    headers={"Authorization": f"token {token}",
                             **({"Content-Type": "application/json"} if content else {})},
                )
            except httpx.TimeoutException:
                self._observed(name, call, "timeout", started)
                raise GiteaError(f"{method} {path} on {name}: timed out", retryable=True) from None
            except httpx.HTTPError as exc:
                self._observed(name, call, "error", started)
                raise GiteaError(f"{method} {path} on {name}: {type(exc).__name__}",
                                 retryable=True) from None
            self._observed(name, call, str(response.status_code), started)
            if response.status_code == 401 and first:
                rotated = await self._token(name, True)
                if rotated != token:
                    token = rotated
                    continue  # the Secret changed under us: once more with the new token
            if response.is_success:
                return response
            detail = _error_detail(response)
            raise GiteaError(
                f"{method} {path} on {name}: HTTP {response.status_code}"
                + (f" ({detail})" if detail else ""),
                status=response.status_code,
                retryable=retryable_status(response.status_code),
                retry_after=parse_retry_after(response.headers.get("retry-after")),
            )
        raise AssertionError("unreachable")  # pragma: no cover

    async def get(self, instance: str, path: str, *,
                  params: dict[str, Any] | None = None) -> httpx.Response:
        """A GET of any API path (relative to /api/v1/), for `doctor`'s read-only checks;
        errors as every call's (`GiteaError`, the status kept)."""
        return await self._request(instance, "GET", path, params=params, call="get")

    async def status_write_probe(self, instance: str, owner: str, repo: str
                                 ) -> tuple[int, str]:
        """Could this token post a commit status to the repository? Asked without writing
        one: a create-status request whose body is not JSON. Gitea checks the token's scope
        (`write:repository`) and the user's write access first (403), then reads the body
        (422): so 422 means yes. Returns the HTTP status and the error (Gitea's message)."""
        try:
            response = await self._request(
                instance, "POST", status_path(owner, repo, "0" * 40), content=b"{", call="probe")
        except GiteaError as exc:
            if exc.status == 0:
                raise
            return exc.status, str(exc)
        return response.status_code, ""

    async def contains(self, instance: str, owner: str, repo: str, ancestor: str,
                       descendant: str) -> bool:
        """Does `descendant` contain `ancestor` (the same commit, or one of its ancestors)?

        Gitea's compare (swagger `repoCompareDiff`) of `descendant...ancestor` lists the
        commits reachable from `ancestor` and not from `descendant`: none exactly when it is
        contained. A commit Gitea does not know (404) is contained in nothing.
        """
        path = f"repos/{quote(owner, safe='')}/{quote(repo, safe='')}/compare/" \
               f"{quote(descendant, safe='')}...{quote(ancestor, safe='')}"
        try:
            response = await self._request(instance, "GET", path, call="compare")
        except GiteaError as exc:
            if exc.status == 404:
                return False
            raise
        try:
            doc = response.json()
        except ValueError:
            raise GiteaError(f"GET compare on {instance}: not JSON", retryable=True) from None
        total = doc.get("total_commits") if isinstance(doc, dict) else None
        if not isinstance(total, int) or isinstance(total, bool):
            raise GiteaError(f"GET compare on {instance}: no total_commits", retryable=True)
        return total == 0

    async def server_version(self, instance: str) -> str:
        """Gitea's version string (GET /version, swagger `ServerVersion`); "" when it sends none."""
        response = await self._request(instance, "GET", "version", call="version")
        try:
            doc = response.json()
        except ValueError:
            raise GiteaError(f"GET version on {instance}: not JSON", retryable=True) from None
        version = doc.get("version") if isinstance(doc, dict) else None
        return version.strip()[:100] if isinstance(version, str) else ""

    async def post_status(
        self, instance: str, owner: str, repo: str, sha: str, option: CreateStatusOption
    ) -> CommitStatus | None:
        response = await self._request(
            instance, "POST", status_path(owner, repo, sha), body=option.as_json(),
            call="post_status")
        try:
            return CommitStatus.from_json(response.json())
        except ValueError:
            return None

    async def status_page(
        self, instance: str, owner: str, repo: str, sha: str, page: int = 1,
        limit: int = STATUS_PAGE_SIZE,
    ) -> StatusPage:
        """One page of a commit's statuses, newest first (one GET)."""
        response = await self._request(
            instance, "GET", status_path(owner, repo, sha),
            params={"sort": NEWEST_FIRST, "page": page, "limit": limit}, call="list_statuses",
        )
        try:
            doc = response.json()
        except ValueError:
            raise GiteaError(f"GET statuses on {instance}: not JSON", retryable=True) from None
        if not isinstance(doc, list):
            raise GiteaError(f"GET statuses on {instance}: not a list", retryable=True)
        parsed = (CommitStatus.from_json(item) for item in doc)
        return StatusPage(tuple(s for s in parsed if s is not None), page, limit,
                          _total_count(response))

    async def current_login(self, instance: str) -> str:
        """The login of the user the instance's token belongs to (GET /user)."""
        doc = _json(await self._request(instance, "GET", "user", call="user"),
                    f"GET user on {instance}")
        login = doc.get("login") if isinstance(doc, dict) else None
        if not isinstance(login, str) or not login:
            raise GiteaError(f"GET user on {instance}: no login", retryable=True)
        return login

    async def list_comments(self, instance: str, owner: str, repo: str,
                            number: int) -> list[IssueComment]:
        """Every comment of an issue or pull request, oldest first (Gitea 1.26 sends them all at
        once: the operation takes no paging parameters)."""
        response = await self._request(
            instance, "GET", f"{repo_path(owner, repo)}/issues/{number}/comments",
            call="list_comments")
        doc = _json(response, f"GET comments on {instance}")
        if not isinstance(doc, list):
            raise GiteaError(f"GET comments on {instance}: not a list", retryable=True)
        return [c for c in (IssueComment.from_json(item) for item in doc) if c is not None]

    async def create_comment(self, instance: str, owner: str, repo: str,
                             number: int, body: str) -> IssueComment | None:
        response = await self._request(
            instance, "POST", f"{repo_path(owner, repo)}/issues/{number}/comments",
            body={"body": body}, call="create_comment")
        try:
            return IssueComment.from_json(response.json())
        except ValueError:
            return None

    async def edit_comment(self, instance: str, owner: str, repo: str,
                           comment_id: int, body: str) -> None:
        await self._request(
            instance, "PATCH", f"{repo_path(owner, repo)}/issues/comments/{comment_id}",
            body={"body": body}, call="edit_comment")

    async def delete_comment(self, instance: str, owner: str, repo: str,
                             comment_id: int) -> None:
        """Delete a comment; one already gone (404) is as good as deleted."""
        try:
            await self._request(
                instance, "DELETE", f"{repo_path(owner, repo)}/issues/comments/{comment_id}",
                call="delete_comment")
        except GiteaError as exc:
            if exc.status != 404:
                raise

    async def merged_pull(self, instance: str, owner: str, repo: str,
                          sha: str) -> MergedPull | None:
        """The pull request that merged `sha` (GET commits/{sha}/pull); None when none did (404)."""
        try:
            response = await self._request(
                instance, "GET", f"{repo_path(owner, repo)}/commits/{quote(sha, safe='')}/pull",
                call="commit_pull")
        except GiteaError as exc:
            if exc.status == 404:
                return None
            raise
        doc = _json(response, f"GET commit pull on {instance}")
        number = doc.get("number") if isinstance(doc, dict) else None
        if not isinstance(number, int) or isinstance(number, bool) or number <= 0:
            return None
        merged = doc.get("merged") is True
        sha_merged = doc.get("merge_commit_sha")
        return MergedPull(number, merged, sha_merged if isinstance(sha_merged, str) else "",
                          epoch_seconds(doc.get("merged_at")))
