"""Flux's own notification-controller as the oracle for the bridge's `/hook/{digest}`.

The bridge claims to be a drop-in for a Flux Receiver (same paths, same authentication) that
reconciles less. This module holds it to that, request by request, against the real
notification-controller, with real sources that fetch and real Kustomizations that apply.

Setup (one environment for the module): etcd + kube-apiserver with an audit log, Gitea,
source-, kustomize- and notification-controller, and the bridge with its default security
settings. For each case (a Receiver type and spec) Gitea holds a repository `oracle/<case>`
(`apps/` and `infra/`, a ConfigMap each) whose webhook points at a capture server, so the test
holds Gitea's own push deliveries, signed by Gitea. Each case has twin namespaces of identical
shape, `orc-nc-<case>` (requests go to notification-controller) and `orc-br-<case>` (requests go
to the bridge), each with the Receiver's Secret, a GitRepository `fleet` on the case's
repository (notification-controller's twin under the host name `localhost`, so the bridge does
not count it among the pushed repository's sources and follow it), and Kustomizations `apps`
(./apps), `infra` (./infra) and `paused` (./apps, suspended), all listed by the Receiver
`hook`. Twins keep the two measurements independent (the bridge's follow-up on a push must not
see notification-controller's patches) and let the cases run in parallel; every Kustomization
is Ready at the repository's first commit before the first request.

Each row of `ROWS` is one request, built when its turn comes (a push row commits to Gitea
first and takes Gitea's webhook for that commit). It goes to notification-controller's
receiver and then, identical but for the namespace in the path, to the bridge. For each side
the test reads, from the API server, which listed objects' `reconcile.fluxcd.io/requestedAt`
changed (for the bridge: once its delivery has settled, `GET /deliveries/{id}?wait=`), and
checks it against the audit log: the PATCHes notification-controller and the bridge made in
that request's window. Then the rules:

(a) a request Flux refuses (anything but 200) the bridge refuses, and annotates nothing;
(b) a request Flux accepts the bridge accepts, unless the row names a deliberate stricter rule
    (`STRICTER`), which is checked against the request (the signature really is SHA-1 only,
    the timestamp really is stale, ...);
(c) the bridge annotates a subset of what Flux annotates, and each object Flux annotates that
    the bridge leaves alone has a reason from `REASONS` that holds for the actual push: the
    files Gitea says the commit changed are not under the Kustomization's `spec.path`, the
    object is suspended, the pushed ref is not the source's branch, kustomize-controller had
    already started on the commit by itself, the event is not a push, the delivery id was
    delivered before. "Some state" explains nothing.

The table (request, Flux's code, the bridge's code, what each annotated, why) is printed past
pytest's output capture, so CI's log shows it, passing or failing.

    python -m pytest tests/e2e/test_e2e_flux_oracle.py -q -s
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_plus

import httpx
import pytest

from receiver.delivery import marks as delivery_marks
from tests.e2e import e2e_env as e2e
from tests.e2e.e2e_harness import BridgeProcess, FluxControllers, Gitea
from tests.e2e.oracle_env import AuditTail, Captured, WebhookCapture, commit_files
from tests.e2e.realk8s import ControlPlane, audit_policy

pytestmark = pytest.mark.e2e

ORG = "oracle"
RECEIVER = "hook"
OBJECTS = (("GitRepository", "fleet"), ("Kustomization", "apps"), ("Kustomization", "infra"),
           ("Kustomization", "paused"))
KUSTOMIZATIONS = {"apps": ("./apps", False), "infra": ("./infra", False),
                  "paused": ("./apps", True)}  # name -> (spec.path, spec.suspend)
DEPLOY_TIMEOUT = 180.0  # every twin's Kustomizations Ready at the first commit
DELIVERY_WAIT = 150.0  # a bridge delivery settles (source fetch, apply) within this
BRIDGE_TYPES = frozenset({"github", "generic", "generic-hmac"})  # what the bridge serves


def configmap(name: str, **data: str) -> str:
    """A ConfigMap without a namespace: each twin's Kustomization puts it in its own."""
    lines = "".join(f'  {k}: "{v}"\n' for k, v in data.items())
    return f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n{lines}"


def hmac_hex(algorithm: str, key: str, body: bytes) -> str:
    return hmac.new(key.encode(), body, getattr(hashlib, algorithm)).hexdigest()


# -- cases and their environment -------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    type: str
    events: tuple[str, ...] | None = None
    resource_filter: str = ""
    suspend: bool = False
    filters: tuple[tuple[str, str], ...] = ()  # (object name, its spec.resources[].filter)

    def ns(self, side: str) -> str:
        return f"orc-{side}-{self.name}"

    @property
    def label(self) -> str:
        extra = f" events={list(self.events)}" if self.events is not None else ""
        extra += " resourceFilter" if self.resource_filter else ""
        extra += " resources[].filter" if self.filters else ""
        extra += " suspended" if self.suspend else ""
        return self.type + extra


CASES = {c.name: c for c in (
    Case("gitea", "github", events=("push",)),
    Case("gitea-any", "github"),
    Case("hmac", "generic-hmac"),
    Case("generic", "generic"),
    Case("filter", "generic-hmac",
         resource_filter="req.ref == 'refs/heads/main' && res.metadata.name != 'infra'"),
    Case("per-resource", "generic-hmac", filters=(("infra", "'infra' in req"),)),
    Case("suspended", "github", events=("push",), suspend=True),
    Case("gitlab", "gitlab"),
)}


@dataclass(frozen=True)
class PushFact:
    """A commit the test pushed, as Gitea has it: what explanations are checked against."""

    repo: str
    ref: str
    sha: str
    files: frozenset[str]

    @property
    def branch(self) -> str:
        return self.ref.removeprefix("refs/heads/")


@dataclass
class Sent:
    """One request as sent to both sides (only the path's namespace differs)."""

    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    path: str | None = None  # instead of the Receiver's own path (an unknown one)
    push: PushFact | None = None
    at: float = 0.0  # wall clock when sent (a timestamped signature is judged against it)


@dataclass
class Row:
    case: Case
    label: str
    stricter: str
    sent: Sent
    flux_code: int = 0
    bridge_code: int = 0
    flux_set: frozenset[str] = frozenset()
    bridge_set: frozenset[str] = frozenset()
    flux_patched: frozenset[str] = frozenset()  # from the audit log
    bridge_patched: frozenset[str] = frozenset()
    reply: dict[str, Any] = field(default_factory=dict)
    delivery: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    finding: str = ""  # a KNOWN_BROADER entry this row reproduces
    settle: float = 0.0  # seconds from the bridge's 202 to its delivery settled
    problems: list[str] = field(default_factory=list)

    @property
    def flux_accepted(self) -> bool:
        return self.flux_code == 200

    @property
    def bridge_accepted(self) -> bool:
        return 200 <= self.bridge_code < 300


@dataclass
class Oracle:
    plane: ControlPlane
    gitea: Gitea
    flux: FluxControllers
    bridge: BridgeProcess
    capture: WebhookCapture
    audit: AuditTail
    tokens: dict[str, str]  # case -> the Receiver's token (both twins)
    paths: dict[str, str] = field(default_factory=dict)  # namespace -> /hook/<digest>
    timings: dict[str, float] = field(default_factory=dict)

    def requested(self, ns: str) -> dict[str, str]:
        """Each listed object's requestedAt now (from the API server)."""
        found = {}
        for kind, name in OBJECTS:
            obj = e2e.get_object(self.plane, kind, ns, name)
            found[f"{kind}/{name}"] = (obj["metadata"].get("annotations") or {}).get(
                e2e.RECONCILE, "")
        return found

    def changed(self, ns: str, before: dict[str, str]) -> frozenset[str]:
        return frozenset(k for k, v in self.requested(ns).items() if v != before.get(k, ""))

    def get(self, ns: str, obj: str) -> dict[str, Any]:
        kind, name = obj.split("/")
        return e2e.get_object(self.plane, kind, ns, name)


class CaseRun:
    """One case's rows, in order, with what earlier rows sent (replays refer back to them)."""

    def __init__(self, oracle: Oracle, case: Case) -> None:
        self.oracle = oracle
        self.case = case
        self.token = oracle.tokens[case.name]
        self.rows: list[Row] = []
        self.pushes = 0
        self.end_offset = 0

    # -- what rows build requests from ---------------------------------------------------------

    def push(self, files: dict[str, str], message: str, branch: str = "main") -> PushFact:
        """A commit on `branch` (made from main when it is new), as Gitea reports it."""
        self.pushes += 1
        gitea = self.oracle.gitea
        new = None if branch == "main" else branch
        sha = gitea.commit_files(ORG, self.case.name, files, message, new_branch=new)
        return PushFact(f"{gitea.url}/{ORG}/{self.case.name}", f"refs/heads/{branch}", sha,
                        commit_files(gitea, ORG, self.case.name, sha))

    def push_apps(self, *, infra: bool = False, branch: str = "main") -> PushFact:
        stamp = f"{self.case.name}-{self.pushes}"
        files = {"apps/settings.yaml": configmap("apps-settings", release=stamp)}
        if infra:
            files["infra/settings.yaml"] = configmap("infra-settings", tier=stamp)
        return self.push(files, f"apps{' and infra' if infra else ''}: {stamp}", branch)

    def push_infra(self) -> PushFact:
        stamp = f"{self.case.name}-{self.pushes}"
        return self.push({"infra/settings.yaml": configmap("infra-settings", tier=stamp)},
                         f"infra: {stamp}")

    def webhook(self, push: PushFact) -> Captured:
        return self.oracle.capture.wait(push.sha)

    def actions_body(self, push: PushFact, ref: str | None = None) -> bytes:
        """What an Actions step sends: the repository, the ref, the commit, the paths."""
        return json.dumps({"repository": push.repo, "ref": ref or push.ref, "sha": push.sha,
                           "paths": sorted(push.files)}).encode()

    def earlier(self, predicate: Callable[[Row], bool]) -> Row | None:
        return next((r for r in self.rows if predicate(r)), None)


# -- the rows --------------------------------------------------------------------------------------

Build = Callable[[CaseRun], Sent]


def gitea_push(drop: tuple[str, ...] = (), resign: str = "", **override: str) -> Build:
    """A fresh push touching apps, sent as Gitea delivered it, less the `drop`ped headers, with
    `override`; `resign`: every signature header recomputed with that key instead."""
    def build(run: CaseRun) -> Sent:
        push = run.push_apps()
        got = run.webhook(push)
        headers = got.sent_headers(drop, **override)
        if resign:
            sig = hmac_hex("sha256", resign, got.body)
            headers.update({"x-gitea-signature": sig, "x-gogs-signature": sig,
                            "x-hub-signature-256": f"sha256={sig}",
                            "x-hub-signature": f"sha1={hmac_hex('sha1', resign, got.body)}"})
        return Sent(got.body, headers, push=push)
    return build


def gitea_webhook(make: Callable[[CaseRun], PushFact]) -> Build:
    def build(run: CaseRun) -> Sent:
        push = make(run)
        got = run.webhook(push)
        return Sent(got.body, got.sent_headers(), push=push)
    return build


def gitea_form(run: CaseRun) -> Sent:
    """A fresh push as a Gitea webhook of content type form sends it: the body is
    `payload=<the JSON, URL-encoded>`, the signatures are Gitea's, over the JSON."""
    push = run.push_apps()
    got = run.webhook(push)
    body = b"payload=" + quote_plus(got.body.decode()).encode()
    return Sent(body, got.sent_headers(content_type="application/x-www-form-urlencoded"),
                push=push)


def replayed_webhook(run: CaseRun) -> Sent:
    """The first row's Gitea delivery again, byte for byte (same X-Gitea-Delivery)."""
    first = run.rows[0].sent
    return Sent(first.body, dict(first.headers), push=first.push)


def github_signed(body: bytes | Callable[[CaseRun], bytes], event: str,
                  content_type: str = "application/json",
                  signatures: tuple[str, ...] = ("hub256", "gitea")) -> Build:
    """A crafted request to a github Receiver, signed as Gitea signs (`signatures`); `body`
    may be built from the case (a payload naming its repository)."""
    def build(run: CaseRun) -> Sent:
        data = body(run) if callable(body) else body
        headers = {"content-type": content_type, "x-github-event": event,
                   "x-gitea-event": event, "x-gitea-delivery": str(uuid.uuid4())}
        digest = hmac_hex("sha256", run.token, data)
        if "hub256" in signatures:
            headers["x-hub-signature-256"] = f"sha256={digest}"
        if "gitea" in signatures:
            headers["x-gitea-signature"] = digest
        if "sha1" in signatures:
            headers["x-hub-signature"] = f"sha1={hmac_hex('sha1', run.token, data)}"
        return Sent(data, headers)
    return build


def hmac_signed(body: bytes | Callable[[CaseRun], tuple[bytes, PushFact | None]],
                algorithm: str = "sha256", *, key: str = "", value: str = "",
                content_type: str = "application/json", method: str = "POST") -> Build:
    """A generic-hmac request: `X-Signature: <algorithm>=<hex>` under the token (or `key`);
    `value` sends that header value as it is."""
    def build(run: CaseRun) -> Sent:
        data, push = body(run) if callable(body) else (body, None)
        headers = {"content-type": content_type}
        if value:
            headers["x-signature"] = value
        elif algorithm:
            mac = hmac_hex(algorithm, key or run.token, data)
            headers["x-signature"] = f"{algorithm}={mac}"
        return Sent(data, headers, method=method, push=push)
    return build


def actions_push(which: str = "apps", ref: str | None = None
                 ) -> Callable[[CaseRun], tuple[bytes, PushFact]]:
    def make(run: CaseRun) -> tuple[bytes, PushFact]:
        makers: dict[str, Callable[[], PushFact]] = {
            "apps": run.push_apps, "infra": run.push_infra,
            "both": functools.partial(run.push_apps, infra=True)}
        push = makers[which]()
        return run.actions_body(push, ref), push
    return make


def generic(body: bytes | Callable[[CaseRun], tuple[bytes, PushFact | None]], auth: str,
            *, age: float = 0.0, again: bool = False) -> Build:
    """A generic request: `auth` is none, bearer, bad-bearer or timestamped (`age` seconds
    old); `again` sends the previous row's request once more, unchanged."""
    def build(run: CaseRun) -> Sent:
        if again:
            last = run.rows[-1].sent
            return Sent(last.body, dict(last.headers), push=last.push)
        data, push = body(run) if callable(body) else (body, None)
        headers = {"content-type": "application/json"}
        if auth == "bearer":
            headers["authorization"] = f"Bearer {run.token}"
        elif auth == "bad-bearer":
            headers["authorization"] = f"Bearer {secrets.token_hex(16)}"
        elif auth == "timestamped":
            stamp = int(time.time() - age)
            mac = hmac_hex("sha256", run.token, str(stamp).encode() + b"." + data)
            headers["x-signature"] = f"t={stamp},v1={mac}"
        return Sent(data, headers, push=push)
    return build


def unknown_path(run: CaseRun) -> Sent:
    body = b'{"action":"deploy"}'
    path = e2e.hook_path(secrets.token_hex(16), RECEIVER, run.case.ns("x"))
    return Sent(body, {"content-type": "application/json",
                       "x-signature": f"sha256={hmac_hex('sha256', run.token, body)}"}, path=path)


def gitlab(run: CaseRun) -> Sent:
    return Sent(b'{"object_kind":"push"}', {"content-type": "application/json",
                                            "x-gitlab-token": run.token,
                                            "x-gitlab-event": "Push Hook"})


PING = json.dumps({"zen": "keep it simple", "hook_id": 1, "hook": {"type": "gitea"}}).encode()


def create_tag(run: CaseRun) -> bytes:
    """A tag created, as Gitea's create event names it: the repository with its URLs."""
    gitea = run.oracle.gitea
    return json.dumps({"ref": "v1.0.0", "ref_type": "tag", "sha": "a" * 40, "repository": {
        "full_name": f"{ORG}/{run.case.name}", "clone_url": gitea.clone_url(ORG, run.case.name),
        "html_url": f"{gitea.url}/{ORG}/{run.case.name}"}}).encode()



DEPLOY = b'{"action":"deploy"}'
CONTRADICTORY = json.dumps({"ref": "refs/heads/main", "after": "b" * 40}).encode()
OVERSIZE = b'{"pad":"' + b"x" * (3 * 1024 * 1024) + b'"}'


@dataclass(frozen=True)
class Spec:
    label: str
    build: Build
    stricter: str = ""  # a key of STRICTER: the bridge refuses this on purpose


ROWS: dict[str, list[Spec]] = {
    "gitea": [
        Spec("Gitea push webhook (apps)", gitea_webhook(CaseRun.push_apps)),
        Spec("same delivery again (same X-Gitea-Delivery)", replayed_webhook),
        Spec("Gitea push to branch feature", gitea_webhook(
            functools.partial(CaseRun.push_apps, branch="feature"))),
        Spec("Gitea push, X-Hub-Signature (sha1) only",
             gitea_push(drop=("x-hub-signature-256", "x-gitea-signature", "x-gogs-signature")),
             stricter="sha1-only"),
        Spec("Gitea push, X-Gitea-Signature only",
             gitea_push(drop=("x-hub-signature-256", "x-hub-signature"))),
        Spec("Gitea push, X-Hub-Signature-256 wrong, X-Gitea-Signature right",
             gitea_push(x_hub_signature_256="sha256=" + "0" * 64)),
        Spec("Gitea push, X-Gitea-Event only (no X-GitHub-Event)",
             gitea_push(drop=("x-github-event", "x-github-event-type"))),
        Spec("Gitea push, content type form", gitea_form),
        Spec("Gitea push signed with another key", gitea_push(resign=secrets.token_hex(16))),
        Spec("Gitea push, no signature header", gitea_push(drop=(
            "x-hub-signature-256", "x-hub-signature", "x-gitea-signature", "x-gogs-signature"))),
        Spec("signed, event issues", github_signed(DEPLOY, "issues")),
        Spec("signed, event ping", github_signed(PING, "ping")),
        Spec("signed, content type text/plain", github_signed(DEPLOY, "push", "text/plain")),
        Spec("signed, empty body, event push", github_signed(b"", "push")),
        Spec("unknown hook path", unknown_path),
    ],
    "gitea-any": [
        Spec("signed ping", github_signed(PING, "ping")),
        Spec("signed create (tag) event", github_signed(create_tag, "create")),
        Spec("Gitea push webhook (infra)", gitea_webhook(CaseRun.push_infra)),
        Spec("signed, body a JSON array", github_signed(b"[]", "push")),
        Spec("signed, body not JSON", github_signed(b"deploy please", "push")),
        Spec("signed, push fields but no repository", github_signed(CONTRADICTORY, "push"),
             stricter="contradictory-push"),
    ],
    "hmac": [
        Spec("Actions body (apps), sha256", hmac_signed(actions_push("apps"))),
        Spec("JSON body, sha512", hmac_signed(DEPLOY, "sha512")),
        Spec("text body, sha1", hmac_signed(b"deploy please", "sha1",
                                            content_type="text/plain")),
        Spec("empty body, sha256", hmac_signed(b"")),
        Spec("malformed signature", hmac_signed(DEPLOY, value="sha256=zz")),
        Spec("unknown algorithm md5", hmac_signed(
            DEPLOY, value="md5=" + hashlib.md5(DEPLOY).hexdigest())),  # noqa: S324
        Spec("signed with another key", hmac_signed(DEPLOY, key=secrets.token_hex(16))),
        Spec("no X-Signature", hmac_signed(DEPLOY, algorithm="")),
        Spec("GET, empty body, signed", hmac_signed(b"", method="GET"), stricter="post-only"),
        Spec("body over 3 MiB", hmac_signed(OVERSIZE)),
    ],
    "generic": [
        Spec("no credentials, JSON body", generic(DEPLOY, "none"), stricter="unauthenticated"),
        Spec("bearer token, Actions body (infra)", generic(actions_push("infra"), "bearer")),
        Spec("wrong bearer token", generic(DEPLOY, "bad-bearer"), stricter="unauthenticated"),
        Spec("timestamped signature, empty body", generic(b"", "timestamped")),
        Spec("the same timestamped request again", generic(b"", "timestamped", again=True),
             stricter="replayed"),
        Spec("timestamped signature 20 min old", generic(DEPLOY, "timestamped", age=1200),
             stricter="stale"),
    ],
    "filter": [
        Spec("Actions body ref main (apps+infra)", hmac_signed(actions_push("both"))),
        Spec("Actions body ref refs/heads/other", hmac_signed(
            actions_push("apps", ref="refs/heads/other"))),
        Spec("JSON body without ref", hmac_signed(DEPLOY)),
        Spec("text body (req is {})", hmac_signed(b"deploy please", content_type="text/plain")),
        Spec("invalid JSON, content type JSON", hmac_signed(b"{not json")),
    ],
    "per-resource": [
        Spec("JSON body without key infra", hmac_signed(DEPLOY)),
        Spec("JSON body with key infra", hmac_signed(b'{"infra":true}')),
    ],
    "suspended": [
        Spec("Gitea push webhook", gitea_webhook(CaseRun.push_apps)),
        Spec("signed with another key", gitea_push(resign=secrets.token_hex(16))),
    ],
    "gitlab": [
        Spec("X-Gitlab-Token, push hook", gitlab, stricter="unsupported-type"),
    ],
}


# -- reasons: each checks itself against the push and the objects ----------------------------------


Check = Callable[[Oracle, Row, str], str | None]  # what holds, or None when it does not


def _push_of(row: Row) -> PushFact | None:
    return row.sent.push


def _source_branch(oracle: Oracle, ns: str, obj: str) -> str:
    spec = oracle.get(ns, obj)["spec"]
    if obj.startswith("Kustomization/"):
        spec = oracle.get(ns, f"GitRepository/{spec['sourceRef']['name']}")["spec"]
    return str((spec.get("ref") or {}).get("branch") or "master")


def reason_suspended(oracle: Oracle, row: Row, obj: str) -> str | None:
    spec = oracle.get(row.case.ns("br"), obj)["spec"]
    return "spec.suspend: true" if spec.get("suspend") is True else None


def reason_other_ref(oracle: Oracle, row: Row, obj: str) -> str | None:
    push = _push_of(row)
    if push is None:
        return None
    branch = _source_branch(oracle, row.case.ns("br"), obj)
    # The ref the request names (an Actions body may name another than the commit's branch).
    ref = str(json.loads(row.sent.body).get("ref") or push.ref)
    return f"{ref} is not the source's branch {branch}" if ref != f"refs/heads/{branch}" else None


def reason_paths(oracle: Oracle, row: Row, obj: str) -> str | None:
    push = _push_of(row)
    if push is None or not obj.startswith("Kustomization/"):
        return None
    path = str(oracle.get(row.case.ns("br"), obj)["spec"]["path"]).removeprefix("./").strip("/")
    under = [f for f in push.files if not path or f == path or f.startswith(path + "/")]
    if under:
        return None
    return f"commit changed {', '.join(sorted(push.files))}: nothing under {path}/"


def reason_started(oracle: Oracle, row: Row, obj: str) -> str | None:
    """The bridge's delivery has the Kustomization as a target to annotate and it ended Ready,
    without a patch: kustomize-controller had started on the commit by itself (it follows its
    source's new revision), so the bridge sent no redundant request. Both facts checked."""
    push = _push_of(row)
    if push is None or not obj.startswith("Kustomization/"):
        return None
    kind, name = obj.split("/")
    planned = [t for t in row.delivery.get("targets") or []
               if (t.get("kind"), t.get("name"), t.get("role")) == (kind, name, "annotate")]
    if not planned or planned[0].get("state") != "ready":
        return None
    status = oracle.get(row.case.ns("br"), obj).get("status") or {}
    if not str(status.get("lastAttemptedRevision") or "").endswith(f"sha1:{push.sha}"):
        return None
    return (f"a target of the delivery, Ready at {push.sha[:8]} with no patch: "
            "kustomize-controller started on the commit first")


def reason_not_a_push(oracle: Oracle, row: Row, obj: str) -> str | None:
    event = row.sent.headers.get("x-github-event", "")
    receiver = e2e.get_object(oracle.plane, "Receiver", row.case.ns("br"), RECEIVER)["spec"]
    if (row.bridge_code == 200 and row.reply.get("status") in ("pong", "ignored")
            and event and event != "push" and not receiver.get("events")):
        return f"event {event!r} is no push (answered {row.reply['status']})"
    return None


def reason_ref_event(oracle: Oracle, row: Row, obj: str) -> str | None:
    """A branch or tag created or deleted: the bridge routes it to the input providers that list
    refs, and leaves sources and their consumers to the push Gitea sends for the same ref (a
    new ref with commits is also a push). Checked: the event, the object's kind, and that the
    reply names the object as skipped for that event."""
    event = row.sent.headers.get("x-github-event", "")
    kind, name = obj.split("/")
    if row.bridge_code != 202 or event not in ("create", "delete") \
            or kind == "ResourceSetInputProvider":
        return None
    skipped = [s for s in row.reply.get("skipped") or []
               if (s.get("kind"), s.get("name")) == (kind, name)
               and f"a {event} event" in str(s.get("reason"))]
    return f"event {event!r} names a ref, not commits: {skipped[0]['reason']}" if skipped else None


def _bridge_accepted_delivery(run: CaseRun, delivery: str) -> Row | None:
    return run.earlier(lambda r: r.bridge_code == 202
                       and r.sent.headers.get("x-gitea-delivery") == delivery)


REASONS: dict[str, Check] = {
    "suspended": reason_suspended,
    "other ref": reason_other_ref,
    "paths": reason_paths,
    "started by Flux": reason_started,
    "not a push": reason_not_a_push,
    "ref event": reason_ref_event,
}


# Deliberate stricter rules: Flux accepts, the bridge refuses; each checked on the request.
def stricter_sha1_only(run: CaseRun, row: Row) -> str | None:
    h = row.sent.headers
    only_sha1 = ("x-hub-signature" in h and "x-hub-signature-256" not in h
                 and "x-gitea-signature" not in h)
    valid = h.get("x-hub-signature") == f"sha1={hmac_hex('sha1', run.token, row.sent.body)}"
    return "SHA-1 signatures are refused (X-Hub-Signature alone)" if only_sha1 and valid else None


def stricter_post_only(run: CaseRun, row: Row) -> str | None:
    if row.sent.method != "POST" and row.bridge_code == 405:
        return f"{row.sent.method} never deploys: /hook takes POST only"
    return None


def _timestamped(run: CaseRun, row: Row) -> tuple[int, bool] | None:
    value = row.sent.headers.get("x-signature", "")
    parts = dict(p.split("=", 1) for p in value.split(",") if "=" in p)
    if "t" not in parts or "v1" not in parts:
        return None
    stamp = int(parts["t"])
    mac = hmac_hex("sha256", run.token, str(stamp).encode() + b"." + row.sent.body)
    return stamp, hmac.compare_digest(mac, parts["v1"])


def stricter_unauthenticated(run: CaseRun, row: Row) -> str | None:
    if run.case.type != "generic":
        return None
    bearer = row.sent.headers.get("authorization", "") == f"Bearer {run.token}"
    signed = _timestamped(run, row)
    if bearer or (signed is not None and signed[1]):
        return None
    return ("generic Receiver without a valid bearer token or timestamped signature "
            "(insecure.allow_unsigned_generic is off)")


def stricter_stale(run: CaseRun, row: Row) -> str | None:
    signed = _timestamped(run, row)
    if signed is None or not signed[1] or row.sent.at - signed[0] <= 300:
        return None
    return f"timestamped signature {row.sent.at - signed[0]:.0f}s old (window 300s)"


def stricter_replayed(run: CaseRun, row: Row) -> str | None:
    signed = _timestamped(run, row)
    value = row.sent.headers.get("x-signature")
    first = run.earlier(lambda r: r is not row and r.bridge_accepted
                        and r.sent.headers.get("x-signature") == value)
    if signed is None or not signed[1] or first is None:
        return None
    return f"one-time signature already used by '{first.label}'"


def stricter_contradictory(run: CaseRun, row: Row) -> str | None:
    try:
        doc = json.loads(row.sent.body)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not {"after", "commits", "head_commit"} & doc.keys():
        return None
    if "repository" in doc or row.bridge_code != 422:
        return None
    return ("a body with a push's fields but no repository cannot be routed: refused (422) "
            "rather than read as 'reconcile everything'")


def stricter_unsupported(run: CaseRun, row: Row) -> str | None:
    rtype = run.case.type
    if rtype in BRIDGE_TYPES or row.bridge_code != 404:
        return None
    return f"Receiver type {rtype} is not served by the bridge (not a drop-in for it)"


STRICTER: dict[str, Callable[[CaseRun, Row], str | None]] = {
    "sha1-only": stricter_sha1_only,
    "post-only": stricter_post_only,
    "unauthenticated": stricter_unauthenticated,
    "stale": stricter_stale,
    "replayed": stricter_replayed,
    "unsupported-type": stricter_unsupported,
    "contradictory-push": stricter_contradictory,
}


# Requests Flux refuses that the bridge accepts, by design: genuine Gitea deliveries that Flux
# cannot read (the bridge is built for Gitea; docs/migrating-from-notification-controller.md
# lists them). The only exceptions to rule (a): each row is marked BROADER in the table, its
# reason is checked against the request, and it fails the test once it no longer reproduces.
KNOWN_BROADER = {
    ("gitea", "Gitea push, X-Gitea-Signature only"):
        "Flux reads only X-Hub-Signature-256 (else X-Hub-Signature); the bridge also takes "
        "Gitea's own X-Gitea-Signature alone",
    ("gitea", "Gitea push, content type form"):
        "Gitea signs the JSON, Flux checks the signature over the raw form body and refuses; "
        "the bridge checks it over the decoded payload field",
}


# -- running a row ---------------------------------------------------------------------------------


def _send(client: httpx.Client, base: str, path: str, sent: Sent) -> httpx.Response:
    return client.request(sent.method, base + path, content=sent.body, headers=sent.headers)


def _settled(oracle: Oracle, delivery_id: str, token: str) -> dict[str, Any]:
    """The delivery's last state, read through `GET ?wait=` until it settles."""
    with httpx.Client(trust_env=False, timeout=DELIVERY_WAIT + 30) as client:
        response = client.get(f"{oracle.bridge.url}/deliveries/{delivery_id}",
                              params={"wait": str(DELIVERY_WAIT)},
                              headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    views: list[dict[str, Any]] = [v for v in lines if "targets" in v]
    assert views and views[-1].get("final"), (
        f"delivery {delivery_id} did not settle in {DELIVERY_WAIT:g}s: {lines[-1:]}\n"
        f"{oracle.bridge.tail(30)}\n{oracle.flux.logs(10)}")
    return views[-1]


def run_row(run: CaseRun, spec: Spec, client: httpx.Client) -> Row:
    oracle, case = run.oracle, run.case
    nc_ns, br_ns = case.ns("nc"), case.ns("br")
    sent = spec.build(run)
    row = Row(case, spec.label, spec.stricter, sent)
    start = oracle.audit.offset()

    before = oracle.requested(nc_ns)
    sent.at = time.time()
    row.flux_code = _send(client, oracle.flux.receiver_url, sent.path or oracle.paths[nc_ns],
                          sent).status_code
    # notification-controller patches before it answers: what changed is its whole effect.
    row.flux_set = oracle.changed(nc_ns, before)

    before = oracle.requested(br_ns)
    response = _send(client, oracle.bridge.url, sent.path or oracle.paths[br_ns], sent)
    row.bridge_code = response.status_code
    if response.headers.get("content-type", "").startswith("application/json"):
        reply = response.json()
        row.reply = reply if isinstance(reply, dict) else {"reply": reply}
    if row.bridge_code == 202:
        settling = time.monotonic()
        row.delivery = _settled(oracle, str(row.reply["delivery"]), run.token)
        row.settle = time.monotonic() - settling
    row.bridge_set = oracle.changed(br_ns, before)

    patches = oracle.audit.patches(start, (nc_ns, br_ns))
    row.flux_patched = frozenset(p.object for p in patches
                                 if p.actor == "notification-controller" and p.namespace == nc_ns)
    row.bridge_patched = frozenset(p.object for p in patches
                                   if p.actor == "bridge" and p.namespace == br_ns)
    strays = [p for p in patches if (p.actor, p.namespace) in (
        ("bridge", nc_ns), ("notification-controller", br_ns))]
    if strays:
        row.problems.append(f"patches on the other twin: {strays}")
    judge(run, row)
    run.rows.append(row)
    run.end_offset = oracle.audit.offset()
    return row


def judge(run: CaseRun, row: Row) -> None:
    """Rules (a), (b), (c) and the counting cross-checks, for one row; problems into the row."""
    oracle, problems = run.oracle, row.problems
    if row.flux_patched != row.flux_set:
        problems.append(f"requestedAt changed on {sorted(row.flux_set)} but the audit log has "
                        f"notification-controller patching {sorted(row.flux_patched)}")
    if row.bridge_patched != row.bridge_set:
        problems.append(f"requestedAt changed on {sorted(row.bridge_set)} but the audit log has "
                        f"the bridge patching {sorted(row.bridge_patched)}")
    if row.bridge_code == 202:
        mark = str(row.reply.get("mark", ""))
        for obj in row.bridge_set:
            notes = oracle.get(run.case.ns("br"), obj)["metadata"].get("annotations") or {}
            if not delivery_marks.has(notes, mark):
                problems.append(f"{obj} changed without this delivery's mark {mark}")

    known = KNOWN_BROADER.get((run.case.name, row.label))
    if known is not None:
        if row.flux_accepted or not row.bridge_accepted:
            problems.append(f"the broader rule no longer holds (Flux {row.flux_code}, bridge "
                            f"{row.bridge_code}): delete its KNOWN_BROADER entry")
        row.finding = known
        return
    if not row.flux_accepted:  # (a)
        if row.bridge_accepted or row.bridge_set:
            problems.append(f"Flux refused ({row.flux_code}) but the bridge answered "
                            f"{row.bridge_code} and annotated {sorted(row.bridge_set)}")
        if row.stricter:
            problems.append(f"the table says the bridge is stricter ({row.stricter}), but "
                            f"Flux refused too")
        return
    if row.stricter:  # (b), a deliberate exception
        why = STRICTER[row.stricter](run, row)
        if row.bridge_accepted:
            problems.append(f"the table says the bridge refuses ({row.stricter}), it answered "
                            f"{row.bridge_code}")
        elif why is None:
            problems.append(f"stricter rule {row.stricter} does not hold for this request")
        else:
            row.reasons = dict.fromkeys(row.flux_set, f"stricter: {why}")
        if row.bridge_set:
            problems.append(f"refused, yet the bridge annotated {sorted(row.bridge_set)}")
        return
    if not row.bridge_accepted:  # (b)
        problems.append(f"Flux accepted, the bridge answered {row.bridge_code} {row.reply}")
        return
    if not row.bridge_set <= row.flux_set:  # (c)
        problems.append(f"the bridge annotated {sorted(row.bridge_set - row.flux_set)} "
                        "beyond what Flux annotated")
    duplicate = None
    if row.reply.get("status") == "duplicate":
        first = _bridge_accepted_delivery(run, row.sent.headers.get("x-gitea-delivery", ""))
        if first is not None:
            duplicate = (f"replay: X-Gitea-Delivery already delivered by '{first.label}' "
                         "(answered duplicate)")
    for obj in sorted(row.flux_set - row.bridge_set):
        if duplicate is not None:
            row.reasons[obj] = duplicate
            continue
        for name, check in REASONS.items():
            why = check(oracle, row, obj)
            if why is not None:
                row.reasons[obj] = f"{name}: {why}"
                break
        else:
            problems.append(f"{obj}: Flux annotated it, the bridge did not, and no reason holds "
                            f"(reply {row.reply}, delivery {row.delivery.get('targets')})")


# -- the environment -------------------------------------------------------------------------------


def _ready_path(plane: ControlPlane, ns: str) -> str | None:
    obj = e2e.get_object(plane, "Receiver", ns, RECEIVER)
    path = (obj.get("status") or {}).get("webhookPath")
    return str(path) if path and e2e.condition(obj, "Ready").get("status") == "True" else None


def _objects(oracle: Oracle, case: Case, ns: str, suspend: bool) -> None:
    plane = oracle.plane
    plane.ensure_namespace(ns)
    e2e.create_secret(plane, ns, "hook-token", {"token": oracle.tokens[case.name]})
    url = oracle.gitea.clone_url(ORG, case.name)
    if ns == case.ns("nc"):
        # The same repository under another host name: the bridge, which follows every source
        # of a pushed repository, must not take notification-controller's twin for one.
        url = url.replace("://127.0.0.1:", "://localhost:")
    e2e.git_repository(plane, ns, "fleet", url, auth=None)
    for name, (path, suspended) in KUSTOMIZATIONS.items():
        e2e.create_object(plane, "Kustomization", ns, name, {
            "interval": "1h", "path": path, "prune": False, "targetNamespace": ns,
            "suspend": suspended, "sourceRef": {"kind": "GitRepository", "name": "fleet"}})
    e2e.receiver(plane, ns, RECEIVER, case.type, "hook-token", OBJECTS,
                 events=list(case.events) if case.events is not None else None,
                 resource_filter=case.resource_filter)
    if case.filters:
        filters = dict(case.filters)
        resources = [{"apiVersion": e2e.FLUX_KINDS[kind][0], "kind": kind, "name": name,
                      **({"filter": filters[name]} if name in filters else {})}
                     for kind, name in OBJECTS]
        plane.request("PATCH", f"{e2e.collection('Receiver', ns)}/{RECEIVER}",
                      {"spec": {"resources": resources}},
                      content_type="application/merge-patch+json")
    if suspend:
        plane.request("PATCH", f"{e2e.collection('Receiver', ns)}/{RECEIVER}",
                      {"spec": {"suspend": True}}, content_type="application/merge-patch+json")


def _suspended_at_nc(oracle: Oracle, ns: str) -> bool:
    """notification-controller's cache has the suspension: a request it would refuse for its
    signature (400) is answered 503. Such a probe annotates nothing either way."""
    with httpx.Client(trust_env=False, timeout=10) as client:
        code = client.post(oracle.flux.receiver_url + oracle.paths[ns], content=b"{}",
                           headers={"content-type": "application/json"}).status_code
    return code == 503


def _deployed(oracle: Oracle, ns: str, sha: str) -> bool:
    return all(e2e.applied_at(e2e.get_object(oracle.plane, "Kustomization", ns, name),
                              f"main@sha1:{sha}") is not None
               for name, (_, suspended) in KUSTOMIZATIONS.items() if not suspended)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    started = time.monotonic()
    timings: dict[str, float] = {}
    workdir = tmp_path_factory.mktemp("oracle")
    with e2e.stopping() as teardown:
        plane, gitea, flux = e2e.start_peers(workdir, teardown, timings,
                                             audit_policy=audit_policy())
        capture = WebhookCapture()
        teardown.append(capture.close)
        with e2e.timed(timings, "bridge"):
            bridge = BridgeProcess({"log_level": "info", "reconcile": {
                "coalesce_window_seconds": 0.05, "source_timeout_seconds": 90,
                "consumer_timeout_seconds": 120}}, plane.kubeconfig, workdir)
            bridge.start()
            teardown.append(bridge.stop)
        env = Oracle(plane, gitea, flux, bridge, capture, AuditTail(plane.audit_log),
                     {name: secrets.token_hex(16) for name in CASES}, timings=timings)

        with e2e.timed(timings, "repositories, objects, first deploy"):
            gitea.create_org(ORG)
            first: dict[str, str] = {}
            for case in CASES.values():
                gitea.api("POST", f"/orgs/{ORG}/repos", {
                    "name": case.name, "auto_init": True, "default_branch": "main",
                    "private": False})
                first[case.name] = gitea.commit_files(ORG, case.name, {
                    "apps/settings.yaml": configmap("apps-settings", release="0"),
                    "infra/settings.yaml": configmap("infra-settings", tier="0")}, "fleet")
                gitea.create_hook(ORG, case.name, capture.url, env.tokens[case.name])
                for side in ("nc", "br"):
                    # The bridge's twin is suspended from the start; NC's once it has a path.
                    _objects(env, case, case.ns(side), case.suspend and side == "br")
            served = sum(2 for c in CASES.values() if c.type in BRIDGE_TYPES)
            bridge.wait_receivers(served, timeout=60)
            waiting = e2e.Waiting()
            for case in CASES.values():
                nc_ns, br_ns = case.ns("nc"), case.ns("br")
                path = waiting.wait(f"NC's Receiver in {nc_ns} ready",
                                    functools.partial(_ready_path, plane, nc_ns), 90,
                                    lambda: flux.logs(20))
                assert path == e2e.hook_path(env.tokens[case.name], RECEIVER, nc_ns), path
                env.paths[nc_ns] = path
                env.paths[br_ns] = e2e.hook_path(env.tokens[case.name], RECEIVER, br_ns)
                if case.suspend:
                    _objects_suspend(env, nc_ns)
                for ns in (nc_ns, br_ns):
                    waiting.wait(f"{ns} deployed", functools.partial(
                        _deployed, env, ns, first[case.name]), DEPLOY_TIMEOUT,
                        lambda: flux.logs(20))
        timings["environment total"] = time.monotonic() - started
        e2e.print_timings("Flux oracle environment up", timings)
        yield env


def _objects_suspend(oracle: Oracle, ns: str) -> None:
    oracle.plane.request("PATCH", f"{e2e.collection('Receiver', ns)}/{RECEIVER}",
                         {"spec": {"suspend": True}}, content_type="application/merge-patch+json")
    e2e.Waiting().wait(f"NC to see {ns}'s Receiver suspended",
                       functools.partial(_suspended_at_nc, oracle, ns), 30)


# -- the table -------------------------------------------------------------------------------------


def _short(names: frozenset[str]) -> str:
    return ",".join(sorted(n.replace("GitRepository/", "src/").replace("Kustomization/", "ks/")
                           for n in names)) or "-"


def _why(row: Row) -> str:
    """The table's reason column: the finding, Flux's refusal, or each reason with its objects."""
    if row.finding:
        return f"BROADER by design, Flux refuses and the bridge accepts: {row.finding}"
    if not row.flux_accepted:
        return "Flux refuses: the bridge must refuse and annotate nothing"
    grouped: dict[str, list[str]] = {}
    for obj, why in sorted(row.reasons.items()):
        grouped.setdefault(why, []).append(obj.split("/", 1)[1])
    return "; ".join(f"{','.join(objs)}: {why}" for why, objs in grouped.items()) or "-"


def table(rows: list[Row]) -> str:
    head = ("case", "request", "Flux", "bridge", "Flux annotated", "bridge annotated",
            "settled", "reason")
    lines = []
    for r in rows:
        lines.append((f"{r.case.name} ({r.case.label})", r.label, str(r.flux_code),
                      str(r.bridge_code), _short(r.flux_set), _short(r.bridge_set),
                      f"{r.settle:.1f}s" if r.bridge_code == 202 else "-", _why(r)))
    widths = [max(len(x[i]) for x in (head, *lines)) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False))
                     + "  " + line[-1] for line in (head, *lines))


def test_bridge_answers_and_annotates_as_flux_or_says_why(
    oracle: Oracle, capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    runs = {name: CaseRun(oracle, case) for name, case in CASES.items()}
    failure: dict[str, BaseException] = {}
    lock = threading.Lock()

    def play(name: str) -> None:
        with httpx.Client(trust_env=False, timeout=60.0) as client:
            for spec in ROWS[name]:
                try:
                    run_row(runs[name], spec, client)
                except BaseException as exc:  # report with the table, not instead of it
                    with lock:
                        failure[f"{name}: {spec.label}"] = exc
                    return

    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        list(pool.map(play, CASES))
    rows = [row for run in runs.values() for row in run.rows]
    elapsed = time.monotonic() - started
    # Nothing patched after a case's last row (a late patch after a refusal would be here).
    late = [(name, p) for name, run in runs.items()
            for p in oracle.audit.patches(run.end_offset, (run.case.ns("br"),))
            if p.actor == "bridge"]

    # Past pytest's capture: CI runs without -s, and its log must show the table.
    with capsys.disabled():
        print(f"\n=== Flux notification-controller vs the bridge: {len(rows)} requests in "
              f"{elapsed:.1f}s (bridge with its default settings) ===")
        print(table(rows))
        refused = [r for r in rows if not r.flux_accepted]
        print(f"  Flux refused {len(refused)} requests; the bridge refused "
              f"{sum(not r.bridge_accepted for r in refused)} of them and annotated "
              f"{sum(len(r.bridge_set) for r in refused)} objects for them "
              f"({len(KNOWN_BROADER)} genuine Gitea deliveries Flux cannot read, marked BROADER)")
    problems = [f"{r.case.name}: {r.label}: {p}" for r in rows for p in r.problems]
    problems += [f"{name}: failed before finishing: {exc!r}" for name, exc in failure.items()]
    problems += [f"{name}: the bridge patched {p.object} after the case's last request"
                 for name, p in late]
    assert not problems, "\n".join(problems)
    assert len(rows) == sum(len(specs) for specs in ROWS.values())
    # Not vacuous: both annotated Kustomizations, and each kind of reason was needed.
    assert any(o.startswith("Kustomization/") for r in rows for o in r.bridge_set)
    assert any(o.startswith("Kustomization/") for r in rows for o in r.flux_set)
    used = {v.split(":", 1)[0] for r in rows for v in r.reasons.values()}
    assert {"paths", "suspended", "other ref", "not a push", "ref event", "stricter"} <= used, used
