"""No input makes the service answer 500: random bodies, headers and paths, signed and not."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver import signatures as sig
from tests.conftest import GITEA_TOKEN, HMAC_TOKEN, Bridge

pytestmark = pytest.mark.anyio

GITEA_PATH = "/hook/" + sig.hook_digest(GITEA_TOKEN, "gitea", "flux-system")
HMAC_PATH = "/hook/" + sig.hook_digest(HMAC_TOKEN, "hmac", "flux-system")
ALLOWED = {200, 202, 400, 401, 404, 413, 415, 422, 429, 503}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["ref", "after", "repository", "commits", "clone_url",
                                       "total_commits", "head_commit", "id", "added", "paths",
                                       "sha", "modified", "x"]), children, max_size=6),
    max_leaves=25,
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


async def _send(bridge: Bridge, path: str, body: bytes, headers: dict[str, str]) -> int:
    r = await bridge.client.post(path, content=body, headers=headers)
    assert r.status_code in ALLOWED, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    return r.status_code


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(doc=json_values, event=st.sampled_from(["push", "ping", "", "issues", "PUSH"]),
       content_type=st.sampled_from(["application/json", "application/x-www-form-urlencoded",
                                     "text/plain", ""]))
async def test_signed_random_json_never_500(bridge: Bridge, doc: Any, event: str,
                                            content_type: str) -> None:
    body = json.dumps(doc).encode()
    headers = {"Content-Type": content_type, "X-Gitea-Event": event,
               "X-Gitea-Signature": sig.hmac_hex("sha256", GITEA_TOKEN, body)}
    await _send(bridge, GITEA_PATH, body, headers)
    hmac_headers = {"Content-Type": content_type,
                    "X-Signature": "sha256=" + sig.hmac_hex("sha256", HMAC_TOKEN, body)}
    await _send(bridge, HMAC_PATH, body, hmac_headers)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=300), sig_header=header_values, auth=header_values,
       ctype=header_values, length=st.one_of(st.none(), header_values))
async def test_garbage_never_500(bridge: Bridge, body: bytes, sig_header: str, auth: str,
                                 ctype: str, length: str | None) -> None:
    headers = {"X-Signature": sig_header, "X-Gitea-Signature": sig_header,
               "X-Hub-Signature-256": sig_header, "Authorization": auth, "Content-Type": ctype}
    await _send(bridge, GITEA_PATH, body, headers)
    await _send(bridge, HMAC_PATH, body, headers)
    form = b"payload=" + body
    await _send(bridge, GITEA_PATH, form, {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Gitea-Signature": sig.hmac_hex("sha256", GITEA_TOKEN, body)})


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.text(alphabet="abcdef0123456789/%._-~", max_size=90))
async def test_random_paths_never_500(bridge: Bridge, path: str) -> None:
    r = await bridge.client.post("/hook/" + path, content=b"{}")
    assert r.status_code in {404, 405}
    r = await bridge.client.get("/deliveries/" + path + "?wait=abc")
    assert r.status_code in {400, 404}
    r = await bridge.client.get("/badge/" + path)
    assert r.status_code < 500
