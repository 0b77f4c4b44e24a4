"""`spec.resourceFilter` (CEL over `res` and `req`) and `spec.events`, with Flux's semantics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from receiver import signatures as sig
from receiver.flux.objects import RECONCILE_ANNOTATION, ObjectKey
from receiver.push.cel_filter import (
    FilterCache,
    InvalidFilter,
    RequestNotJSON,
    compile_filter,
    is_json_content,
    request_document,
)
from tests.conftest import FLEET, GITEA_TOKEN, HMAC_TOKEN, Bridge
from tests.gitea_payloads import gitea_bytes, push

RES = {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
       "metadata": {"name": "podinfo", "namespace": "flux-system",
                    "labels": {"app": "podinfo"}, "annotations": {"team": "web"}}}
REQ = {"tag": "v1.0.0", "ref": "refs/heads/main"}

# Filters from Flux's Receiver docs and their shapes (string functions included).
FLUX_EXAMPLES = [
    ("req.tag == 'v1.0.0'", True),
    ("res.metadata.name == 'podinfo'", True),
    ("'app' in res.metadata.labels && res.metadata.labels['app'] == 'podinfo'", True),
    ("res.metadata.name.startsWith('pod')", True),
    ("res.metadata.name.endsWith('info')", True),
    ("res.metadata.name.contains('odin')", True),
    ("res.metadata.name.matches('^pod[a-z]+$')", True),
    ("has(res.metadata.labels) && res.metadata.labels.app == 'web'", False),
    ("res.metadata.annotations['team'] == 'web' && req.ref.endsWith('/main')", True),
    ("res.metadata.name.lowerAscii() == 'podinfo'", True),
]


@pytest.mark.parametrize(("expression", "expected"), FLUX_EXAMPLES)
def test_flux_examples(expression: str, expected: bool) -> None:
    assert compile_filter(expression).evaluate([RES], REQ) == [expected]


@pytest.mark.parametrize(("expression", "why"), [
    ("res.metadata.name ==", "Syntax error"),
    ("1 + 1", "expected bool, got int"),
    ("res.metadata.name", "expected bool, got dyn"),  # Flux wants exactly bool, as compiled
    ("nothere == 1", "undeclared reference"),
    ("x" * 20_000, "longer than"),
])
def test_an_invalid_expression_is_refused_with_why(expression: str, why: str) -> None:
    with pytest.raises(InvalidFilter, match=why):
        compile_filter(expression)


def test_each_resource_alone_and_errors_only_for_that_resource() -> None:
    f = compile_filter("res.metadata.labels.app == 'podinfo'  // a trailing comment")
    other = {"metadata": {"name": "x"}}
    verdicts = f.evaluate([RES, other, {**RES, "metadata": {"labels": {"app": "no"}}}], {})
    assert verdicts[0] is True and verdicts[2] is False
    assert isinstance(verdicts[1], str) and "labels" in verdicts[1]
    assert f.evaluate([], {}) == []


def test_a_runaway_expression_over_a_large_body_stops_with_an_error() -> None:
    f = compile_filter("req.l.all(a, req.l.all(b, a == b || true))")
    verdicts = f.evaluate([RES], {"l": list(range(5000))})
    assert isinstance(verdicts[0], str) and "budget" in verdicts[0].lower()


def test_req_is_the_json_object_only_for_json_requests_as_flux() -> None:
    assert request_document("application/json; charset=utf-8", b'{"a": 1}') == {"a": 1}
    assert request_document("text/plain", b'{"a": 1}') == {}
    assert request_document("", b"deploy") == {}
    assert request_document("application/x-www-form-urlencoded", b"payload=%7B%7D") == {}
    assert is_json_content("text/plain, application/json")
    assert not is_json_content("bad, application/json")  # Go stops at an unparsable type
    for body in (b"deploy", b"[1]", b"[" * 100_000):
        with pytest.raises(RequestNotJSON):
            request_document("application/json", body)


def test_compiled_once_per_resource_version() -> None:
    cache = FilterCache()
    first = cache.get("k", "1", "true")
    assert cache.get("k", "1", "true") is first
    assert cache.get("k", "2", "true") is not first
    assert isinstance(cache.get("k", "3", "1"), InvalidFilter)
    assert list(cache.invalid()) == ["k"]


# -- the service ---------------------------------------------------------------------------

HMAC_RESOURCES = [{"kind": "GitRepository", "name": "flux-system"},
                  {"kind": "GitRepository", "name": "fleet-staging"}]


def _receivers(hmac_spec: dict[str, Any], github_spec: dict[str, Any]) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((FLEET / "receivers.yaml").read_text()) if d]
    for doc in docs:
        if doc["kind"] == "Receiver" and doc["metadata"]["name"] == "hmac":
            doc["spec"].update({"resources": HMAC_RESOURCES, **hmac_spec})
        if doc["kind"] == "Receiver" and doc["metadata"]["name"] == "gitea":
            doc["spec"].update(github_spec)
    return docs


async def _bridge(bridge_factory: Any, tmp_path: Path, hmac_spec: dict[str, Any] | None = None,
                  github_spec: dict[str, Any] | None = None) -> Bridge:
    for item in FLEET.iterdir():
        if item.suffix == ".yaml":
            shutil.copy(item, tmp_path / item.name)
    (tmp_path / "receivers.yaml").write_text(
        yaml.safe_dump_all(_receivers(hmac_spec or {}, github_spec or {})))
    bridge: Bridge = await bridge_factory(directory=tmp_path)
    return bridge


HMAC_PATH = "/hook/" + sig.hook_digest(HMAC_TOKEN, "hmac", "flux-system")
GITEA_PATH = "/hook/" + sig.hook_digest(GITEA_TOKEN, "gitea", "flux-system")


async def _post_hmac(bridge: Bridge, body: bytes, content_type: str = "text/plain") -> Any:
    return await bridge.client.post(HMAC_PATH, content=body, headers={
        "Content-Type": content_type,
        "X-Signature": "sha256=" + sig.hmac_hex("sha256", HMAC_TOKEN, body)})


async def _post_gitea(bridge: Bridge, event: str, doc: Any) -> Any:
    body = gitea_bytes(doc)
    return await bridge.client.post(GITEA_PATH, content=body, headers={
        "Content-Type": "application/json", "X-GitHub-Event": event, "X-Gitea-Event": event,
        "X-Gitea-Signature": sig.hmac_hex("sha256", GITEA_TOKEN, body)})


def _annotated(bridge: Bridge, name: str) -> bool:
    obj = bridge.cluster.store.get(ObjectKey("GitRepository", "flux-system", name))
    return obj is not None and RECONCILE_ANNOTATION in obj.annotations


@pytest.mark.anyio
async def test_a_false_filter_skips_the_resource_with_the_reason(
    bridge_factory: Any, tmp_path: Path,
) -> None:
    bridge = await _bridge(bridge_factory, tmp_path, {
        "resourceFilter": "res.metadata.name == 'flux-system' && req.action == 'deploy'"})
    r = await _post_hmac(bridge, json.dumps({"action": "deploy"}).encode(), "application/json")
    assert r.status_code == 202, r.text
    reply = r.json()
    assert [t["name"] for t in reply["targets"]] == ["flux-system"]
    assert {t["name"]: t["reason"] for t in reply["skipped"]} == {
        "fleet-staging": "resourceFilter is false"}
    # A body that is not JSON gives `req = {}`, as Flux: the key is missing, an error for the
    # one resource whose name matched (CEL's `false && error` is false). Flux fails the whole
    # request; so does the bridge (422, nothing annotated), so a CI step sees the failure.
    patches = len(bridge.cluster.patches)
    r = await _post_hmac(bridge, b"deploy")
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(
        "resourceFilter could not be evaluated for GitRepository flux-system/flux-system: ")
    assert len(bridge.cluster.patches) == patches
    # A JSON request whose body is no JSON object is refused, as Flux refuses it (500 there).
    r = await _post_hmac(bridge, b"[1]", "application/json")
    assert r.status_code == 400


@pytest.mark.anyio
async def test_the_filter_decides_what_is_annotated(bridge_factory: Any, tmp_path: Path) -> None:
    bridge = await _bridge(bridge_factory, tmp_path, {
        "resourceFilter": "res.metadata.name.endsWith('staging')"})
    r = await _post_hmac(bridge, b"")
    assert r.status_code == 202, r.text
    assert [t["name"] for t in r.json()["targets"]] == ["fleet-staging"]
    assert not _annotated(bridge, "flux-system")


@pytest.mark.anyio
async def test_an_invalid_filter_makes_the_receiver_unusable(
    bridge_factory: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    bridge = await _bridge(bridge_factory, tmp_path, {"resourceFilter": "res.metadata.name"})
    r = await _post_hmac(bridge, b"")
    assert r.status_code == 503
    assert "resourceFilter" in r.json()["error"]
    registry = bridge.parts.metrics.registry
    assert registry.get_sample_value("gfb_receivers_filter_invalid") == 1
    assert any("resourceFilter is invalid" in rec.getMessage() for rec in caplog.records)
    assert not _annotated(bridge, "flux-system")


@pytest.mark.anyio
async def test_a_resource_entry_filter_decides_for_its_objects_only(
    bridge_factory: Any, tmp_path: Path,
) -> None:
    # spec.resources[].filter (Flux 1.9): ANDed with resourceFilter, for that entry's objects.
    bridge = await _bridge(bridge_factory, tmp_path, {"resources": [
        {"kind": "GitRepository", "name": "flux-system"},
        {"kind": "GitRepository", "name": "fleet-staging", "filter": "'staging' in req"}]})
    r = await _post_hmac(bridge, b'{"action":"deploy"}', "application/json")
    assert r.status_code == 202, r.text
    assert [t["name"] for t in r.json()["targets"]] == ["flux-system"]
    assert {t["name"]: t["reason"] for t in r.json()["skipped"]} == {
        "fleet-staging": "its spec.resources[].filter is false"}
    assert not _annotated(bridge, "fleet-staging")
    r = await _post_hmac(bridge, b'{"staging":true}', "application/json")
    assert r.status_code == 202, r.text
    assert sorted(t["name"] for t in r.json()["targets"]) == ["fleet-staging", "flux-system"]
    # With the top-level filter too, an object needs both.
    (tmp_path / "both").mkdir()
    bridge = await _bridge(bridge_factory, tmp_path / "both", {
        "resourceFilter": "res.metadata.name != 'flux-system'", "resources": [
            {"kind": "GitRepository", "name": "flux-system"},
            {"kind": "GitRepository", "name": "fleet-staging", "filter": "'staging' in req"}]})
    r = await _post_hmac(bridge, b'{"staging":true}', "application/json")
    assert [t["name"] for t in r.json()["targets"]] == ["fleet-staging"]


@pytest.mark.anyio
async def test_an_invalid_entry_filter_makes_the_receiver_unusable(
    bridge_factory: Any, tmp_path: Path,
) -> None:
    bridge = await _bridge(bridge_factory, tmp_path, {"resources": [
        {"kind": "GitRepository", "name": "flux-system"},
        {"kind": "GitRepository", "name": "no-such-repo", "filter": "res.metadata.name"}]})
    r = await _post_hmac(bridge, b"")
    assert r.status_code == 503
    assert "spec.resources[].filter" in r.json()["error"]
    assert not _annotated(bridge, "flux-system")


@pytest.mark.anyio
async def test_github_events_as_flux_honours_them(bridge_factory: Any, tmp_path: Path) -> None:
    bridge = await _bridge(bridge_factory, tmp_path, github_spec={"events": ["Push", "release"]})
    # Not listed: Flux answers 400 and reconciles nothing; ping included.
    for event in ("issues", "ping"):
        r = await _post_gitea(bridge, event, {"action": "opened"})
        assert r.status_code == 400, (event, r.text)
        assert "spec.events" in r.text
    # Listed, case-insensitive: a push is routed.
    r = await _post_gitea(bridge, "push", push())
    assert r.status_code == 202, r.text
    # Flux matches spec.events against X-GitHub-Event alone (Gitea sends it with every
    # webhook): a request that names its event only in Gitea's own header is refused there.
    body = gitea_bytes(push())
    r = await bridge.client.post(GITEA_PATH, content=body, headers={
        "Content-Type": "application/json", "X-Gitea-Event": "push",
        "X-Gitea-Signature": sig.hmac_hex("sha256", GITEA_TOKEN, body)})
    assert r.status_code == 400 and "spec.events" in r.text, r.text
    # Listed, an event the bridge does not route: every listed object, as Flux does, with the
    # reason.
    r = await _post_gitea(bridge, "release", {"action": "published", "repository": {
        "full_name": "platform/fleet"}, "release": {"tag_name": "v1.0.0"}})
    assert r.status_code == 202, r.text
    assert r.json()["note"] and r.json()["targets"]


@pytest.mark.anyio
async def test_without_events_every_event_is_taken(bridge_factory: Any, tmp_path: Path) -> None:
    bridge = await _bridge(bridge_factory, tmp_path)
    r = await _post_gitea(bridge, "ping", {"zen": "x"})
    assert r.status_code == 200 and r.json() == {"status": "pong"}
    r = await _post_gitea(bridge, "issues", {"action": "opened"})
    assert r.status_code == 200 and r.json()["status"] == "ignored"
    assert "spec.events" in r.json()["reason"]


def test_the_cel_runtime_is_loaded_only_when_a_filter_is_compiled() -> None:
    """Importing the CEL runtime costs about 15 MB of every bridge's memory, and most fleets have
    no filter: the HTTP app and the filter types load without it, the first compile loads it."""
    probe = ("import sys\n"
             "import receiver.web.app, receiver.push.cel_worker\n"
             "before = 'cel_expr_python' in sys.modules\n"
             "from receiver.push.cel_filter import compile_filter\n"
             "verdicts = compile_filter(\"res.metadata.name == 'a'\").evaluate(\n"
             "    [{'metadata': {'name': 'a'}}, {'metadata': {'name': 'b'}}], {})\n"
             "print(before, 'cel_expr_python' in sys.modules, verdicts)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.stdout.split("\n")[0] == "False True [True, False]"
