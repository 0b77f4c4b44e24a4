"""The OpenAPI document of the HTTP API: built here, served at `GET /openapi.json`, kept in
`docs/openapi.json` (`python -m receiver.web.openapi > docs/openapi.json`; a test checks that the
file and every route of the app agree with this module). Prose lives in `docs/api.md`; this
is the machine-readable contract: paths, credentials, bodies, every status and its JSON shape.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from receiver import __version__
from receiver.web import openapi_flagger
from receiver.web.openapi_schemas import (
    BAD_HEAD,
    FORM,
    HEAD_TOO_LARGE,
    INTERNAL,
    JSON,
    NDJSON,
    SCHEMAS,
    SECURITY_SCHEMES,
    SVG,
    TARGET_TOO_LONG,
    TEXT,
    TOO_SLOW,
    Schema,
    bad_request,
    error_response,
    header,
    json_response,
    ref,
    string,
)


def _hook() -> dict[str, Any]:
    too_large = "body exceeds 3145728 bytes"
    return {"post": {
        "operationId": "hook",
        "summary": "A push from a Gitea webhook or an Actions step: route it and reconcile",
        "description": "`digest` is the Flux Receiver's webhook path: hex(SHA-256(token + name "
                       "+ namespace)). Checks run in the order of the error list in "
                       "docs/api.md; every answer before the 401 is the same whatever the "
                       "Receiver's type.",
        "security": [{"giteaSignature": []}, {"hubSignature256": []}, {"hookSignature": []},
                     {"bearer": []}],
        "parameters": [
            {"name": "digest", "in": "path", "required": True,
             "schema": string("64 lower-case hex characters")},
            header("X-Gitea-Event", "`push` (handled), `ping` (answered), anything else "
                    "(ignored); absent counts as a push"),
            header("X-GitHub-Event", "read when `X-Gitea-Event` is absent"),
            header("X-Gitea-Delivery", "Gitea's delivery id (first 128 characters kept): "
                    "deduplicated per Receiver"),
        ],
        "requestBody": {"required": False, "content": {
            JSON: {"schema": {"anyOf": [ref("GiteaPush"), ref("ActionsBody"),
                                        {"type": "object", "maxProperties": 0},
                                        {"type": "null"}]}},
            FORM: {"schema": ref("FormPush")},
        }},
        "responses": {
            "200": json_response("Nothing to do: `ping`, another event, or a repeated "
                         "`X-Gitea-Delivery`.", ref("HookNoAction")),
            "202": {**json_response("Accepted: the targets, in annotation order, with their reasons.",
                            ref("HookAccepted")),
                    "links": {"FollowDelivery": {
                        "operationId": "delivery",
                        "parameters": {"id": "$response.body#/delivery"},
                        "description": "Follow the delivery (with the same Receiver's token)."}}},
            "400": bad_request("request body is not valid JSON",
                                "request body is not a JSON object",
                                "form body has no payload field",
                                "form body has more than 50 fields"),
            "401": error_response("Missing, malformed, stale, replayed or wrong credential; always "
                          "the same body.", "unauthorized"),
            "404": error_response("No Receiver with a usable token has this path.",
                          "no receiver for this path", "not found"),
            "408": TOO_SLOW,
            "413": error_response("The body is larger than `body_limit_bytes` (default shown).",
                          too_large),
            "415": error_response("Neither JSON nor form-encoded; a form body on a `generic` or "
                          "`generic-hmac` Receiver.",
                          "content type must be application/json (or application/x-www-form-"
                          "urlencoded for Gitea webhooks)",
                          "content type must be application/json"),
            "422": error_response("A payload without what routing needs, or a field over its limit.",
                          "payload has no ref", "sha must be a full 40- or 64-character commit id",
                          "<field> is longer than <n> bytes", "<field> is not valid UTF-8 text"),
            "429": error_response("The Receiver is over `rate_limit`.", "rate limit exceeded"),
            "500": INTERNAL,
            "503": error_response("Not ready, the Receiver is suspended, or too many deliveries are in "
                          "flight.", "caches are not synced yet", "receiver is suspended",
                          "too many deliveries in flight"),
        },
    }}


def _deliveries() -> dict[str, Any]:
    return {"get": {
        "operationId": "delivery",
        "summary": "Follow a push's delivery, optionally waiting and streaming",
        "description": "Any replica answers: the id carries the delivery's signed record. An "
                       "unknown or forged id and a refused credential look the same (404).",
        "security": [{"bearer": []}, {"readSignature": []}],
        "parameters": [
            {"name": "id", "in": "path", "required": True,
             "schema": string("the `delivery` of a 202 reply (opaque, URL-safe)",
                               maxLength=6000)},
            {"name": "wait", "in": "query", "required": False,
             "description": "stream until the delivery settles or this many seconds pass "
                            "(capped at `deliveries.max_wait_seconds`)",
             "schema": {"type": "number", "minimum": 0}},
            {"name": "canaries", "in": "query", "required": False,
             "description": "`true`: also follow the Flagger canaries of its Kustomizations and "
                            "HelmReleases (targets of role `canary`): the delivery is ready "
                            "once they are promoted, failed once one is rolled back. Needs "
                            "`statuses.canaries.enabled`.",
             "schema": {"type": "string", "enum": ["true", "false"]}},
        ],
        "responses": {
            "200": {"description": "The delivery now; with `wait`, newline-delimited JSON: "
                                   "the delivery, one line per change, then possibly a timeout "
                                   "marker or a retry line.",
                    "content": {JSON: {"schema": ref("Delivery")},
                                NDJSON: {"schema": {"type": "string"}}}},
            "400": bad_request("wait must be a number of seconds",
                               "canaries must be true or false",
                               "canaries are not enabled (statuses.canaries.enabled)"),
            "404": error_response("Unknown, forged or unauthorised.", "no such delivery", "not found"),
            "500": INTERNAL,
        },
    }}


def _events() -> dict[str, Any]:
    return {"post": {
        "operationId": "event",
        "summary": "A Flux event, turned into Gitea commit statuses",
        "security": [{"eventSignature": []}, {"bearer": []}],
        "requestBody": {"required": True, "content": {JSON: {"schema": ref("FluxEvent")}}},
        "responses": {
            "202": json_response("Accepted.", ref("EventAccepted")),
            "400": bad_request("body is not valid JSON", "body is nested too deeply"),
            "401": error_response("No valid credential; `sha1=`/`sha512=` signatures; no events token "
                          "configured.", "unauthorized"),
            "408": TOO_SLOW,
            "413": error_response("Above `body_limit_bytes`.", "body too large"),
            "415": error_response("Another content type.", "content type must be application/json"),
            "422": error_response("An event without what a status needs.", "event must be a JSON object",
                          "event has no involvedObject", "event has no reason",
                          "severity must be one of info, error, trace",
                          "metadata must be an object of strings"),
            "500": INTERNAL,
            "503": error_response("Stopping, or the status queue is full.", "shutting down",
                          "status queue is full"),
        },
    }}


def _badge() -> dict[str, Any]:
    cache = {"ETag": {"type": "string"}, "Cache-Control": {"type": "string"}}

    def query(name: str, description: str, **schema: Any) -> Schema:
        return {"name": name, "in": "query", "required": False, "description": description,
                "schema": {"type": "string", **schema}}

    return {"get": {
        "operationId": "badge",
        "summary": "The deployment badge of a repository (and branch) on this cluster",
        "description": "Always an SVG: a wrong or missing token, another cluster, or nothing "
                       "matching reads `unknown`.",
        "parameters": [
            {"name": "owner", "in": "path", "required": True, "schema": string()},
            {"name": "repo", "in": "path", "required": True, "schema": string()},
            query("branch", "only sources following this branch count"),
            query("cluster", "a name other than `cluster_name` reads `unknown`"),
            query("environment", "one of `statuses.fleet.environments`: the badge shows that "
                  "environment's aggregate status in Gitea (`flux/env/<name>`) on the commit "
                  "this cluster's sources hold, labelled with its name; another name reads "
                  "`unknown`"),
            query("style", "`flat` (default) or `flat-square`; anything else renders flat"),
            query("token", "required when `badge_key` is set (`gitea-flux-bridge badge-url`)"),
            header("If-None-Match", "the ETag of a badge already held"),
        ],
        "responses": {
            "200": {"description": "The badge.", "content": {SVG: {"schema": {"type": "string"}}},
                    "headers": {k: {"schema": v} for k, v in cache.items()}},
            "304": {"description": "The badge has the ETag in `If-None-Match`.",
                    "headers": {k: {"schema": v} for k, v in cache.items()}},
            "400": BAD_HEAD,
            "404": error_response("A path that leaves `/badge/` once normalised.", "not found"),
            "500": INTERNAL,
        },
    }}


def _plain(operation_id: str, summary: str, content_type: str, **responses: Any) -> Any:
    return {"get": {
        "operationId": operation_id, "summary": summary,
        "responses": {"200": {"description": "OK",
                              "content": {content_type: {"schema": {"type": "string"}}}},
                      "400": BAD_HEAD, "500": INTERNAL, **responses},
    }}


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route the app serves."""
    readyz = _plain("readyz", "Readiness: caches synced, Kubernetes reachable", JSON, **{
        "503": error_response("Not ready.", "caches are not synced",
                      "cannot reach Kubernetes for some kinds", "receivers are being indexed",
                      "draining")})
    readyz["get"]["responses"]["200"] = json_response("Ready.", ref("Ready"))
    openapi = _plain("openapi", "This document", JSON)
    openapi["get"]["responses"]["200"] = json_response("The OpenAPI document.", {"type": "object"})
    paths = {
        "/hook/{digest}": _hook(),
        "/deliveries/{id}": _deliveries(),
        "/events": _events(),
        "/badge/{owner}/{repo}.svg": _badge(),
        **openapi_flagger.paths(),
        "/healthz": _plain("healthz", "Liveness", TEXT),
        "/readyz": readyz,
        "/metrics": _plain("metrics", "Prometheus metrics (text format)", TEXT),
        "/openapi.json": openapi,
    }
    for item in paths.values():  # the head's bounds apply before any route
        for operation in item.values():
            operation["responses"].update({"414": TARGET_TOO_LONG, "431": HEAD_TOO_LARGE})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gitea-flux-bridge",
            "version": __version__,
            "description": "Gitea pushes to Flux reconciles, Flux events to Gitea commit "
                           "statuses. Every error body is `{\"error\": \"<message>\"}`. Any other "
                           "path answers 404 `not found`, a wrong method on a known path 405 "
                           "`method not allowed` (with `Allow`); a trailing slash is not "
                           "redirected. Prose: docs/api.md.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "paths": paths,
        "components": {"schemas": {**SCHEMAS, **openapi_flagger.SCHEMAS},
                       "securitySchemes": SECURITY_SCHEMES},
    }


@functools.cache
def rendered() -> bytes:
    """The document as served and as kept in docs/openapi.json (stable key order)."""
    return (json.dumps(document(), indent=2, ensure_ascii=False) + "\n").encode()


if __name__ == "__main__":
    import sys

    sys.stdout.buffer.write(rendered())
