"""Semver as Flux selects: a pushed tag moves a semver GitRepository only if it would become
its checkout; and the range grammar against Masterminds/semver's own test vectors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.flux.memory import MemoryCluster
from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import parse_gitea_push
from receiver.giturls import normalise_repo_url
from receiver.push.routing import plan_push
from receiver.push.semver import (
    ConstraintError,
    Version,
    artifact_tag,
    parse_constraint,
    parse_version,
    tag_taken,
)
from tests import gitea_payloads as gp
from tests.conftest import FLEET

VECTORS = json.loads(
    (Path(__file__).parent.parent / "fixtures" / "semver" / "masterminds-constraints.json").read_text())
RANGE = ">=1.0.0 <2.0.0"  # fleet-releases in the fleet fixture


def _lenient(version: str) -> Version:
    """Masterminds `NewVersion` coerces `1` and `1.4` to `1.0.0` and `1.4.0`. Flux's own tag
    parser refuses such tags (it needs X.Y.Z), so the vectors' versions are padded first."""
    core, sep, rest = version.partition("-")
    parts = core.split(".")
    padded = ".".join(parts + ["0"] * (3 - len(parts))) + sep + rest
    parsed = parse_version(padded)
    assert parsed is not None, version
    return parsed


# `parseConstraint("")` is the internal single-comparator parser; a GitRepository with an empty
# `semver` does not use semver at all, so Flux never parses an empty constraint.
CHECKS = [row for row in VECTORS["checks"] if row[1] != ""]


def test_the_vectors_are_all_there() -> None:
    assert "Masterminds/semver" in VECTORS["SOURCE"] and "constraints_test.go" in VECTORS["SOURCE"]
    assert len(CHECKS) > 230 and len(VECTORS["parse"]) == 30


@pytest.mark.parametrize(("test", "constraint", "version", "expected"), CHECKS)
def test_masterminds_check_vectors(test: str, constraint: str, version: str,
                                   expected: bool) -> None:
    assert parse_constraint(constraint).check(_lenient(version)) is expected, (test, constraint)


@pytest.mark.parametrize(("test", "constraint", "error"), VECTORS["parse"])
def test_masterminds_parse_vectors(test: str, constraint: str, error: bool) -> None:
    try:
        parse_constraint(constraint)
    except ConstraintError:
        assert error, (test, constraint)
    else:
        assert not error, (test, constraint)


# -- which tag becomes the checkout ------------------------------------------------------------


@pytest.mark.parametrize(("revision", "tag"), [
    ("v1.2.0@sha1:" + "a" * 40, "v1.2.0"),
    ("1.2.0@sha1:" + "a" * 40, "1.2.0"),
    ("v1.2.0/" + "a" * 40, "v1.2.0"),
    ("sha1:" + "a" * 40, ""),
    ("", ""),
])
def test_artifact_tag(revision: str, tag: str) -> None:
    assert artifact_tag(revision) == tag


@pytest.mark.parametrize(("tag", "current", "taken"), [
    ("v1.3.0", "v1.2.0", True),   # the new highest
    ("v1.0.5", "v1.2.0", False),  # a hotfix of an older line: the checkout stays at v1.2.0
    ("v1.2.0", "v1.2.0", True),   # the tag moved: a new commit for the same version
    ("1.2.0", "v1.2.0", True),    # equal precedence: the newer commit wins in Flux
    ("v1.0.5", "", True),         # no artifact yet: the first fetch takes the highest
    ("v1.0.5", "v2.5.0", True),   # the current one is out of range (the range was edited)
    ("v2.0.0", "v1.2.0", False),  # out of range
    ("v1.4", "v1.2.0", False),    # not X.Y.Z: Flux skips it
])
def test_tag_taken(tag: str, current: str, taken: bool) -> None:
    ok, why = tag_taken(tag, RANGE, current)
    assert ok is taken
    if current and not taken and tag.count(".") == 2 and tag != "v2.0.0":
        assert current in why and tag in why


@given(a=st.tuples(st.integers(1, 1), st.integers(0, 20), st.integers(0, 20)),
       b=st.tuples(st.integers(1, 1), st.integers(0, 20), st.integers(0, 20)))
def test_a_tag_is_taken_exactly_when_it_is_not_below_the_checkout(
    a: tuple[int, int, int], b: tuple[int, int, int]
) -> None:
    pushed, current = "v" + ".".join(map(str, a)), "v" + ".".join(map(str, b))
    assert tag_taken(pushed, RANGE, current)[0] is (a >= b)


def _fleet_with_artifact(revision: str) -> ObjectStore:
    store = ObjectStore(lambda url: normalise_repo_url(url))
    MemoryCluster.from_directory(store, FLEET)
    releases = store.list("GitRepository", "flux-system")
    raw: dict[str, Any] = copy.deepcopy(dict(
        next(o for o in releases if o.name == "fleet-releases").raw))
    raw["status"] = {"artifact": {"revision": revision}}
    store.upsert(raw)
    return store


def test_the_hotfix_tag_after_a_higher_release_is_skipped_with_both_tags() -> None:
    store = _fleet_with_artifact("v1.2.0@sha1:" + "b" * 40)
    receiver = next(r for r in store.list("Receiver") if r.name == "gitea")
    hotfix = plan_push(receiver, _tag("v1.0.5"), store)
    assert hotfix.targets == () and hotfix.tracked == ()
    reason = {t.name: t.reason for t in hotfix.skipped}["fleet-releases"]
    assert reason == ("semver >=1.0.0 <2.0.0 (checking out v1.2.0, above the pushed v1.0.5) "
                      "does not take refs/tags/v1.0.5")
    release = plan_push(receiver, _tag("v1.3.0"), store)
    assert [t.name for t in release.targets] == ["fleet-releases", "releases"]
    assert "above the current v1.2.0" in release.targets[0].reason


def _tag(tag: str) -> Any:
    return parse_gitea_push(gp.tag_push("platform/fleet", tag, gp.sha_for(tag)))
