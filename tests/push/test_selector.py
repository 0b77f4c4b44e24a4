"""The payload selector: one reading of a body, shared by the service and `plan`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver import signatures as sig
from receiver.cli import EXIT_OK, EXIT_PAYLOAD, main
from receiver.gitea.payloads import PayloadError, parse_gitea_push, push_document
from receiver.push.selector import (
    ACTIONS_BODY,
    GITEA_OTHER,
    GITEA_PUSH,
    NO_DETAILS,
    PayloadRefused,
    select_payload,
    shape_of,
)
from tests import gitea_payloads as gp
from tests.conftest import ACTIONS_TOKEN, FIXTURES, FLEET, GITEA_TOKEN, HMAC_TOKEN, Bridge

PAYLOADS = FIXTURES / "payloads"
FIXTURE_FILES = sorted(p for p in PAYLOADS.iterdir() if p.suffix in (".json", ".txt"))
# (receiver, type, token, path)
RECEIVERS = {
    "flux-system/gitea": ("github", GITEA_TOKEN),
    "flux-system/hmac": ("generic-hmac", HMAC_TOKEN),
    "apps/actions": ("generic", ACTIONS_TOKEN),
}


def _path(receiver: str) -> str:
    namespace, name = receiver.split("/")
    return "/hook/" + sig.hook_digest(RECEIVERS[receiver][1], name, namespace)


def _headers(receiver: str, body: bytes, content_type: str) -> dict[str, str]:
    rtype, token = RECEIVERS[receiver]
    headers = {"Content-Type": content_type}
    if rtype == "github":  # no event header: the body alone decides
        headers["X-Hub-Signature-256"] = "sha256=" + sig.hmac_hex("sha256", token, body)
    elif rtype == "generic-hmac":
        headers["X-Signature"] = "sha256=" + sig.hmac_hex("sha256", token, body)
    else:
        headers["Authorization"] = f"Bearer {token}"
    return headers


# -- the pure selector -------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "shape"), [
    (b"", NO_DETAILS),
    (b"  \n", NO_DETAILS),
    (b"{}", NO_DETAILS),
    (b"null", NO_DETAILS),
    (b'{"action": "deploy"}', NO_DETAILS),
    (b'{"repository": "https://gitea.example.com/a/b", "ref": "main"}', NO_DETAILS),
    (b'{"sha": "' + b"a" * 40 + b'", "ref": "v1", "repository": {"full_name": "a/b"}}',
     GITEA_OTHER),
])
@pytest.mark.parametrize("rtype", ["github", "generic", "generic-hmac"])
def test_bodies_without_push_details_are_accepted_by_every_type(
    rtype: str, body: bytes, shape: str
) -> None:
    selection = select_payload(rtype, body)
    assert (selection.shape, selection.push) == (shape, None)
    assert selection.note.startswith("no push details: ")


@pytest.mark.parametrize("body", [b"deploy please", b"\xff\xfe", b"[1, 2, 3]", b'"text"', b"7"])
def test_generic_types_take_any_bytes_as_flux_does(body: bytes) -> None:
    for rtype in ("generic", "generic-hmac"):
        assert select_payload(rtype, body).push is None


@pytest.mark.parametrize("body", [b"deploy please", b"[1, 2, 3]", b"null"])
def test_a_github_receiver_takes_any_signed_body_as_flux_does(body: bytes) -> None:
    # notification-controller's github Receiver never parses the body: no push details.
    selection = select_payload("github", body)
    assert (selection.shape, selection.push) == (NO_DETAILS, None)


@pytest.mark.parametrize("rtype", ["github", "generic", "generic-hmac"])
def test_a_push_is_read_by_its_shape_whatever_the_receiver_type(rtype: str) -> None:
    gitea = (PAYLOADS / "gitea-push-main.json").read_bytes()
    actions = (PAYLOADS / "actions-body.json").read_bytes()
    assert select_payload(rtype, gitea).shape == GITEA_PUSH
    assert select_payload(rtype, gitea).push is not None
    assert select_payload(rtype, actions).shape == ACTIONS_BODY
    assert select_payload(rtype, actions).push is not None


@pytest.mark.parametrize(("body", "message"), [
    ({"ref": "refs/heads/main", "after": "a" * 40},
     "payload has no repository.clone_url, html_url or ssh_url"),
    ({"repository": {"clone_url": "https://g/a/b.git"}, "after": "a" * 40}, "payload has no ref"),
    ({"repository": "https://g/a/b", "ref": "main", "sha": "abc"},
     "sha must be a full 40- or 64-character commit id"),
    ({"repository": "https://g/a/b", "sha": "a" * 40}, "ref is required"),
])
@pytest.mark.parametrize("rtype", ["github", "generic", "generic-hmac"])
def test_a_push_that_contradicts_itself_is_422(rtype: str, body: Any, message: str) -> None:
    with pytest.raises(PayloadRefused) as refused:
        select_payload(rtype, json.dumps(body).encode())
    assert (refused.value.status, refused.value.message) == (422, message)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["sha", "ref", "repository", "after", "commits", "paths", "x"]),
        inner, max_size=5),
    max_leaves=12)


@given(doc=json_values, rtype=st.sampled_from(["github", "generic", "generic-hmac"]))
def test_the_selector_never_raises_anything_but_a_refusal(doc: Any, rtype: str) -> None:
    try:
        selection = select_payload(rtype, json.dumps(doc).encode())
    except PayloadRefused as exc:
        assert exc.status in (400, 422)
        # Only a body that claims to be a push, or a non-object on github, is refused.
        assert shape_of(doc) in (GITEA_PUSH, ACTIONS_BODY) or rtype == "github"
    else:
        assert (selection.push is None) == (selection.shape in (NO_DETAILS, GITEA_OTHER))


@given(body=st.binary(max_size=64))
def test_generic_types_never_refuse_bytes_that_claim_no_push(body: bytes) -> None:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if shape_of(doc) in (GITEA_PUSH, ACTIONS_BODY):
        return
    assert select_payload("generic-hmac", body).push is None


# -- the service and `plan` read every fixture the same way -----------------------------------


def _plan(capsys: pytest.CaptureFixture[str], receiver: str, payload: Path) -> tuple[int, Any]:
    code = main(["plan", "--manifests", str(FLEET), "--payload", str(payload),
                 "--receiver", receiver])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == EXIT_OK else err


@pytest.mark.anyio
@pytest.mark.parametrize("receiver", sorted(RECEIVERS))
@pytest.mark.parametrize("payload", FIXTURE_FILES, ids=lambda p: p.name)
async def test_service_and_plan_agree_on_every_payload_fixture(
    bridge: Bridge, capsys: pytest.CaptureFixture[str], receiver: str, payload: Path,
) -> None:
    body = payload.read_bytes()
    rtype = RECEIVERS[receiver][0]
    # Text goes as text where Flux takes it; a github Receiver takes JSON content only.
    content_type = "text/plain" if payload.suffix == ".txt" and rtype != "github" else (
        "application/json")
    reply = await bridge.client.post(_path(receiver), content=body,
                                     headers=_headers(receiver, body, content_type))
    code, planned = _plan(capsys, receiver, payload)
    if code == EXIT_OK:
        assert reply.status_code == 202, reply.text
        served = reply.json()
        keep = ("kind", "namespace", "name", "reason")
        assert [{k: t[k] for k in keep} for t in served["targets"]] == [
            {k: t[k] for k in keep} for t in planned["targets"]]
        assert served.get("note") == planned.get("note")
    else:
        assert code == EXIT_PAYLOAD
        assert reply.status_code in (400, 422)
        assert reply.json()["error"] in planned
    # Flux's generic types take every body; so does the bridge unless it claims a push.
    if rtype != "github" and not payload.name.startswith(("gitea-push-", "actions-body-short")):
        assert reply.status_code == 202, (payload.name, reply.text)


@pytest.mark.anyio
async def test_a_signed_gitea_push_without_event_header_is_routed_on_generic_hmac(
    bridge: Bridge,
) -> None:
    body = (PAYLOADS / "gitea-push-main.json").read_bytes()
    reply = await bridge.client.post(_path("flux-system/hmac"), content=body,
                                     headers=_headers("flux-system/hmac", body, "application/json"))
    assert reply.status_code == 202, reply.text
    assert [t["name"] for t in reply.json()["targets"]] == ["flux-system"]
    assert "note" not in reply.json()


@pytest.mark.anyio
async def test_no_push_details_reconcile_every_listed_object_and_say_why(bridge: Bridge) -> None:
    body = b"deploy please"
    reply = await bridge.client.post(_path("apps/actions"), content=body,
                                     headers=_headers("apps/actions", body, "text/plain"))
    assert reply.status_code == 202, reply.text
    doc = reply.json()
    assert doc["note"] == "no push details: the body is not JSON"
    assert [t["kind"] for t in doc["targets"]] == ["GitRepository", "Kustomization",
                                                   "Kustomization"]
    assert all("no push details: the body is not JSON" in t["reason"] for t in doc["targets"])


def test_which_events_and_media_a_github_receiver_answers_without_a_push() -> None:
    from receiver.flux.objects import FluxObject
    from receiver.push import spec_events

    def receiver(type_: str = "github", events: list[str] | None = None) -> FluxObject:
        spec: dict[str, object] = {"type": type_}
        if events is not None:
            spec["events"] = events
        return FluxObject({"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
                           "metadata": {"name": "r", "namespace": "ns"}, "spec": spec})

    assert spec_events.event_name({"x-gitea-event": "Push", "x-github-event": "ping"}) == "push"
    assert spec_events.event_name({"x-github-event": " Ping "}) == "ping"
    assert spec_events.answer_without_push(receiver(), "ping") == {"status": "pong"}
    ignored = spec_events.answer_without_push(receiver(), "release")
    assert ignored is not None and ignored["status"] == "ignored"
    for going_on in ("push", ""):
        assert spec_events.answer_without_push(receiver(), going_on) is None
    # Listed, a ping or another event reconciles every listed object, as with Flux.
    assert spec_events.answer_without_push(receiver(events=["push", "ping"]), "ping") is None
    assert spec_events.refuses_media(receiver(), "text/plain", True)
    assert not spec_events.refuses_media(receiver(), "application/x-www-form-urlencoded", True)
    assert not spec_events.refuses_media(receiver(), "text/plain", False)
    assert not spec_events.refuses_media(receiver("generic-hmac"), "text/plain", True)


# -- the compiled decoder reads a push exactly as json.loads does ---------------------------------


def _general(body: bytes) -> Any:
    """What the selector made of a body before the compiled decoder: the whole document decoded
    by json.loads, its shape, and (for a push) what `parse_gitea_push` reads from it."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return ("not json",)
    if shape_of(doc) != GITEA_PUSH:
        return ("shape", shape_of(doc))
    try:
        return ("push", parse_gitea_push(doc))
    except PayloadError as exc:
        return ("refused", str(exc))


def _compiled(body: bytes) -> Any:
    doc = push_document(body)
    if doc is None:
        return None
    try:
        return ("push", parse_gitea_push(doc))
    except PayloadError as exc:
        return ("refused", str(exc))


_FIELDS = ["after", "ref", "total_commits", "head_commit", "commits", "repository", "id",
           "added", "modified", "removed", "clone_url", "html_url", "full_name", "pusher"]
_odd_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.sampled_from(["main", "refs/tags/v1", "a" * 40, "0" * 40]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(_FIELDS), inner, max_size=4),
    max_leaves=10)
_SPLICES = [b"", b"\xff", b"NaN", b"\\ud800", b"\xef\xbb\xbf", b",", b"\x01", b"[" * 3]


@given(
    files=st.lists(st.text(st.characters(codec="utf-8"), max_size=12), max_size=4),
    ref=st.sampled_from(["refs/heads/main", "main", "refs/tags/v1.0.0", " ", "x" * 1100]),
    edits=st.dictionaries(st.sampled_from(_FIELDS), _odd_values, max_size=3),
    nested=st.sampled_from(["repository", "head_commit", "pusher", None]),
    splice=st.sampled_from(_SPLICES), at=st.integers(0, 10**6), indent=st.sampled_from([None, 2]),
)
def test_the_compiled_decoder_reads_a_push_as_json_loads_does(
        files: list[str], ref: str, edits: dict[str, Any], nested: str | None,
        splice: bytes, at: int, indent: int | None) -> None:
    """Whatever the body (a Gitea push, fields of other types, foreign fields, bytes that make
    it other JSON or no JSON): where the compiled decoder gives an answer it is the general
    path's; everywhere else (None) the selector takes the general path itself."""
    doc = gp.push("org/app", ref, [gp.commit("org/app", "c", modified=files)])
    if nested is not None and isinstance(doc.get(nested), dict):
        doc[nested].update(edits)
    else:
        doc.update(edits)
    body = gp.go_json(doc, indent)
    if splice:
        cut = at % (len(body) + 1)
        body = body[:cut] + splice + body[cut:]
    fast = _compiled(body)
    if fast is not None:
        assert fast == _general(body)
    try:
        chosen: Any = ("push", select_payload("generic", body).push)
    except PayloadRefused as exc:
        chosen = ("refused", exc.message)
    general = _general(body)
    if general[0] in ("push", "refused"):
        assert chosen == general


def test_an_unchanged_gitea_push_takes_the_compiled_decoder() -> None:
    body = gp.gitea_bytes(gp.push("org/app", "refs/heads/main", [
        gp.commit("org/app", "c", modified=["apps/a/x.yaml"], added=["b/ü.yaml"])]))
    assert _compiled(body) == _general(body)
    assert _compiled(body) is not None
