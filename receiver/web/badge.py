"""`GET /badge/{owner}/{repo}.svg?branch=&cluster=&style=&token=`: an SVG of live state (`badges`);
with `environment=`, of that environment's aggregate status in Gitea (`env_badges`)."""

from __future__ import annotations

import hashlib
import logging

from starlette.requests import Request
from starlette.responses import Response

from receiver.config import Settings
from receiver.flux.cluster import Cluster
from receiver.status import badges
from receiver.status.env_badges import EnvironmentStates
from receiver.status.secrets import SecretReader

log = logging.getLogger("receiver.status_service")


class BadgeEndpoint:
    def __init__(self, settings: Settings, cluster: Cluster, secrets: SecretReader,
                 environments: EnvironmentStates | None = None) -> None:
        self._settings = settings
        self._cluster = cluster
        self._secrets = secrets
        self._environments = environments

    async def handle(self, request: Request) -> Response:
        query = request.query_params
        style = query.get("style", "flat")
        style = style if style in badges.STYLES else "flat"
        label = self._settings.cluster_name
        environment = query.get("environment")
        if environment is not None and self._environments is not None \
                and self._environments.known(environment):
            label = environment
        try:
            state = await self._state(request)
        except Exception:  # a badge is never a 500; the log says why it is grey
            log.exception("badge failed")
            state = badges.UNKNOWN
        svg = badges.badge_svg(label, state, style)
        etag = '"' + hashlib.sha256(svg.encode()).hexdigest()[:32] + '"'
        headers = {"Cache-Control": "no-cache, max-age=0", "ETag": etag}
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(svg, media_type="image/svg+xml", headers=headers)

    async def _state(self, request: Request) -> str:
        path = str(request.path_params.get("path") or request.url.path.split("/badge/", 1)[-1])
        if not path.endswith(".svg"):
            return badges.UNKNOWN
        parts = path.removesuffix(".svg").split("/")
        if len(parts) != 2 or not all(parts):
            return badges.UNKNOWN
        owner, repo = parts
        query = request.query_params
        branch = query.get("branch") or None
        cluster = query.get("cluster")
        if cluster and cluster != self._settings.cluster_name:
            return badges.UNKNOWN
        if self._settings.badge_key is not None:
            key = await self._secrets.read_or_none(self._settings.badge_key)
            if key is None or not badges.token_allows(
                    key, query.get("token", ""), owner, repo, branch or ""):
                return badges.UNKNOWN
        if query.get("environment") is not None:
            environment = query["environment"]
            if self._environments is None or not self._environments.known(environment):
                return badges.UNKNOWN
            return await self._environments.state(owner, repo, branch, environment)
        return badges.repository_state(self._cluster.store, owner, repo, branch)
