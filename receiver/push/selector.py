"""Which push, if any, an authenticated body describes. Pure; the service and `plan` share it.

notification-controller checks a request's signature and then reconciles every object its
Receiver lists, whatever the body says. The bridge reads more out of a body only when the body
has the shape of a push, and decides that by the body alone, never by headers or Receiver type:

* a **Gitea push payload**: a JSON object carrying a push's own fields (`after`, `commits`,
  `head_commit`; what Gitea's PushPayload has and its other events lack);
* an **Actions body**: a JSON object naming a commit (`sha`) whose `repository` is a string, the
  bridge's own small format (a Gitea `create` or `release` event has a `sha` too, but its
  `repository` is an object: another Gitea event, no push details);
* a **Gitea package event**: a JSON object with a `package` object and none of a push's
  keys (Gitea's PackagePayload: a container or Helm version pushed to, or deleted from, its
  registry); routed by `receiver.push.package_routing`;
* a **Gitea pull request event**: a JSON object with a `pull_request` object and a `number`, and
  no `comment` (a comment on a pull request carries the pull request too); routed to the input
  providers it changes by `receiver.push.input_providers`;
* a **Gitea create or delete event**: a JSON object with a `ref_type` and a `repository`
  object (CreatePayload, DeletePayload): a branch or tag created or deleted, routed alike;
* anything else (empty, `{}`, `{"action": "deploy"}`, a non-object, not JSON at all) carries
  **no push details**: every listed object is reconciled, sources first, as Flux does, and the
  reply says why.

Refusals are only those Flux makes too, or a body that claims to be a push and contradicts
itself (a push without a repository, a commit id that is not one, a field over its limit):
* on a `github` Receiver, Flux parses the body as a GitHub webhook (go-github `ParseWebHook`),
  so a body that is not JSON (400) or not a JSON object (422) is refused there as well;
* `generic` and `generic-hmac` Receivers take any bytes, as Flux's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from receiver.bounds import parse_json
from receiver.gitea.package_payloads import PackagePush, parse_gitea_package
from receiver.gitea.payloads import PayloadError, Push, parse_actions_body, parse_gitea_push, push_document
from receiver.gitea.ref_payloads import (
    PullRequestEvent,
    RefEvent,
    parse_gitea_pull_request,
    parse_gitea_ref_event,
)

# Keys only a Gitea (or GitHub) push payload has; a `create` or `release` event body has none.
PUSH_KEYS = frozenset({"after", "commits", "head_commit"})

GITEA_PUSH = "gitea-push"
ACTIONS_BODY = "actions-body"
GITEA_PACKAGE = "gitea-package"
GITEA_PULL_REQUEST = "gitea-pull-request"
GITEA_REF = "gitea-ref"  # a create or delete event of a branch or tag
GITEA_OTHER = "gitea-other"  # another Gitea event (create, release, ...): no push details
NO_DETAILS = "none"


class PayloadRefused(ValueError):
    """The body is refused: `status` is the HTTP answer, `outcome` the metric label."""

    def __init__(self, status: int, message: str, outcome: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class Selection:
    """What the body was read as. `push` is None exactly when it carries no push details,
    and then `note` says why (it goes into the reply and every target's reason)."""

    shape: str  # GITEA_PUSH, ACTIONS_BODY, GITEA_PACKAGE, GITEA_PULL_REQUEST, GITEA_REF,
    # GITEA_OTHER or NO_DETAILS
    push: Push | None
    note: str = ""
    package: PackagePush | None = None  # set exactly for GITEA_PACKAGE
    pull_request: PullRequestEvent | None = None  # set exactly for GITEA_PULL_REQUEST
    ref_event: RefEvent | None = None  # set exactly for GITEA_REF


def _load(document: bytes) -> tuple[bool, Any]:
    try:
        return True, parse_json(document)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False, None


def shape_of(doc: Any) -> str:
    """The shape of an already decoded JSON document."""
    if not isinstance(doc, dict):
        return NO_DETAILS
    if PUSH_KEYS & doc.keys():
        return GITEA_PUSH
    if isinstance(doc.get("package"), dict):
        return GITEA_PACKAGE
    if isinstance(doc.get("pull_request"), dict) and "number" in doc and "comment" not in doc:
        return GITEA_PULL_REQUEST
    if "ref_type" in doc and isinstance(doc.get("repository"), dict):
        return GITEA_REF
    if isinstance(doc.get("repository"), dict):
        return GITEA_OTHER
    if "sha" in doc:
        return ACTIONS_BODY
    return NO_DETAILS


def select_payload(receiver_type: str, document: bytes) -> Selection:
    """Read `document` (the bytes the sender signed: the raw body, or a form's decoded
    `payload` field) for a Receiver of `receiver_type` (every type alike, as Flux reads none
    of them). Raises PayloadRefused."""
    del receiver_type  # kept for callers: the decision is the body's shape alone
    if not document.strip():
        return Selection(NO_DETAILS, None, "no push details: the body is empty")
    pushed = push_document(document)
    if pushed is not None:  # the usual body, read by the compiled decoder (same answer)
        try:
            return Selection(GITEA_PUSH, parse_gitea_push(pushed))
        except PayloadError as exc:
            raise PayloadRefused(422, str(exc), "unprocessable") from None
    parsed, doc = _load(document)
    if not parsed:
        return Selection(NO_DETAILS, None, "no push details: the body is not JSON")
    if doc is None:
        return Selection(NO_DETAILS, None, "no push details: the body is null")
    if not isinstance(doc, dict):
        return Selection(NO_DETAILS, None, "no push details: the body is not a JSON object")
    shape = shape_of(doc)
    try:
        if shape == GITEA_PUSH:
            return Selection(shape, parse_gitea_push(doc))
        if shape == ACTIONS_BODY:
            return Selection(shape, parse_actions_body(doc))
        if shape == GITEA_PACKAGE:
            return Selection(shape, None, package=parse_gitea_package(doc))
        if shape == GITEA_PULL_REQUEST:
            return Selection(shape, None, pull_request=parse_gitea_pull_request(doc))
        if shape == GITEA_REF:
            return Selection(shape, None, ref_event=parse_gitea_ref_event(doc))
    except PayloadError as exc:
        raise PayloadRefused(422, str(exc), "unprocessable") from None
    if shape == GITEA_OTHER:
        return Selection(shape, None, "no push details: a Gitea event other than a push")
    return Selection(NO_DETAILS, None,
                     "no push details: the body is neither a Gitea push nor an Actions body")
