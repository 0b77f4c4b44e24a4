"""Reading Flux events as notification-controller 1.9 sends them (raw Go json.Marshal bytes)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.signatures import hmac_hex, verify_event
from receiver.status.flux_events import (
    MAX_KEY_NAME,
    MAX_KEY_PREFIX,
    MAX_MESSAGE,
    MAX_METADATA_VALUE,
    EventError,
    FluxEvent,
    normalise_metadata,
    parse_event,
    split_prefixed,
)

EVENTS = Path(__file__).parent.parent / "fixtures" / "events"
SHA = "5394cb7f48ab9fd33a7a95f6ee1f7b9c4b2b8a3e"
SHA256 = "a" * 64


def raw(name: str) -> bytes:
    return (EVENTS / name).read_bytes()


def event(**overrides: object) -> bytes:
    doc: dict[str, object] = {
        "involvedObject": {"kind": "Kustomization", "namespace": "apps", "name": "webapp",
                           "apiVersion": "kustomize.toolkit.fluxcd.io/v1"},
        "severity": "info", "timestamp": "2026-08-07T13:04:05Z", "message": "m",
        "reason": "ReconciliationSucceeded", "metadata": {"revision": f"main@sha1:{SHA}"},
        "reportingController": "kustomize-controller",
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


def test_fixtures_are_go_json_marshal_output() -> None:
    body = raw("kustomization-build-failed.json")
    assert not body.endswith(b"\n") and b": " not in body.split(b'"message"')[0]
    assert b"\\u003cnil\\u003e" in body and b"\\u0026 more" in body
    keys = list(json.loads(body))
    assert keys == ["involvedObject", "severity", "timestamp", "message", "reason", "metadata",
                    "reportingController", "reportingInstance"]


def test_kustomization_success() -> None:
    ev = parse_event(raw("kustomization-succeeded.json"))
    assert ev.involved.kind == "Kustomization"
    assert (ev.involved.namespace, ev.involved.name) == ("apps", "webapp")
    assert ev.involved.api_version == "kustomize.toolkit.fluxcd.io/v1"
    assert ev.involved.group == "kustomize.toolkit.fluxcd.io"
    assert ev.severity == "info" and ev.reason == "ReconciliationSucceeded"
    assert ev.timestamp == "2026-08-07T13:04:05Z"
    assert ev.reporting_controller == "kustomize-controller"
    assert ev.metadata["commit_status"] == "update"
    assert ev.revision == f"main@sha1:{SHA}"
    assert ev.commit == SHA


def test_go_escapes_are_decoded() -> None:
    ev = parse_event(raw("kustomization-build-failed.json"))
    assert ev.severity == "error" and ev.reason == "BuildFailed"
    assert "`<nil>`" in ev.message and "& more" in ev.message
    assert parse_event(raw("gitrepository-new-artifact.json")).message.endswith(
        "'Bump webapp to 1.4.2 & fix <probe>'")


@pytest.mark.parametrize("name, kind, reason, commit", [
    ("kustomization-progressing.json", "Kustomization", "Progressing", SHA),
    ("kustomization-health-check-failed.json", "Kustomization", "HealthCheckFailed", SHA),
    ("gitrepository-new-artifact.json", "GitRepository", "NewArtifact", SHA),
    ("helmrelease-with-commit.json", "HelmRelease", "UpgradeSucceeded", SHA),
    ("helmrelease-chart-revision.json", "HelmRelease", "UpgradeFailed", None),
    ("helmrelease-without-commit.json", "HelmRelease", "InstallSucceeded", None),
    ("kustomization-succeeded-prefixed.json", "Kustomization", "ReconciliationSucceeded", SHA),
])
def test_every_fixture(name: str, kind: str, reason: str, commit: str | None) -> None:
    ev = parse_event(raw(name))
    assert (ev.involved.kind, ev.reason, ev.commit) == (kind, reason, commit)


def test_helm_chart_version_names_no_full_commit() -> None:
    # The chart version's commit prefix is matched by statuses (test_statuses), not here.
    ev = parse_event(raw("helmrelease-chart-revision.json"))
    assert ev.commit is None
    assert ev.revision.endswith(SHA[:12])


def test_prefixed_metadata_from_older_controllers() -> None:
    ev = parse_event(raw("kustomization-succeeded-prefixed.json"))
    assert dict(ev.metadata) == {"revision": f"main/{SHA}", "commit_status": "update"}


def test_metadata_precedence_and_dropped_keys() -> None:
    group = "kustomize.toolkit.fluxcd.io"
    meta = normalise_metadata({
        f"{group}/revision": "controller",
        "event.toolkit.fluxcd.io/revision": "annotation",
        "other.example.com/revision": "other",
        f"{group}/token": "secret-values-digest",
        "event.toolkit.fluxcd.io/commit": SHA,
        "summary": "prod",
        "not-a-string": 3,
    }, group)
    assert meta == {"revision": "controller", "commit": SHA, "summary": "prod"}
    assert normalise_metadata({"revision": "plain", f"{group}/revision": "prefixed"}, group) == {
        "revision": "plain"}


@pytest.mark.parametrize("metadata, expected", [
    ({"commit": SHA, "originRevision": f"main@sha1:{'b' * 40}", "revision": f"x@sha1:{'c' * 40}"},
     SHA),
    ({"originRevision": f"main@sha1:{'b' * 40}", "revision": f"x@sha1:{'c' * 40}"}, "b" * 40),
    ({"revision": f"v1.2.0@sha1:{SHA}"}, SHA),
    ({"revision": f"refs/pull/1/head@sha1:{SHA}"}, SHA),
    ({"revision": f"main@sha256:{SHA256}"}, SHA256),
    ({"revision": f"feature/branch/{SHA.upper()}"}, SHA),
    ({"revision": SHA}, SHA),
    ({"revision": "latest@sha256:" + "z" * 64}, None),
    ({"revision": "main@sha1:abc"}, None),
    ({}, None),
])
def test_commit_in_get_revision_order(metadata: dict[str, str], expected: str | None) -> None:
    assert parse_event(event(metadata=metadata)).commit == expected


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b"\xff\xfe", 400),
    (b"[]", 422),
    (event(involvedObject="x"), 422),
    (event(involvedObject={"kind": "Kustomization", "namespace": "apps"}), 422),
    (event(reason=""), 422),
    (event(reason=7), 422),
    (event(severity="fatal"), 422),
    (event(metadata=["revision"]), 422),
])
def test_bad_events(body: bytes, status: int) -> None:
    with pytest.raises(EventError) as info:
        parse_event(body)
    assert info.value.status == status


def test_metadata_may_be_absent() -> None:
    doc = json.loads(event())
    del doc["metadata"]
    ev = parse_event(json.dumps(doc).encode())
    assert isinstance(ev, FluxEvent) and ev.metadata == {} and ev.commit is None


def test_signature_is_over_the_raw_bytes() -> None:
    body = raw("kustomization-build-failed.json")
    signature = "sha256=" + hmac_hex("sha256", "hmac-token", body)
    assert verify_event({"x-signature": signature}, body, "hmac-token").ok
    # Python re-serialises `<` as `<`, not `\u003c`: a re-encoded body would not verify.
    reencoded = json.dumps(json.loads(body), separators=(",", ":")).encode()
    assert reencoded != body
    assert not verify_event({"x-signature": signature}, reencoded, "hmac-token").ok


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children), max_leaves=20)


# No deadline: on a busy shared machine one example may take longer than 200 ms.
@settings(deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_fail_cleanly(body: bytes) -> None:
    try:
        parse_event(body)
    except EventError as exc:
        assert exc.status in (400, 422)


@settings(deadline=None)
@given(st.dictionaries(st.sampled_from(["involvedObject", "severity", "reason", "metadata",
                                        "message", "timestamp"]), _json))
def test_any_json_shape_parses_or_fails_cleanly(doc: dict[str, object]) -> None:
    try:
        parse_event(json.dumps(doc).encode())
    except EventError as exc:
        assert exc.status == 422


# -- hostile metadata, nesting and text ----------------------------------

_OLD_PREFIXED = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?\.[a-z0-9.-]+/(?P<key>[^/]+)$")


@settings(deadline=None)
@given(st.text(alphabet="ab0.-/Z_", max_size=24))
def test_prefix_split_means_what_the_dns_pattern_meant(key: str) -> None:
    match = _OLD_PREFIXED.match(key)
    expected = None if match is None else (key[: -len(match["key"])], match["key"])
    assert split_prefixed(key) == expected


def test_a_pathological_key_is_parsed_in_linear_time() -> None:
    # A backtracking pattern took seconds on this key (minutes on a 3 MB one): a linear
    # pass takes well under a millisecond, so the bound below has a margin of thousands.
    hostile = "a." * 70_000
    started = time.perf_counter()
    assert split_prefixed(hostile) is None
    assert split_prefixed(hostile + "/x") == (hostile + "/", "x")
    meta = normalise_metadata({hostile: "v", hostile + "a/x": "v", "revision": "r"}, "g")
    assert time.perf_counter() - started < 0.5
    assert meta == {"revision": "r"}


def test_over_long_metadata_keys_and_values_are_ignored() -> None:
    name = "n" * MAX_KEY_NAME
    prefix = ".".join(["p" * 63] * 4)[:MAX_KEY_PREFIX]
    meta = normalise_metadata({
        f"{prefix}/{name}": "longest key Flux can send",
        f"{prefix}/{name}x": "name too long",
        f"x{prefix}/short": "prefix too long",
        "m" * (MAX_KEY_NAME + 1): "unprefixed name too long",
        "revision": "r" * (MAX_METADATA_VALUE + 1),
        "commit": SHA,
    }, "")
    assert meta == {name: "longest key Flux can send", "commit": SHA}


def test_a_deeply_nested_event_is_a_400() -> None:
    body = b'{"metadata":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(EventError) as info:
        parse_event(body)
    assert info.value.status == 400


def test_lone_surrogates_are_replaced_so_every_field_encodes() -> None:
    body = event(message="bad \ud800 byte", reason="Progressing\udfff",
                 metadata={"revision": f"main@sha1:{SHA}", "summary": "s\ud83d"})
    assert b"\\ud800" in body
    ev = parse_event(body)
    assert ev.message == "bad \ufffd byte" and ev.reason == "Progressing\ufffd"
    assert ev.metadata["summary"] == "s\ufffd"
    for text in (ev.message, ev.reason, *ev.metadata.values()):
        text.encode()  # never UnicodeEncodeError


def test_a_huge_message_is_cut() -> None:
    ev = parse_event(event(message="x" * (MAX_MESSAGE * 4)))
    assert len(ev.message) == MAX_MESSAGE
