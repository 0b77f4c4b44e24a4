"""The OpenAPI operations of Flagger's webhooks (`receiver.web.flagger`), and their schemas."""

from __future__ import annotations

from typing import Any

from receiver.web.openapi_schemas import (
    INTERNAL,
    JSON,
    TOO_SLOW,
    Schema,
    bad_request,
    error_response,
    json_response,
    obj,
    ref,
    string,
)

SCHEMAS: dict[str, Schema] = {
    "FlaggerWebhook": obj({
        "name": string("the Canary's name"),
        "namespace": string("the Canary's namespace"),
        "phase": string("the Canary's phase"),
        "checksum": string(),
        "metadata": {"type": "object", "additionalProperties": {"type": "string"},
                     "description": "the webhook's `metadata`: `token` must be "
                                    "`statuses.canaries.webhook_token`; an `event` webhook "
                                    "adds `eventMessage`, `eventType`, `timestamp`"},
    }, ("name", "namespace", "metadata"), description="What Flagger POSTs to every webhook."),
    "GateAnswer": obj({
        "gate": string(), "hook": string("`confirm` or `rollback`"),
        "answer": {"type": "boolean", "description": "always true: any other answer is an "
                                                     "Error"},
        "reason": string("which statuses the commit shows, or why it cannot be told"),
    }, ("gate", "hook", "answer", "reason")),
    "FlaggerEventAccepted": obj({"accepted": {"type": "boolean"}}, ("accepted",)),
}


def _common(summary: str, description: str, operation_id: str,
            responses: dict[str, Any], gate: bool) -> dict[str, Any]:
    params = [{"name": "gate", "in": "path", "required": True,
               "schema": string("a gate under `statuses.canaries.gates`")}] if gate else []
    return {"post": {
        "operationId": operation_id, "summary": summary, "description": description,
        "parameters": params,
        "requestBody": {"required": True, "content": {JSON: {"schema": ref("FlaggerWebhook")}}},
        "responses": {
            **responses,
            "400": bad_request("body is not JSON", "body is not a JSON object",
                               "name must be a Kubernetes object name",
                               "namespace must be a Kubernetes namespace name",
                               "phase must be a string and metadata a map of strings"),
            "401": error_response("`metadata.token` missing or wrong, or no token "
                                  "configured.", "unauthorized"),
            "408": TOO_SLOW,
            "413": error_response("Above 65536 bytes.", "body too large"),
            "415": error_response("Another content type.",
                                  "content type must be application/json"),
            "500": INTERNAL,
        }}}


def _gate_responses(yes: str, no: str) -> dict[str, Any]:
    return {
        "200": json_response(yes, ref("GateAnswer")),
        "403": error_response(no + " The error names what the commit shows; `gate` and "
                              "`hook` are added."),
        "404": error_response("No such gate or Canary, or canaries are off.",
                              "canaries are not enabled"),
        "409": error_response("The commit the canary analyses cannot be told; the error "
                              "says why."),
        "503": error_response("Gitea cannot be read now."),
    }


def paths() -> dict[str, Any]:
    return {
        "/flagger/gates/{gate}": _common(
            "Flagger `confirm-rollout` / `confirm-promotion` / `confirm-traffic-increase`",
            "200 only when the commit the canary analyses shows `success` on every context "
            "the gate requires.", "flaggerConfirm",
            _gate_responses("Go on.", "Not cleared (yet): the reason names what is missing."),
            gate=True),
        "/flagger/gates/{gate}/rollback": _common(
            "Flagger `rollback`",
            "200 (roll back) only when a context the gate requires shows `failure` or "
            "`error` on the commit.", "flaggerRollback",
            _gate_responses("Roll back.", "Do not roll back."), gate=True),
        "/flagger/events": _common(
            "Flagger `event`: remembers which check failed, for the canary's status",
            "The failure status of a rolled-back canary names the check its events named.",
            "flaggerEvent",
            {"202": json_response("Accepted.", ref("FlaggerEventAccepted")),
             "404": error_response("Canaries are off.", "canaries are not enabled")},
            gate=False),
    }
