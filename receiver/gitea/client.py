"""Gitea's commit status API (1.26.3), one pooled httpx client per configured instance.

Two calls: create a status, and read the newest status of one context on a commit (to skip a
post Gitea already has). Errors come out as `GiteaError` with `retryable` set for timeouts,
connection errors, 429 and 5xx, which the caller backs off on; any other 4xx is final. A 401
re-reads the token once (it may have been rotated in its Secret) before it counts as final.
Tokens are sent as `Authorization: token <T>` and never appear in an error message.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx

from receiver import __version__
from receiver.config import GiteaInstance, SecretSource

USER_AGENT = f"gitea-flux-bridge/{__version__}"
# Gitea caps a page at [api] MAX_RESPONSE_ITEMS, 50 by default.
STATUS_PAGE_SIZE = 50
MAX_RETRY_AFTER_SECONDS = 300.0

TokenReader = Callable[[SecretSource, bool], Awaitable[str]]


class GiteaError(Exception):
    def __init__(
        self, message: str, *, status: int = 0, retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


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
        )


def status_path(owner: str, repo: str, sha: str) -> str:
    return f"repos/{quote(owner, safe='')}/{quote(repo, safe='')}/statuses/{quote(sha, safe='')}"


def retryable_status(status: int) -> bool:
    """429 (throttled) and 5xx except 501 are worth another try; other answers will not change."""
    return status == 429 or (status >= 500 and status != 501)


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


def pick_latest(statuses: Iterable[CommitStatus], context: str) -> CommitStatus | None:
    """The newest status of a context in a list sorted newest first (as we ask Gitea to sort)."""
    wanted = context.strip()
    for status in statuses:
        if status.context == wanted and status.state:
            return status
    return None


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

    async def _request(
        self, name: str, method: str, path: str, *, params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> httpx.Response:
        if name not in self._clients:
            raise GiteaError(f"no Gitea instance named {name}")
        client = self._clients[name]
        token = await self._token(name, False)
        for first in (True, False):
            try:
                response = await client.request(
                    method, path, params=params, json=body,
                    headers={"Authorization": f"token {token}"},
                )
            except httpx.TimeoutException:
                raise GiteaError(f"{method} {path} on {name}: timed out", retryable=True) from None
            except httpx.HTTPError as exc:
                raise GiteaError(f"{method} {path} on {name}: {type(exc).__name__}",
                                 retryable=True) from None
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

    async def post_status(
        self, instance: str, owner: str, repo: str, sha: str, option: CreateStatusOption
    ) -> CommitStatus | None:
        response = await self._request(
            instance, "POST", status_path(owner, repo, sha), body=option.as_json())
        try:
            return CommitStatus.from_json(response.json())
        except ValueError:
            return None

    async def list_statuses(
        self, instance: str, owner: str, repo: str, sha: str
    ) -> list[CommitStatus]:
        """The newest 50 statuses of a commit, newest first (by Gitea's per-commit index)."""
        response = await self._request(
            instance, "GET", status_path(owner, repo, sha),
            params={"sort": "highestindex", "limit": STATUS_PAGE_SIZE},
        )
        try:
            doc = response.json()
        except ValueError:
            raise GiteaError(f"GET statuses on {instance}: not JSON", retryable=True) from None
        if not isinstance(doc, list):
            raise GiteaError(f"GET statuses on {instance}: not a list", retryable=True)
        parsed = (CommitStatus.from_json(item) for item in doc)
        return [s for s in parsed if s is not None]

    async def latest_status(
        self, instance: str, owner: str, repo: str, sha: str, context: str
    ) -> CommitStatus | None:
        """The newest status of `context` on the commit, among the newest 50 (as Flux looks)."""
        return pick_latest(await self.list_statuses(instance, owner, repo, sha), context)
