"""Push payloads read defensively: field limits, text that cannot be encoded, deep paths."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.gitea.payloads import (
    MAX_PATH_BYTES,
    MAX_REF_BYTES,
    MAX_URL_BYTES,
    PayloadError,
    parse_actions_body,
    parse_gitea_push,
)
from receiver.push.routing import ancestors
from tests import gitea_payloads as gp

SHA = "d" * 40


def actions(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"repository": "https://gitea.example.com/teams/apps",
                           "ref": "refs/heads/main", "sha": SHA, "paths": ["deploy/app.yaml"]}
    doc.update(overrides)
    return doc


def gitea(**overrides: Any) -> dict[str, Any]:
    doc = gp.push("platform/fleet", "refs/heads/main",
                  [gp.commit("platform/fleet", "m", modified=["deploy/app.yaml"])])
    doc.update(overrides)
    return doc


def via_json(doc: Any) -> Any:
    """The document as the service sees it: through JSON text, as a client would send it."""
    return json.loads(json.dumps(doc))


def rejects(parse: Any, doc: Any) -> str:
    with pytest.raises(PayloadError) as info:
        parse(via_json(doc))
    return str(info.value)


@pytest.mark.parametrize(("doc", "field"), [
    (actions(ref="refs/heads/" + "r" * MAX_REF_BYTES), "ref"),
    (actions(repository="https://gitea.example.com/" + "x" * MAX_URL_BYTES), "repository"),
    (actions(paths=["ok.yaml", "p/" * (MAX_PATH_BYTES // 2) + "x"]), "paths[1]"),
])
def test_actions_fields_over_their_limit_are_named(doc: dict[str, Any], field: str) -> None:
    message = rejects(parse_actions_body, doc)
    assert message.startswith(field + " ") and "longer than" in message


def test_gitea_fields_over_their_limit_are_named() -> None:
    assert rejects(parse_gitea_push, gitea(ref="r" * (MAX_REF_BYTES + 1))).startswith("ref ")
    long_url = gitea()
    long_url["repository"]["clone_url"] = "https://g/" + "x" * MAX_URL_BYTES
    assert rejects(parse_gitea_push, long_url).startswith("repository.clone_url ")
    deep = gitea()
    deep["commits"][0]["added"] = ["a.yaml", "b" * (MAX_PATH_BYTES + 1)]
    assert rejects(parse_gitea_push, deep).startswith("commits[0].added[1] ")


def test_limits_count_utf8_bytes_and_the_limit_itself_is_accepted() -> None:
    at_limit = "refs/heads/" + "r" * (MAX_REF_BYTES - len("refs/heads/"))
    assert parse_actions_body(actions(ref=at_limit)).ref == at_limit
    # 300 three-byte characters: 900 bytes fit, 400 (1200 bytes) do not.
    assert parse_actions_body(actions(ref="\u20ac" * 300)).ref == "refs/heads/" + "\u20ac" * 300
    assert rejects(parse_actions_body, actions(ref="\u20ac" * 400)).startswith("ref ")


@pytest.mark.parametrize("field", ["ref", "paths", "repository"])
def test_a_lone_surrogate_is_a_422_naming_the_field(field: str) -> None:
    bad = "main\ud800"
    value: Any = {"ref": bad, "paths": ["ok", bad],
                  "repository": "https://gitea.example.com/x" + bad}[field]
    message = rejects(parse_actions_body, actions(**{field: value}))
    assert message.startswith("paths[1]" if field == "paths" else field)
    assert "not valid UTF-8" in message


def test_a_lone_surrogate_in_a_gitea_push_is_a_422() -> None:
    assert "ref is not valid UTF-8" in rejects(parse_gitea_push, gitea(ref="refs/heads/\udfff"))
    doc = gitea()
    doc["commits"][0]["modified"] = ["x\ud83d.yaml"]
    assert rejects(parse_gitea_push, doc).startswith("commits[0].modified[0] ")


def test_deep_paths_count_as_an_incomplete_file_list_not_quadratic_memory() -> None:
    # 700 distinct paths of 4 KiB, each 2,000 directories deep: listing every ancestor would
    # take gigabytes. Such a push touches every consumer instead, as an over-long list does.
    deep = [f"{i}/" + "d/" * 2000 + "f" for i in range(700)]
    tracemalloc.start()
    try:
        push = parse_actions_body(actions(paths=deep))
        dirs = ancestors(push.paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not push.paths_complete and push.paths == frozenset()
    assert dirs == frozenset({""})
    assert peak < 64 * 1024 * 1024
    # An ordinary large push keeps its file list.
    wide = [f"clusters/eu-west/apps/app-{i}/deploy/{j}.yaml" for i in range(400) for j in range(40)]
    assert parse_actions_body(actions(paths=wide)).paths_complete


@settings(deadline=None, max_examples=200)
@given(st.text(max_size=60), st.lists(st.text(max_size=40), max_size=5))
def test_any_text_parses_or_is_a_payload_error(ref: str, paths: list[str]) -> None:
    for parse, doc in ((parse_actions_body, actions(ref=ref, paths=paths)),
                       (parse_gitea_push, gitea(ref=ref))):
        try:
            push = parse(doc)
        except PayloadError:
            continue
        # Whatever is accepted can be encoded: the reply and the logs never fail on it.
        json.dumps(push.ref, ensure_ascii=False).encode()
        for p in push.paths:
            p.encode()
