"""Before a request's signature holds, what it may cost is bounded: a form body is decoded in C
and only its `payload` field, the head (header count and bytes, request target) is bounded, and
a signature header with thousands of candidates is malformed, unread."""

from __future__ import annotations

import contextlib
import json
import time
from urllib.parse import parse_qs, quote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver import signatures as sig
from receiver.gitea.payloads import MAX_FORM_FIELDS, PayloadError, form_payload
from tests import gitea_payloads as gp
from tests.conftest import ACTIONS_TOKEN, GITEA_TOKEN, HMAC_TOKEN, Bridge
from tests.loopprobe import probing

GITEA_PATH = "/hook/" + sig.hook_digest(GITEA_TOKEN, "gitea", "flux-system")
ACTIONS_PATH = "/hook/" + sig.hook_digest(ACTIONS_TOKEN, "actions", "apps")
HMAC_PATH = "/hook/" + sig.hook_digest(HMAC_TOKEN, "hmac", "flux-system")
FORM = "application/x-www-form-urlencoded"


@pytest.mark.anyio
async def test_a_form_of_a_million_escapes_is_refused_without_holding_the_loop(
        bridge: Bridge) -> None:
    body = b"payload=" + b"%41" * 1_000_000  # 3 MB, under the body limit
    headers = {"Content-Type": FORM, "X-Gitea-Event": "push", "X-Gitea-Signature": "0" * 64}
    # First use pays once for what is loaded lazily: not what is measured here.
    await bridge.client.post(GITEA_PATH, content=body, headers=headers)
    replies = []
    async with probing(bridge.client) as probe:
        for _ in range(3):
            replies.append(await bridge.client.post(GITEA_PATH, content=body, headers=headers))
            await probe.next()
    assert [(r.status_code, r.json()) for r in replies] == [(401, {"error": "unauthorized"})] * 3
    assert bridge.cluster.patches == []
    # urllib's decoder held the loop 0.6 s per request; now ~30 ms.
    assert probe.worst < 0.25, probe.latencies


@pytest.mark.anyio
async def test_a_signed_form_push_is_still_taken(bridge: Bridge) -> None:
    doc = json.dumps({"ref": "refs/heads/main", "after": "a" * 40, "repository": {
        "full_name": "platform/fleet", "clone_url": "https://gitea.example.com/platform/fleet.git"},
        "commits": []}).encode()
    reply = await bridge.client.post(GITEA_PATH, content=b"payload=" + quote_plus(doc).encode(),
                                     headers={"Content-Type": FORM, "X-Gitea-Event": "push",
                                              "X-Gitea-Signature": sig.hmac_hex(
                                                  "sha256", GITEA_TOKEN, doc)})
    assert reply.status_code == 202, reply.text


@given(st.binary(max_size=200), st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)),
                                          max_size=5))
def test_form_decoding_agrees_with_urllib_on_what_gitea_sends(
        doc: bytes, others: list[tuple[str, str]]) -> None:
    fields = [f"{quote_plus(k)}={quote_plus(v)}" for k, v in others if k != "payload"]
    body = "&".join([*fields, "payload=" + quote_plus(doc)]).encode()
    if not doc:
        with pytest.raises(PayloadError):
            form_payload(body)
        return
    assert form_payload(body) == doc
    text = doc.decode("utf-8", "replace")
    assert parse_qs(body.decode())["payload"][0] == text  # what the old decoder gave


@given(st.binary(max_size=300))
def test_any_form_body_is_a_payload_or_a_payload_error(body: bytes) -> None:
    with contextlib.suppress(PayloadError):
        assert isinstance(form_payload(body), bytes)


def test_form_bounds() -> None:
    with pytest.raises(PayloadError, match="fields"):
        form_payload(b"&" * MAX_FORM_FIELDS + b"payload=x")
    with pytest.raises(PayloadError, match="escape"):
        form_payload(b"payload=%4G")
    assert form_payload(b"%70ayload=%E2%82%AC+%5C") == "€ \\".encode()
    assert form_payload(b"payload=a&payload=b") == b"a"


@pytest.mark.anyio
async def test_an_oversized_head_is_431_and_a_long_target_414(bridge: Bridge) -> None:
    many = {f"x-h{i}": "1" for i in range(200)}
    big = {"x-big": "a" * 100_000}
    for headers in (many, big):
        reply = await bridge.client.post(ACTIONS_PATH, headers=headers)
        assert (reply.status_code, reply.json()) == (431, {"error": "request headers too large"})
    reply = await bridge.client.get("/deliveries/" + "x" * 20_000)
    assert (reply.status_code, reply.json()) == (414, {"error": "request target too long"})
    assert bridge.cluster.patches == []


@pytest.mark.anyio
async def test_a_signature_with_thousands_of_candidates_is_malformed(bridge: Bridge) -> None:
    now = int(time.time())
    good = sig.sign_timestamped(ACTIONS_TOKEN, b"", now)
    crowded = good + ",v1=" + ",v1=".join(["0" * 64] * 800)  # ~55 KB, the right one first
    reply = await bridge.client.post(ACTIONS_PATH, headers={"X-Signature": crowded})
    assert (reply.status_code, reply.json()) == (401, {"error": "unauthorized"})
    assert sig.parse_timestamped(crowded) is None
    assert bridge.cluster.patches == []


@given(st.binary(min_size=1, max_size=64), st.integers(40_000, 120_000))
def test_a_long_form_field_decodes_the_same_in_slices(unit: bytes, repeat: int) -> None:
    doc = (unit * repeat)[:400_000]  # several 128 KiB slices, escapes across every cut
    assert form_payload(b"payload=" + quote_plus(doc).encode()) == doc


@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["github", "generic-hmac", "timestamped"])
async def test_a_large_signed_push_is_taken_and_a_forged_one_refused(
        bridge: Bridge, scheme: str) -> None:
    """A body from 64 KiB on is verified in the chunks it arrived in and joined only once its
    signature holds: the one signed with the token is routed, the same bytes signed otherwise
    are not."""
    repo, ref, source = (("teams/apps", "refs/heads/production", ("apps", "team-apps"))
                         if scheme == "timestamped" else
                         ("platform/fleet", "refs/heads/main", ("flux-system", "flux-system")))
    doc = gp.push(repo, ref, [gp.commit(repo, "big " + "x" * 200_000, modified=["a.yaml"])])
    body = gp.gitea_bytes(doc)
    assert len(body) > 200_000
    path, token = {"github": (GITEA_PATH, GITEA_TOKEN), "generic-hmac": (HMAC_PATH, HMAC_TOKEN),
                   "timestamped": (ACTIONS_PATH, ACTIONS_TOKEN)}[scheme]

    def headers(key: str) -> dict[str, str]:
        if scheme == "github":
            return {"X-Gitea-Signature": sig.hmac_hex("sha256", key, body)}
        if scheme == "generic-hmac":
            return {"X-Signature": "sha256=" + sig.hmac_hex("sha256", key, body)}
        return {"X-Signature": sig.sign_timestamped(key, body, int(time.time()))}

    common = {"Content-Type": "application/json", "X-Gitea-Event": "push"}
    forged = await bridge.client.post(path, content=body, headers={**common, **headers("nope")})
    assert (forged.status_code, forged.json()) == (401, {"error": "unauthorized"})
    assert bridge.cluster.patches == []
    taken = await bridge.client.post(path, content=body, headers={**common, **headers(token)})
    assert taken.status_code == 202, taken.text
    assert taken.json()["commit"] == doc["after"]
    assert ("GitRepository", *source) in {
        (t["kind"], t["namespace"], t["name"]) for t in taken.json()["targets"]}
