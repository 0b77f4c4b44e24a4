"""Flagger's webhooks: `POST /flagger/gates/{gate}` (`confirm-rollout`, `confirm-promotion`,
`confirm-traffic-increase`), `POST /flagger/gates/{gate}/rollback` (`rollback`) and
`POST /flagger/events` (`event`).

Validate, then act: size (before a byte is read) and media type, then the JSON, then the token
the webhook's `metadata.token` carries (Flagger sends no credential of its own), then the
answer from `CanaryStatuses`. Flagger reads any status above 202 as "no".
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from receiver.config import Settings
from receiver.status.canaries import (
    WEBHOOK_BODY_LIMIT,
    WebhookCall,
    WebhookError,
    parse_webhook,
    token_matches,
)
from receiver.status.canary_statuses import CanaryStatuses
from receiver.status.gates import CONFIRM, ROLLBACK
from receiver.status.secrets import SecretReader
from receiver.web.http import (
    UNAUTHORIZED,
    BodyTooLarge,
    declared_too_large,
    error,
    media_type,
    read_capped,
)

log = logging.getLogger("receiver.flagger")


class FlaggerEndpoint:
    def __init__(self, settings: Settings, canaries: CanaryStatuses,
                 secrets: SecretReader) -> None:
        self._cfg = settings.statuses.canaries
        self._canaries = canaries
        self._secrets = secrets

    async def _call(self, request: Request) -> WebhookCall | Response:
        if not self._cfg.enabled:
            return error(404, "canaries are not enabled")
        if declared_too_large(request.headers, WEBHOOK_BODY_LIMIT):
            return error(413, "body too large")
        if media_type(request.headers) != "application/json":
            return error(415, "content type must be application/json")
        try:
            body = await read_capped(request, WEBHOOK_BODY_LIMIT)
        except BodyTooLarge:
            return error(413, "body too large")
        try:
            call = parse_webhook(body)
        except WebhookError as exc:
            return error(400, str(exc))
        token = await self._secrets.read_or_none(self._cfg.webhook_token)
        if not token_matches(call, token):
            return JSONResponse(UNAUTHORIZED, status_code=401)
        return call

    async def gate(self, request: Request) -> Response:
        return await self._gate(request, CONFIRM)

    async def rollback(self, request: Request) -> Response:
        return await self._gate(request, ROLLBACK)

    async def _gate(self, request: Request, hook: str) -> Response:
        call = await self._call(request)
        if isinstance(call, Response):
            return call
        gate = request.path_params["gate"]
        status, reason = await self._canaries.gate(gate, hook, call.namespace, call.name)
        log.info("flagger gate answered", extra={
            "gate": gate, "hook": hook, "canary": f"{call.namespace}/{call.name}",
            "phase": call.phase, "status": status, "reason": reason})
        if status != 200:
            return error(status, reason, gate=gate, hook=hook)
        return JSONResponse({"gate": gate, "hook": hook, "answer": True, "reason": reason})

    async def event(self, request: Request) -> Response:
        call = await self._call(request)
        if isinstance(call, Response):
            return call
        self._canaries.note_event(call.namespace, call.name,
                                  call.metadata.get("eventMessage", ""))
        return JSONResponse({"accepted": True}, status_code=202)
