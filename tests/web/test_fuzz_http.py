"""No input makes the service answer 500: random bodies, headers and paths, signed and not."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver import signatures as sig
from tests.conftest import ACTIONS_TOKEN, GITEA_TOKEN, HMAC_TOKEN, Bridge, make_settings

pytestmark = pytest.mark.anyio

GITEA_PATH = "/hook/" + sig.hook_digest(GITEA_TOKEN, "gitea", "flux-system")
HMAC_PATH = "/hook/" + sig.hook_digest(HMAC_TOKEN, "hmac", "flux-system")
ACTIONS_PATH = "/hook/" + sig.hook_digest(ACTIONS_TOKEN, "actions", "apps")
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
    _count("hook-signed")
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
    _count("hook-garbage")
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
    _count("paths")
    r = await bridge.client.post("/hook/" + path, content=b"{}")
    assert r.status_code in {404, 405}
    r = await bridge.client.get("/deliveries/" + path + "?wait=abc")
    assert r.status_code in {400, 404}
    r = await bridge.client.get("/badge/" + path)
    assert r.status_code < 500


# -- every public endpoint, hostile headers and bodies, no credential -------------
#
# A fixed budget (max_examples: about 1,100 cases, 1,700 requests in all); the module prints how many
# cases it tried. Invariants: never a 5xx other than a 503, nothing escapes the app, and
# without a valid credential nothing changes: no annotation patch, no event accepted, no status
# queued.

CASES: dict[str, int] = {}
EVENTS_TOKEN = "events-hmac-token"
# Hostile text: controls, bidi marks, non-ASCII digits, latin-1 bytes as Starlette decodes them.
hostile_text = st.text(
    alphabet=st.sampled_from([*"t=v1,sha256=abc0123456789 ;/\\\"'{}[]",
                              "\u00b2", "\u0663", "\u202e", "\u00ff", "\t", "\x7f"]),
    max_size=120)
content_types = st.sampled_from([
    "application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain", "",
    "application/json;;;", "\u00ff/\u00ff"])
bodies = st.one_of(
    st.binary(max_size=400),
    json_values.map(lambda d: json.dumps(d).encode()),
    st.integers(0, 2000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
    st.integers(0, 120).map(lambda n: "&".join(f"f{i}=x" for i in range(n)).encode()),
    st.just(b'{"ref": "\\ud800", "metadata": {"' + b"a." * 3000 + b'": "x"}}'),
)


def _latin1(headers: dict[str, str]) -> dict[str, bytes]:
    """Header values as raw bytes: Starlette decodes them as latin-1, so send them that way."""
    return {k: v.encode("latin-1", "replace") for k, v in headers.items()}


def _count(name: str) -> None:
    CASES[name] = CASES.get(name, 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _report_cases(pytestconfig: pytest.Config) -> Any:
    yield
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and CASES:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(CASES.items()))
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nfuzz_http: {sum(CASES.values())} cases ({parts})")


def _unchanged(bridge: Bridge, patches: int) -> None:
    assert len(bridge.cluster.patches) == patches
    metrics = bridge.parts.metrics.registry
    assert not metrics.get_sample_value("gfb_events_total", {"outcome": "accepted"})
    assert bridge.parts.statuses.queue_depth == 0


@pytest.fixture
async def events_bridge(bridge_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Bridge:
    token = tmp_path_factory.mktemp("events") / "hmac"
    token.write_text(EVENTS_TOKEN)
    bridge: Bridge = await bridge_factory(make_settings(events={"hmac_token": {"file": str(token)}}))
    return bridge


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, ctype=content_types, signature=hostile_text, auth=hostile_text,
       event=st.sampled_from(["push", "ping", "", "\u00ff"]),
       path=st.sampled_from([GITEA_PATH, HMAC_PATH, ACTIONS_PATH]))
async def test_hook_without_a_credential_changes_nothing(
    events_bridge: Bridge, body: bytes, ctype: str, signature: str, auth: str, event: str,
    path: str,
) -> None:
    _count("hook")
    bridge = events_bridge
    before = len(bridge.cluster.patches)
    headers = {"Content-Type": ctype, "X-Signature": signature, "X-Gitea-Signature": signature,
               "X-Hub-Signature-256": signature, "Authorization": auth, "X-Gitea-Event": event,
               "X-Gitea-Delivery": signature}
    r = await bridge.client.post(path, content=body, headers=_latin1(headers))
    assert r.status_code in {400, 401, 404, 413, 415, 429}, (r.status_code, r.text)
    _unchanged(bridge, before)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, ctype=content_types, signature=hostile_text, auth=hostile_text)
async def test_events_without_a_credential_change_nothing(
    events_bridge: Bridge, body: bytes, ctype: str, signature: str, auth: str
) -> None:
    _count("events")
    bridge = events_bridge
    headers = {"Content-Type": ctype, "X-Signature": signature, "Authorization": auth}
    r = await bridge.client.post("/events", content=body, headers=_latin1(headers))
    assert r.status_code in {401, 413, 415}, (r.status_code, r.text)
    _unchanged(bridge, len(bridge.cluster.patches))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
async def test_signed_events_of_any_shape_never_500(events_bridge: Bridge, body: bytes) -> None:
    _count("events-signed")
    signature = "sha256=" + sig.hmac_hex("sha256", EVENTS_TOKEN, body)
    r = await events_bridge.client.post("/events", content=body, headers={
        "Content-Type": "application/json", "X-Signature": signature})
    assert r.status_code in {202, 400, 413, 422, 503}, (r.status_code, r.text)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(signature=hostile_text, auth=hostile_text, wait=hostile_text,
       known=st.booleans())
async def test_delivery_reads_without_a_credential_reveal_nothing(
    events_bridge: Bridge, signature: str, auth: str, wait: str, known: bool
) -> None:
    _count("deliveries")
    bridge = events_bridge
    # A real delivery id (the signed record a push reply names), made once per bridge.
    delivery = getattr(bridge, "fuzz_delivery", None)
    if known and delivery is None:
        r = await bridge.client.post(ACTIONS_PATH, headers={
            "Authorization": f"Bearer {ACTIONS_TOKEN}"})
        assert r.status_code == 202
        delivery = r.json()["delivery"]
        bridge.fuzz_delivery = delivery  # type: ignore[attr-defined]
    target = delivery if known and delivery else "unknown-delivery"
    r = await bridge.client.get(f"/deliveries/{target}", params={"wait": wait},
                                headers=_latin1({"X-Signature": signature,
                                                 "Authorization": auth}))
    assert (r.status_code, r.json()) == (404, {"error": "no such delivery"})


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.text(max_size=60), query=st.dictionaries(
    st.sampled_from(["branch", "cluster", "style", "token", "x"]), hostile_text, max_size=4))
async def test_badges_of_any_path_and_query_are_svg(
    events_bridge: Bridge, path: str, query: dict[str, str]
) -> None:
    _count("badge")
    r = await events_bridge.client.get("/badge/" + quote(path, safe="/"), params=query)
    assert r.status_code in {200, 304, 404}, (r.status_code, r.text)
    if r.status_code == 200:
        assert r.headers["content-type"].startswith("image/svg+xml")
