"""The ImagePolicy decision: would a scan of the pushed tag change what a policy selects?"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.push.image_policy import excluded_by, expand, go_pattern, latest_tag, policy_takes


def _spec(policy: dict[str, Any], pattern: str = "", extract: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"imageRepositoryRef": {"name": "app"}, "policy": policy}
    if pattern:
        spec["filterTags"] = {"pattern": pattern, "extract": extract}
    return spec


SEMVER = {"semver": {"range": ">=1.0.0 <2.0.0"}}
TS = r"^main-[a-f0-9]+-(?P<ts>[0-9]+)$"


@pytest.mark.parametrize(("spec", "tag", "current", "taken"), [
    (_spec(SEMVER), "1.2.0", "", True),
    (_spec(SEMVER), "1.2.0", "1.1.0", True),
    (_spec(SEMVER), "1.2.0", "1.2.0", True),
    (_spec(SEMVER), "1.0.5", "1.2.0", False),  # a hotfix below what the policy holds
    (_spec(SEMVER), "2.0.0", "", False),
    (_spec(SEMVER), "v1.3.0", "1.2.0", True),
    (_spec(SEMVER), "latest", "", False),
    (_spec({"semver": {"range": "not a range"}}), "1.0.0", "", False),
    (_spec({"alphabetical": {}}), "b", "a", True),
    (_spec({"alphabetical": {"order": "asc"}}), "a", "b", False),
    (_spec({"alphabetical": {"order": "desc"}}), "a", "b", True),
    (_spec({"alphabetical": {"order": "sideways"}}), "a", "", False),
    (_spec({"numerical": {}}), "10", "9", True),  # numbers, not strings
    (_spec({"numerical": {"order": "asc"}}), "9", "10", False),
    (_spec({"numerical": {"order": "desc"}}), "9", "10", True),
    (_spec({"numerical": {}}), "abc", "", False),
    (_spec({"numerical": {}}), " 10", "", False),  # Go's ParseFloat takes no spaces
    (_spec({"numerical": {}}), "1_0", "", False),
    (_spec({"numerical": {}}), "11", "not-a-number", True),
    (_spec({}), "1.0.0", "", False),
    # filterTags + extract: the policy ranks the extracted value.
    (_spec({"numerical": {}}, TS, "$ts"), "main-abc123-1700", "main-def456-1600", True),
    (_spec({"numerical": {}}, TS, "$ts"), "main-abc123-1500", "main-def456-1600", False),
    (_spec({"numerical": {}}, TS, "${ts}"), "feature-abc-1700", "main-def456-1600", False),
    (_spec({"numerical": {}}, TS, "$ts"), "main-abc123-1700", "v1", True),  # held: filtered
    (_spec(SEMVER, r"^v(\d+\.\d+\.\d+)-rc$", "$1"), "v1.5.0-rc", "v1.4.0-rc", True),
    (_spec(SEMVER, r"^v(\d+\.\d+\.\d+)-rc$", "$1"), "v1.5.0", "", False),
    # Empty extract keeps the whole tag, not only the match.
    (_spec({"alphabetical": {}}, "rc", ""), "1-rc", "0-rc", True),
])
def test_policy_takes(spec: dict[str, Any], tag: str, current: str, taken: bool) -> None:
    ok, why = policy_takes(spec, tag, current)
    assert ok is taken, why
    assert why


@pytest.mark.parametrize("pattern", [
    r"^(?=v)v\d+",  # lookahead: Go (RE2) refuses it
    r"(a)\1",  # backreference
    r"v1\Z",  # neither Go nor RE2 has \Z
    r"([a-z]+",  # unbalanced
])
def test_patterns_go_refuses_are_assumed_to_take(pattern: str) -> None:
    assert go_pattern(pattern).compiled is None
    ok, why = policy_takes(_spec({"alphabetical": {}}, pattern), "v1", "")
    assert ok
    assert "assumed to take v1" in why and repr(pattern) in why
    assert "is not a valid Go regexp" in why


@pytest.mark.parametrize(("pattern", "tag", "matches"), [
    (r"^[[:alpha:]]+-\d+$", "main-12", True),  # a POSIX class: a plain set to Python's re
    (r"^[[:alpha:]]+-\d+$", ":-12", False),
    (r"^\pL+-\d+$", "été-3", True),  # a Unicode class: Python's re has none
    (r"^\Qv1.0\E-rc$", "v1.0-rc", True),  # quoted text
    (r"^\Qv1.0\E-rc$", "v1x0-rc", False),
    (r"^v{,2}1$", "v{,2}1", True),  # literal text in Go; a repeat to Python's re
    (r"^v{,2}1$", "vv1", False),
])
def test_patterns_read_as_go_reads_them(pattern: str, tag: str, matches: bool) -> None:
    ok, why = policy_takes(_spec({"alphabetical": {}}, pattern), tag, "")
    assert ok is matches, why
    assert "assumed" not in why


def test_a_pathological_tag_is_matched_in_linear_time() -> None:
    # A backtracking engine needs about 2**40 steps to fail this match; RE2 needs 41. Pushed
    # tags are chosen by whoever may push a package, and the hook path must not hang on one.
    ok, why = policy_takes(_spec({"numerical": {}}, r"^(\d+\.?)+$"), "1" * 40 + "x", "")
    assert not ok and "does not match" in why


def test_reasons_read_like_the_plan() -> None:
    assert policy_takes(_spec(SEMVER), "1.0.5", "1.2.0") == (
        False, "semver >=1.0.0 <2.0.0 (holding 1.2.0, above the pushed 1.0.5)")
    assert policy_takes(_spec({"numerical": {}}, TS, "$ts"), "main-a-2", "main-b-1") == (
        True, f"filterTags {TS!r} (extract '$ts': 2), numerical asc (at or past the current 1)")
    assert policy_takes(_spec({"alphabetical": {}}, "^v"), "x", "") == (
        False, "filterTags pattern '^v' does not match x")


@pytest.mark.parametrize(("template", "expected"), [
    ("$ts", "1700"), ("${ts}-x", "1700-x"), ("$1", "abc"), ("$1x", ""), ("$$", "$"),
    ("$", "$"), ("${", "${"), ("$9", ""), ("$nope", ""), ("$0", "main-abc-1700"),
])
def test_extract_expands_like_go(template: str, expected: str) -> None:
    match = re.compile(r"^main-([a-f]+)-(?P<ts>\d+)$").search("main-abc-1700")
    assert match is not None
    assert expand(template, match) == expected


def test_exclusion_list() -> None:
    assert excluded_by(None, "sha256-abc.sig") == "^.*\\.sig$"  # the CRD default
    assert excluded_by([], "sha256-abc.sig") is None
    assert excluded_by(["^dev-", "^tmp"], "dev-1") == "^dev-"
    assert excluded_by(["^[[:alpha:]]+$"], "dev") == "^[[:alpha:]]+$"  # a POSIX class, as Go
    assert excluded_by(["(?=dev)"], "dev") is None  # Go refuses it: excludes nothing
    assert excluded_by(["^dev-"], "1.0.0") is None


def test_latest_tag() -> None:
    assert latest_tag({"status": {"latestRef": {"name": "h/o/app", "tag": "1.2.0"}}}) == "1.2.0"
    assert latest_tag({"status": {}}) == ""
    assert latest_tag({}) == ""


_numbers = st.integers(min_value=0, max_value=10**9)


@given(_numbers, _numbers, st.sampled_from(["asc", "desc"]))
def test_numerical_never_takes_a_tag_behind_the_current(pushed: int, held: int, order: str) -> None:
    ok, _ = policy_takes(_spec({"numerical": {"order": order}}), str(pushed), str(held))
    behind = pushed < held if order == "asc" else pushed > held
    assert ok is not behind


_words = st.text(alphabet="abcxyz019-.", min_size=1, max_size=8)


@given(_words, _words, st.sampled_from(["asc", "desc"]))
def test_alphabetical_never_takes_a_tag_behind_the_current(pushed: str, held: str,
                                                           order: str) -> None:
    ok, _ = policy_takes(_spec({"alphabetical": {"order": order}}), pushed, held)
    behind = pushed < held if order == "asc" else pushed > held
    assert ok is not behind


@given(_words)
def test_without_a_current_tag_any_tag_that_passes_is_taken(tag: str) -> None:
    assert policy_takes(_spec({"alphabetical": {}}), tag, "")[0]
