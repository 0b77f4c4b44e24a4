"""The OpenAPI document's building blocks: media types, schema helpers, the shared error
answers and every schema (`SCHEMAS`). `openapi` puts the operations together from them."""

from __future__ import annotations

from typing import Any

from receiver.delivery.view import OUTCOMES

Schema = dict[str, Any]

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
NDJSON = "application/x-ndjson"
SVG = "image/svg+xml"
TEXT = "text/plain"
SHA = "^([0-9a-f]{40}|[0-9a-f]{64})$"



def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def string(description: str = "", **extra: Any) -> Schema:
    out: Schema = {"type": "string", **extra}
    if description:
        out["description"] = description
    return out


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), *,
            description: str = "", closed: bool = False) -> Schema:
    out: Schema = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    if description:
        out["description"] = description
    if closed:
        out["additionalProperties"] = False
    return out


def error_response(description: str, *messages: str) -> dict[str, Any]:
    """A response whose body is the Error shape; `messages` are the answers it may carry."""
    text = description
    if messages:
        text += " Messages: " + "; ".join(f"`{m}`" for m in messages) + "."
    return {"description": text, "content": {JSON: {"schema": ref("Error")}}}


def json_response(description: str, schema: Schema, **headers: Schema) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        out["headers"] = {name: {"schema": s} for name, s in headers.items()}
    return out


def header(name: str, description: str, **schema: Any) -> Schema:
    return {"name": name, "in": "header", "required": False, "description": description,
            "schema": {"type": "string", **schema}}


# uvicorn refuses a request head it cannot parse (for example a request line over about
# 64 KiB) before the app runs, in plain text. Any operation can get it.
UNPARSABLE = ("A request line or head the HTTP server cannot parse (for example a URL over "
              "about 64 KiB) is refused by the server itself: `Invalid HTTP request received.` "
              "in plain text, and the connection is closed.")
PLAIN_400 = {TEXT: {"schema": {"type": "string"}}}
BAD_HEAD = {"description": UNPARSABLE, "content": PLAIN_400}


def bad_request(*messages: str) -> dict[str, Any]:
    """400 from the app (JSON) or from the HTTP server (plain text, see UNPARSABLE)."""
    out = error_response("A request the app cannot decode. " + UNPARSABLE, *messages)
    out["content"].update(PLAIN_400)
    return out


INTERNAL = error_response("An unexpected failure; never a traceback. The fuzz tests keep this from "
                  "happening.", "internal error")
TARGET_TOO_LONG = error_response("The path and query are longer than 16 KiB.", "request target too long")
HEAD_TOO_LARGE = error_response("More than 100 headers, or more than 64 KiB of them.",
                        "request headers too large")
TOO_SLOW = error_response("The request body did not arrive within `server.body_timeout_seconds`; the "
                  "connection is closed.", "request body not received in time")

TARGET_REF = obj({
    "apiVersion": string(), "kind": string(), "namespace": string(), "name": string(),
    "reason": string("why the push selects or leaves out this object"),
}, ("kind", "namespace", "name", "reason"))

OBJECT_KEY = obj({
    "apiVersion": string(), "kind": string(), "namespace": string(), "name": string(),
}, ("kind", "namespace", "name"))

TARGET_STATES = ["queued", "annotated", "reconciling", "ready", "failed", "timed_out",
                  "skipped"]

SCHEMAS: dict[str, Schema] = {
    "Error": obj({"error": string("what went wrong; the same text for every 401")},
                     ("error",), description="Every error body. `/readyz` may add detail "
                     "fields (`failing`: the kinds whose watch keeps failing)."),
    "GiteaPush": obj({
        "ref": string("`refs/heads/<branch>`, `refs/tags/<tag>`; a short name means a branch",
                       maxLength=1024),
        "after": string("the new commit; all zeros when the ref was deleted"),
        "head_commit": {"type": ["object", "null"], "properties": {"id": string()}},
        "total_commits": {"type": "integer", "minimum": 0},
        "commits": {"type": "array", "items": obj({
            kind: {"type": "array", "items": string(maxLength=4096)}
            for kind in ("added", "removed", "modified")})},
        "repository": obj({
            "full_name": string(maxLength=256),
            "clone_url": string(maxLength=2048),
            "html_url": string(maxLength=2048),
            "ssh_url": string(maxLength=2048),
        }),
    }, ("ref", "repository"), description="Gitea's push payload (the fields the bridge reads). "
       "Limits are in UTF-8 bytes; a longer field or a lone UTF-16 surrogate is a 422."),
    "ActionsBody": obj({
        "repository": string("the repository's clone or web URL", maxLength=2048),
        "ref": string("a full ref; a short name means a branch", minLength=1, maxLength=1024),
        "sha": string("the full commit id", pattern=SHA),
        "paths": {"type": "array", "maxItems": 20000, "items": string(maxLength=4096),
                  "description": "changed files; without it every consumer of the matched "
                                 "sources counts as touched"},
    }, ("repository", "ref", "sha"), description="What a Gitea Actions step sends. `{}`, `null` "
       "or an empty body carry no push details: every listed object is annotated, as Flux does."),
    "FormPush": obj({"payload": string("the Gitea push payload as JSON text")},
                        ("payload",), description="Gitea's form content type (`github` Receivers)."),
    "HookAccepted": obj({
        "delivery": string("the delivery's signed record, for `GET /deliveries/{id}`"),
        "mark": string("short id written on the annotated objects"),
        "commit": string("the pushed commit; empty for a call without push details and for "
                          "a package event"),
        "ref": string("the pushed full ref; for a container package event the pushed OCI "
                       "reference `oci://<registry>/<owner>/<name>:<version>`; empty for a "
                       "call without push details"),
        "receiver": string("`namespace/name` of the Receiver"),
        "targets": {"type": "array", "items": {"allOf": [TARGET_REF, obj({
            "state": {"enum": TARGET_STATES},
            "error": string("present only when `state` is `failed`")}, ("state",))]}},
        "tracked": {"type": "array", "items": TARGET_REF},
        "skipped": {"type": "array", "items": TARGET_REF},
        "skipped_unrelated": {"type": "integer", "minimum": 0},
        "skipped_elsewhere": {"type": "integer", "minimum": 1, "description": (
            "skipped objects in other namespaces that the Receiver does not list: counted, "
            "not named")},
    }, ("delivery", "commit", "ref", "receiver", "targets", "tracked", "skipped",
        "skipped_unrelated")),
    "HookNoAction": {"oneOf": [
        obj({"status": {"const": "pong"}}, ("status",)),
        obj({"status": {"const": "ignored"}, "event": string(maxLength=64)},
                ("status", "event")),
        obj({"status": {"const": "duplicate"}, "delivery": string(maxLength=128)},
                ("status", "delivery")),
    ]},
    "Delivery": obj({
        "delivery": string(), "receiver": string(),
        "ref": string("as in the hook's reply: a full ref, or the pushed OCI reference"),
        "commit": string("the pushed commit; empty for a package event, whose consumers are "
                          "followed at the commit the pushed artifact names"),
        "received": string("when the push arrived (UTC)", format="date-time"),
        "outcome": {"enum": list(OUTCOMES), "description": "only `ready` means deployed: "
                    "`superseded` is final, but Flux went to a later commit before it "
                    "reported this one"},
        "supersededBy": string("with outcome `superseded`: the commit Flux went to instead"),
        "final": {"type": "boolean"},
        "omitted_targets": {"type": "integer", "minimum": 1},
        "targets": {"type": "array", "items": {"allOf": [OBJECT_KEY, obj({
            "role": {"enum": ["annotate", "track", "canary"],
                     "description": "`canary`: a Flagger canary (`?canaries=true`)"},
            "state": {"enum": TARGET_STATES},
            "detail": obj({"reason": string(), "message": string()}),
            "supersededBy": string("a `skipped` target taken to a later commit: that commit"),
        }, ("role", "state"))]}},
    }, ("delivery", "receiver", "ref", "commit", "received", "outcome", "final", "targets")),
    "FluxEvent": obj({
        "involvedObject": obj({
            "kind": string(minLength=1), "namespace": string(minLength=1),
            "name": string(minLength=1), "apiVersion": string(), "uid": string(),
        }, ("kind", "namespace", "name")),
        "severity": {"enum": ["info", "error", "trace"]},
        "reason": string(minLength=1),
        "message": string("cut to 32,768 characters"),
        "timestamp": string(),
        "reportingController": string(),
        "metadata": {"type": "object", "additionalProperties": string(),
                     "description": "prefixed or unprefixed keys (`revision`, `commit`, "
                                    "`commit_status`, ...); over-long keys and values are ignored"},
    }, ("involvedObject", "severity", "reason"),
        description="A Flux notification-controller event, as a `generic` or `generic-hmac` "
                    "Provider sends it."),
    "EventAccepted": obj({
        "accepted": {"const": True},
        "statuses": {"type": "integer", "minimum": 0,
                     "description": "status posts queued: one per Gitea instance hosting the "
                                    "repository; 0 when the event maps to no status"},
    }, ("accepted", "statuses")),
    "Ready": obj({
        "status": {"const": "ready"},
        "objects": {"type": "integer", "minimum": 0},
        "receivers": {"type": "integer", "minimum": 0},
        "kinds_not_installed": {
            "type": "array", "items": {"type": "string"},
            "description": "Optional kinds (ImageRepository, ImagePolicy, HelmRepository, "
                           "HelmChart, ResourceSetInputProvider) whose CRD the API server does "
                           "not serve: not cached, looked for again every minute."},
        "kinds_not_permitted": {
            "type": "array", "items": {"type": "string"},
            "description": "Optional kinds (ImageRepository, ImagePolicy, HelmRepository, "
                           "HelmChart, ResourceSetInputProvider) the bridge's RBAC may not list "
                           "or watch (403): not cached, looked for again every minute."},
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
