"""Badge SVGs, tokens and the repository state they show (the HTTP side is in
test_status_service.py)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.flux.objects import FluxObject
from receiver.flux.store import ObjectStore
from receiver.giturls import normalise_repo_url
from receiver.status.badges import (
    COLOURS,
    MESSAGES,
    UNKNOWN,
    badge_svg,
    combine,
    mint_badge_token,
    object_state,
    render_badge,
    repository_state,
    select_consumers,
    text_width,
    token_allows,
)
from receiver.status.decisions import FAILURE, PENDING, SUCCESS

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # noqa: S314 (our own SVG, not untrusted input)


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def fills(root: ET.Element) -> list[str]:
    return [r.get("fill", "") for r in root.iter(f"{SVG}rect")]


@pytest.mark.parametrize("style", ["flat", "flat-square"])
@pytest.mark.parametrize("state", [SUCCESS, FAILURE, PENDING, UNKNOWN])
def test_badges_parse_and_show_state(style: str, state: str) -> None:
    root = parse(badge_svg("eu-west", state, style))
    assert root.tag == f"{SVG}svg" and root.get("height") == "20"
    assert MESSAGES[state] in texts(root) and "eu-west" in texts(root)
    assert COLOURS[state] in fills(root)
    assert root.findtext(f"{SVG}title") == f"eu-west: {MESSAGES[state]}"
    assert (root.find(f"{SVG}linearGradient") is not None) == (style == "flat")


def test_colours_are_gitea_and_shields_ones() -> None:
    assert COLOURS == {SUCCESS: "#4c1", FAILURE: "#e05d44", PENDING: "#dfb317",
                       UNKNOWN: "#9f9f9f"}


def test_unknown_state_renders_unknown() -> None:
    root = parse(badge_svg("x", "bogus"))
    assert "unknown" in texts(root) and "#9f9f9f" in fills(root)


@given(st.text(max_size=40), st.text(max_size=40))
def test_any_text_is_escaped(label: str, message: str) -> None:
    root = parse(render_badge(label, message, '#4c1"><script/>'))
    assert root.find(f".//{SVG}script") is None
    width = int(root.get("width", "0"))
    assert width >= 20


def test_text_width_grows_and_wide_letters_are_wider() -> None:
    assert text_width("") == 0
    assert text_width("deployed") < text_width("deployed!!")
    assert text_width("mmmm") > text_width("iiii")


def test_tokens() -> None:
    token = mint_badge_token("key", "Team", "WebApp", "release/1.x")
    assert token_allows("key", token, "team", "webapp", "release/1.x")
    assert not token_allows("other-key", token, "team", "webapp", "release/1.x")
    assert not token_allows("key", token, "team", "webapp", "main")
    assert not token_allows("key", token, "team", "other", "release/1.x")
    assert not token_allows("key", token[:-2] + "xx", "team", "webapp", "release/1.x")
    assert not token_allows("key", "", "team", "webapp", "release/1.x")
    assert not token_allows("key", "not.a.token", "team", "webapp", "release/1.x")
    assert not token_allows("", token, "team", "webapp", "release/1.x")


def obj_with(conditions: list[dict[str, str]], **spec: Any) -> FluxObject:
    return FluxObject({"kind": "Kustomization", "metadata": {"name": "a", "namespace": "n"},
                       "spec": spec, "status": {"conditions": conditions}})


@pytest.mark.parametrize("conditions, spec, state", [
    ([{"type": "Ready", "status": "True", "reason": "ReconciliationSucceeded"}], {}, SUCCESS),
    ([{"type": "Ready", "status": "False", "reason": "BuildFailed"}], {}, FAILURE),
    ([{"type": "Ready", "status": "False", "reason": "ArtifactFailed"}], {}, FAILURE),
    ([{"type": "Ready", "status": "False", "reason": "DependencyNotReady"}], {}, PENDING),
    ([{"type": "Ready", "status": "Unknown", "reason": "Progressing"}], {}, PENDING),
    ([{"type": "Ready", "status": "True", "reason": "ReconciliationSucceeded"},
      {"type": "Stalled", "status": "True", "reason": "AccessDenied"}], {}, FAILURE),
    ([], {}, UNKNOWN),
    ([{"type": "Ready", "status": "True", "reason": "ReconciliationSucceeded"}],
     {"suspend": True}, UNKNOWN),
])
def test_object_state(conditions: list[dict[str, str]], spec: dict[str, Any],
                      state: str) -> None:
    assert object_state(obj_with(conditions, **spec)) == state


def test_combine_is_worst_first() -> None:
    assert combine([SUCCESS, PENDING, SUCCESS]) == PENDING
    assert combine([SUCCESS, FAILURE, PENDING]) == FAILURE
    assert combine([UNKNOWN, SUCCESS]) == SUCCESS
    assert combine([]) == UNKNOWN


def store_with_branches() -> ObjectStore:
    store = ObjectStore(lambda u: normalise_repo_url(u, {}))

    def source(name: str, ref: dict[str, str] | None, url: str) -> None:
        spec: dict[str, Any] = {"url": url}
        if ref is not None:
            spec["ref"] = ref
        store.upsert({"kind": "GitRepository", "metadata": {"name": name, "namespace": "f"},
                      "spec": spec})

    def consumer(name: str, source_name: str, ready: str) -> None:
        store.upsert({"kind": "Kustomization", "metadata": {"name": name, "namespace": "apps"},
                      "spec": {"sourceRef": {"kind": "GitRepository", "name": source_name,
                                             "namespace": "f"}},
                      "status": {"conditions": [{"type": "Ready", "status": ready,
                                                 "reason": "X"}]}})

    source("main", {"branch": "main"}, "https://gitea.example.com/team/webapp.git")
    source("release", {"branch": "release/1.x"}, "ssh://git@gitea.example.com/Team/WebApp")
    source("master", None, "https://gitea.example.com/team/webapp")
    source("tagged", {"tag": "v1.0.0"}, "https://gitea.example.com/team/webapp")
    source("other", {"branch": "main"}, "https://gitea.example.com/team/other")
    consumer("on-main", "main", "True")
    consumer("on-release", "release", "False")
    consumer("on-master", "master", "Unknown")
    consumer("on-tag", "tagged", "True")
    consumer("elsewhere", "other", "False")
    return store


@pytest.mark.parametrize("branch, names, state", [
    ("main", ["on-main"], SUCCESS),
    ("release/1.x", ["on-release"], FAILURE),
    ("master", ["on-master"], PENDING),
    ("nope", [], UNKNOWN),
    (None, ["on-main", "on-master", "on-release", "on-tag"], FAILURE),
])
def test_repository_state_per_branch(branch: str | None, names: list[str], state: str) -> None:
    store = store_with_branches()
    found = sorted(o.name for o in select_consumers(store, "Team", "webapp", branch))
    assert found == names
    assert repository_state(store, "team", "WEBAPP", branch) == state


def test_unknown_repository_is_unknown() -> None:
    assert repository_state(store_with_branches(), "nobody", "nothing", "main") == UNKNOWN
