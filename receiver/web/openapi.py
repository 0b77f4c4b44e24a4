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
from receiver.delivery.view import OUTCOMES

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
NDJSON = "application/x-ndjson"
SVG = "image/svg+xml"
TEXT = "text/plain"
_SHA = "^([0-9a-f]{40}|[0-9a-f]{64})$"

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _string(description: str = "", **extra: Any) -> Schema:
    out: Schema = {"type": "string", **extra}
    if description:
        out["description"] = description
    return out


def _object(properties: dict[str, Schema], required: tuple[str, ...] = (), *,
            description: str = "", closed: bool = False) -> Schema:
    out: Schema = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    if description:
        out["description"] = description
    if closed:
        out["additionalProperties"] = False
    return out


def _error(description: str, *messages: str) -> dict[str, Any]:
    """A response whose body is the Error shape; `messages` are the answers it may carry."""
    text = description
    if messages:
        text += " Messages: " + "; ".join(f"`{m}`" for m in messages) + "."
    return {"description": text, "content": {JSON: {"schema": _ref("Error")}}}


def _json(description: str, schema: Schema, **headers: Schema) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        out["headers"] = {name: {"schema": s} for name, s in headers.items()}
    return out


def _header(name: str, description: str, **schema: Any) -> Schema:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string", **schema}}


# uvicorn refuses a request head it cannot parse (for example a request line over about
# 64 KiB) before the app runs, in plain text. Any operation can get it.
UNPARSABLE = ("A request line or head the HTTP server cannot parse (for example a URL over "
              "about 64 KiB) is refused by the server itself: `Invalid HTTP request received.` "
              "in plain text, and the connection is closed.")
_PLAIN_400 = {TEXT: {"schema": {"type": "string"}}}
BAD_HEAD = {"description": UNPARSABLE, "content": _PLAIN_400}


def _bad_request(*messages: str) -> dict[str, Any]:
    """400 from the app (JSON) or from the HTTP server (plain text, see UNPARSABLE)."""
    out = _error("A request the app cannot decode. " + UNPARSABLE, *messages)
    out["content"].update(_PLAIN_400)
    return out


INTERNAL = _error("An unexpected failure; never a traceback. The fuzz tests keep this from "
                  "happening.", "internal error")
TOO_SLOW = _error("The request body did not arrive within `server.body_timeout_seconds`; the "
                  "connection is closed.", "request body not received in time")

_TARGET_REF = _object({
    "apiVersion": _string(), "kind": _string(), "namespace": _string(), "name": _string(),
    "reason": _string("why the push selects or leaves out this object"),
}, ("kind", "namespace", "name", "reason"))

_OBJECT_KEY = _object({
    "apiVersion": _string(), "kind": _string(), "namespace": _string(), "name": _string(),
}, ("kind", "namespace", "name"))

_TARGET_STATES = ["queued", "annotated", "reconciling", "ready", "failed", "timed_out",
                  "skipped"]

SCHEMAS: dict[str, Schema] = {
    "Error": _object({"error": _string("what went wrong; the same text for every 401")},
                     ("error",), description="Every error body. `/readyz` may add detail "
                     "fields (`failing`: the kinds whose watch keeps failing)."),
    "GiteaPush": _object({
        "ref": _string("`refs/heads/<branch>`, `refs/tags/<tag>`; a short name means a branch",
                       maxLength=1024),
        "after": _string("the new commit; all zeros when the ref was deleted"),
        "head_commit": {"type": ["object", "null"], "properties": {"id": _string()}},
        "total_commits": {"type": "integer", "minimum": 0},
        "commits": {"type": "array", "items": _object({
            kind: {"type": "array", "items": _string(maxLength=4096)}
            for kind in ("added", "removed", "modified")})},
        "repository": _object({
            "full_name": _string(maxLength=256),
            "clone_url": _string(maxLength=2048),
            "html_url": _string(maxLength=2048),
            "ssh_url": _string(maxLength=2048),
        }),
    }, ("ref", "repository"), description="Gitea's push payload (the fields the bridge reads). "
       "Limits are in UTF-8 bytes; a longer field or a lone UTF-16 surrogate is a 422."),
    "ActionsBody": _object({
        "repository": _string("the repository's clone or web URL", maxLength=2048),
        "ref": _string("a full ref; a short name means a branch", minLength=1, maxLength=1024),
        "sha": _string("the full commit id", pattern=_SHA),
        "paths": {"type": "array", "maxItems": 20000, "items": _string(maxLength=4096),
                  "description": "changed files; without it every consumer of the matched "
                                 "sources counts as touched"},
    }, ("repository", "ref", "sha"), description="What a Gitea Actions step sends. `{}`, `null` "
       "or an empty body carry no push details: every listed object is annotated, as Flux does."),
    "FormPush": _object({"payload": _string("the Gitea push payload as JSON text")},
                        ("payload",), description="Gitea's form content type (`github` Receivers)."),
    "HookAccepted": _object({
        "delivery": _string("the delivery's signed record, for `GET /deliveries/{id}`"),
        "mark": _string("short id written on the annotated objects"),
        "commit": _string("the pushed commit; empty for a call without push details and for "
                          "a package event"),
        "ref": _string("the pushed full ref; for a container package event the pushed OCI "
                       "reference `oci://<registry>/<owner>/<name>:<version>`; empty for a "
                       "call without push details"),
        "receiver": _string("`namespace/name` of the Receiver"),
        "targets": {"type": "array", "items": {"allOf": [_TARGET_REF, _object({
            "state": {"enum": _TARGET_STATES},
            "error": _string("present only when `state` is `failed`")}, ("state",))]}},
        "tracked": {"type": "array", "items": _TARGET_REF},
        "skipped": {"type": "array", "items": _TARGET_REF},
        "skipped_unrelated": {"type": "integer", "minimum": 0},
    }, ("delivery", "commit", "ref", "receiver", "targets", "tracked", "skipped",
        "skipped_unrelated")),
    "HookNoAction": {"oneOf": [
        _object({"status": {"const": "pong"}}, ("status",)),
        _object({"status": {"const": "ignored"}, "event": _string(maxLength=64)},
                ("status", "event")),
        _object({"status": {"const": "duplicate"}, "delivery": _string(maxLength=128)},
                ("status", "delivery")),
    ]},
    "Delivery": _object({
        "delivery": _string(), "receiver": _string(),
        "ref": _string("as in the hook's reply: a full ref, or the pushed OCI reference"),
        "commit": _string("the pushed commit; empty for a package event, whose consumers are "
                          "followed at the commit the pushed artifact names"),
        "received": _string("when the push arrived (UTC)", format="date-time"),
        "outcome": {"enum": list(OUTCOMES), "description": "only `ready` means deployed: "
                    "`superseded` is final, but Flux went to a later commit before it "
                    "reported this one"},
        "supersededBy": _string("with outcome `superseded`: the commit Flux went to instead"),
        "final": {"type": "boolean"},
        "omitted_targets": {"type": "integer", "minimum": 1},
        "targets": {"type": "array", "items": {"allOf": [_OBJECT_KEY, _object({
            "role": {"enum": ["annotate", "track"]},
            "state": {"enum": _TARGET_STATES},
            "detail": _object({"reason": _string(), "message": _string()}),
            "supersededBy": _string("a `skipped` target taken to a later commit: that commit"),
        }, ("role", "state"))]}},
    }, ("delivery", "receiver", "ref", "commit", "received", "outcome", "final", "targets")),
    "FluxEvent": _object({
        "involvedObject": _object({
            "kind": _string(minLength=1), "namespace": _string(minLength=1),
            "name": _string(minLength=1), "apiVersion": _string(), "uid": _string(),
        }, ("kind", "namespace", "name")),
        "severity": {"enum": ["info", "error", "trace"]},
        "reason": _string(minLength=1),
        "message": _string("cut to 32,768 characters"),
        "timestamp": _string(),
        "reportingController": _string(),
        "metadata": {"type": "object", "additionalProperties": _string(),
                     "description": "prefixed or unprefixed keys (`revision`, `commit`, "
                                    "`commit_status`, ...); over-long keys and values are ignored"},
    }, ("involvedObject", "severity", "reason"),
        description="A Flux notification-controller event, as a `generic` or `generic-hmac` "
                    "Provider sends it."),
    "EventAccepted": _object({
        "accepted": {"const": True},
        "statuses": {"type": "integer", "minimum": 0,
                     "description": "status posts queued: one per Gitea instance hosting the "
                                    "repository; 0 when the event maps to no status"},
    }, ("accepted", "statuses")),
    "Ready": _object({
        "status": {"const": "ready"},
        "objects": {"type": "integer", "minimum": 0},
        "receivers": {"type": "integer", "minimum": 0},
        "kinds_not_installed": {
            "type": "array", "items": {"type": "string"},
            "description": "Optional kinds (ImageRepository, ImagePolicy, HelmRepository, "
                           "HelmChart) whose CRD the API server does not serve: not cached, "
                           "looked for again every minute."},
        "kinds_not_permitted": {
            "type": "array", "items": {"type": "string"},
            "description": "Optional kinds (ImageRepository, ImagePolicy, HelmRepository, "
                           "HelmChart) the bridge's RBAC may not list or watch (403): not "
                           "cached, looked for again every minute."},
    }, ("status", "objects", "receivers")),
}

SECURITY_SCHEMES: dict[str, Schema] = {
    "giteaSignature": {
        "type": "apiKey", "in": "header", "name": "X-Gitea-Signature",
        "description": "`github` Receivers: hex HMAC-SHA256 of the JSON document (for the form "
                       "content type, of the decoded `payload` field) with the Receiver's token."},
    "hubSignature256": {
        "type": "apiKey", "in": "header", "name": "X-Hub-Signature-256",
        "description": "`github` Receivers: `sha256=<hex>`, as `X-Gitea-Signature`. SHA-1 "
                       "(`X-Hub-Signature`) alone is refused."},
    "hookSignature": {
        "type": "apiKey", "in": "header", "name": "X-Signature",
        "description": "`generic-hmac` Receivers: `sha1=`, `sha256=` or `sha512=<hex HMAC of the "
                       "raw body>`. `generic` Receivers: `t=<unix>,v1=<hex HMAC-SHA256 of "
                       "\"<unix>.\" + body>`, within 300 s, each accepted once."},
    "readSignature": {
        "type": "apiKey", "in": "header", "name": "X-Signature",
        "description": "`t=<unix>,v1=<hex>`: HMAC-SHA256 of `\"<unix>.GET /deliveries/<id>\"` "
                       "under the key hex(HMAC-SHA256(token, \"gitea-flux-bridge delivery-read "
                       "v1\")); within 300 s. Never valid as a push signature, nor a push "
                       "signature as it (`gitea-flux-bridge sign --scheme read`)."},
    "eventSignature": {
        "type": "apiKey", "in": "header", "name": "X-Signature",
        "description": "`sha256=<hex HMAC-SHA256 of the raw body>` with `events.hmac_token` "
                       "(a Flux `generic-hmac` Provider)."},
    "bearer": {
        "type": "http", "scheme": "bearer",
        "description": "On `/hook` and `/deliveries`: the Receiver's token (`generic` Receivers "
                       "for pushes). On `/events`: `events.bearer_token`."},
}


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
             "schema": _string("64 lower-case hex characters")},
            _header("X-Gitea-Event", "`push` (handled), `ping` (answered), anything else "
                    "(ignored); absent counts as a push"),
            _header("X-GitHub-Event", "read when `X-Gitea-Event` is absent"),
            _header("X-Gitea-Delivery", "Gitea's delivery id (first 128 characters kept): "
                    "deduplicated per Receiver"),
        ],
        "requestBody": {"required": False, "content": {
            JSON: {"schema": {"anyOf": [_ref("GiteaPush"), _ref("ActionsBody"),
                                        {"type": "object", "maxProperties": 0},
                                        {"type": "null"}]}},
            FORM: {"schema": _ref("FormPush")},
        }},
        "responses": {
            "200": _json("Nothing to do: `ping`, another event, or a repeated "
                         "`X-Gitea-Delivery`.", _ref("HookNoAction")),
            "202": {**_json("Accepted: the targets, in annotation order, with their reasons.",
                            _ref("HookAccepted")),
                    "links": {"FollowDelivery": {
                        "operationId": "delivery",
                        "parameters": {"id": "$response.body#/delivery"},
                        "description": "Follow the delivery (with the same Receiver's token)."}}},
            "400": _bad_request("request body is not valid JSON",
                                "request body is not a JSON object",
                                "form body has no payload field",
                                "form body has more than 50 fields"),
            "401": _error("Missing, malformed, stale, replayed or wrong credential; always "
                          "the same body.", "unauthorized"),
            "404": _error("No Receiver with a usable token has this path.",
                          "no receiver for this path", "not found"),
            "408": TOO_SLOW,
            "413": _error("The body is larger than `body_limit_bytes` (default shown).",
                          too_large),
            "415": _error("Neither JSON nor form-encoded; a form body on a `generic` or "
                          "`generic-hmac` Receiver.",
                          "content type must be application/json (or application/x-www-form-"
                          "urlencoded for Gitea webhooks)",
                          "content type must be application/json"),
            "422": _error("A payload without what routing needs, or a field over its limit.",
                          "payload has no ref", "sha must be a full 40- or 64-character commit id",
                          "<field> is longer than <n> bytes", "<field> is not valid UTF-8 text"),
            "429": _error("The Receiver is over `rate_limit`.", "rate limit exceeded"),
            "500": INTERNAL,
            "503": _error("Not ready, the Receiver is suspended, or too many deliveries are in "
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
             "schema": _string("the `delivery` of a 202 reply (opaque, URL-safe)",
                               maxLength=6000)},
            {"name": "wait", "in": "query", "required": False,
             "description": "stream until the delivery settles or this many seconds pass "
                            "(capped at `deliveries.max_wait_seconds`)",
             "schema": {"type": "number", "minimum": 0}},
        ],
        "responses": {
            "200": {"description": "The delivery now; with `wait`, newline-delimited JSON: "
                                   "the delivery, one line per change, then possibly a timeout "
                                   "marker or a retry line.",
                    "content": {JSON: {"schema": _ref("Delivery")},
                                NDJSON: {"schema": {"type": "string"}}}},
            "400": _bad_request("wait must be a number of seconds"),
            "404": _error("Unknown, forged or unauthorised.", "no such delivery", "not found"),
            "500": INTERNAL,
        },
    }}


def _events() -> dict[str, Any]:
    return {"post": {
        "operationId": "event",
        "summary": "A Flux event, turned into Gitea commit statuses",
        "security": [{"eventSignature": []}, {"bearer": []}],
        "requestBody": {"required": True, "content": {JSON: {"schema": _ref("FluxEvent")}}},
        "responses": {
            "202": _json("Accepted.", _ref("EventAccepted")),
            "400": _bad_request("body is not valid JSON", "body is nested too deeply"),
            "401": _error("No valid credential; `sha1=`/`sha512=` signatures; no events token "
                          "configured.", "unauthorized"),
            "408": TOO_SLOW,
            "413": _error("Above `body_limit_bytes`.", "body too large"),
            "415": _error("Another content type.", "content type must be application/json"),
            "422": _error("An event without what a status needs.", "event must be a JSON object",
                          "event has no involvedObject", "event has no reason",
                          "severity must be one of info, error, trace",
                          "metadata must be an object of strings"),
            "500": INTERNAL,
            "503": _error("Stopping, or the status queue is full.", "shutting down",
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
            {"name": "owner", "in": "path", "required": True, "schema": _string()},
            {"name": "repo", "in": "path", "required": True, "schema": _string()},
            query("branch", "only sources following this branch count"),
            query("cluster", "a name other than `cluster_name` reads `unknown`"),
            query("style", "`flat` (default) or `flat-square`; anything else renders flat"),
            query("token", "required when `badge_key` is set (`gitea-flux-bridge badge-url`)"),
            _header("If-None-Match", "the ETag of a badge already held"),
        ],
        "responses": {
            "200": {"description": "The badge.", "content": {SVG: {"schema": {"type": "string"}}},
                    "headers": {k: {"schema": v} for k, v in cache.items()}},
            "304": {"description": "The badge has the ETag in `If-None-Match`.",
                    "headers": {k: {"schema": v} for k, v in cache.items()}},
            "400": BAD_HEAD,
            "404": _error("A path that leaves `/badge/` once normalised.", "not found"),
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
        "503": _error("Not ready.", "caches are not synced",
                      "cannot reach Kubernetes for some kinds", "receivers are being indexed",
                      "draining")})
    readyz["get"]["responses"]["200"] = _json("Ready.", _ref("Ready"))
    openapi = _plain("openapi", "This document", JSON)
    openapi["get"]["responses"]["200"] = _json("The OpenAPI document.", {"type": "object"})
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
        "paths": {
            "/hook/{digest}": _hook(),
            "/deliveries/{id}": _deliveries(),
            "/events": _events(),
            "/badge/{owner}/{repo}.svg": _badge(),
            "/healthz": _plain("healthz", "Liveness", TEXT),
            "/readyz": readyz,
            "/metrics": _plain("metrics", "Prometheus metrics (text format)", TEXT),
            "/openapi.json": openapi,
        },
        "components": {"schemas": SCHEMAS, "securitySchemes": SECURITY_SCHEMES},
    }


@functools.cache
def rendered() -> bytes:
    """The document as served and as kept in docs/openapi.json (stable key order)."""
    return (json.dumps(document(), indent=2, ensure_ascii=False) + "\n").encode()


if __name__ == "__main__":
    import sys

    sys.stdout.buffer.write(rendered())
