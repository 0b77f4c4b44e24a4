from __future__ import annotations

from contextlib import suppress
from itertools import pairwise

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from receiver.push.semver import (
    MAX_CONSTRAINT_LENGTH,
    ConstraintError,
    Version,
    highest,
    parse_constraint,
    parse_version,
    tag_selected,
)

# The tags of source-controller's semver checkout test fixture.
FLUX_TAGS = ["non-semver-tag", "v0.1.0", "0.2.0", "v0.2.1", "v1.0.0-alpha", "v1.1.0", "v2.0.0"]


# --- the Flux fixture ---------------------------------------------------------------------


def test_star_selects_the_highest_release() -> None:
    assert highest(FLUX_TAGS, "*") == "v2.0.0"
    assert not tag_selected("v1.0.0-alpha", "*")
    assert not tag_selected("non-semver-tag", "*")


def test_less_than_selects_the_highest_below() -> None:
    assert tag_selected("0.2.0", "<v0.2.1")
    assert highest(FLUX_TAGS, "<v0.2.1") == "0.2.0"


def test_prerelease_range_selects_the_prerelease() -> None:
    assert tag_selected("v1.0.0-alpha", ">=1.0.0-0 <1.1.0-0")
    assert highest(FLUX_TAGS, ">=1.0.0-0 <1.1.0-0") == "v1.0.0-alpha"


def test_highest() -> None:
    assert highest(FLUX_TAGS, ">=3.0.0") is None
    assert highest([], "*") is None
    assert highest(FLUX_TAGS, "~0.2") == "v0.2.1"
    assert highest(FLUX_TAGS, "0.2.0 || 1.1.0") == "v1.1.0"
    # Equal precedence (build metadata differs): the later tag wins.
    assert highest(["1.0.0+a", "v1.0.0+b", "1.0.0-rc.1"], "*") == "v1.0.0+b"
    assert highest(["v1.0.0+b", "1.0.0+a"], "*") == "1.0.0+a"
    with pytest.raises(ConstraintError):
        highest(FLUX_TAGS, ">>1")


def test_tag_selected_checks_the_constraint_even_for_bad_tags() -> None:
    assert not tag_selected("latest", ">=1")
    with pytest.raises(ConstraintError):
        tag_selected("latest", "not a constraint")


# --- versions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("1.2.3", Version(1, 2, 3)),
        ("v1.2.3", Version(1, 2, 3)),
        ("01.002.0003", Version(1, 2, 3)),
        ("v1.0.0-alpha.1", Version(1, 0, 0, ("alpha", "1"))),
        ("1.0.0-0.3.7", Version(1, 0, 0, ("0", "3", "7"))),
        ("1.0.0-x-y-z.--", Version(1, 0, 0, ("x-y-z", "--"))),
        ("1.0.0+build.5", Version(1, 0, 0, (), ("build", "5"))),
        ("1.0.0-rc.1+build.5", Version(1, 0, 0, ("rc", "1"), ("build", "5"))),
        # Flux only counts dots before parsing leniently, so these slip through.
        ("v1.2-rc.1", Version(1, 2, 0, ("rc", "1"))),
        ("1-a.b.c", Version(1, 0, 0, ("a", "b", "c"))),
        ("18446744073709551615.0.0", Version(2**64 - 1, 0, 0)),
    ],
)
def test_parse_version(tag: str, expected: Version) -> None:
    version = parse_version(tag)
    assert version == expected
    assert version is not None and version.build == expected.build


@pytest.mark.parametrize(
    "tag",
    [
        "", "1", "v1.2", "1.2", "latest", "non-semver-tag", "V1.2.3", " 1.2.3", "1.2.3 ",
        "1.2.3.4", "1.2.3-", "1.2.3+", "1.2.3-a..b", "1.2.3-01", "1.2.3-béta", "1.2.x",
        "18446744073709551616.0.0", "v1.2.3\n", "1.2.3_4",
    ],
)
def test_parse_version_rejects(tag: str) -> None:
    assert parse_version(tag) is None


def test_precedence_example_from_the_semver_spec() -> None:
    ordered = [
        "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
        "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "2.0.0", "2.1.0", "2.1.1",
    ]
    versions = [parse_version(t) for t in ordered]
    assert all(a is not None and b is not None and a < b for a, b in pairwise(versions))


def test_build_metadata_is_ignored() -> None:
    a, b = parse_version("1.0.0+a"), parse_version("1.0.0+b")
    assert a == b and hash(a) == hash(b) and a is not None and b is not None
    assert a <= b and b <= a and not a < b
    assert str(a) == "1.0.0+a"


# --- constraints --------------------------------------------------------------------------

# (constraint, version, satisfied), each checked against Masterminds/semver v3.
CHECKS: list[tuple[str, str, bool]] = [
    # = and the bare form
    ("=1.2.3", "1.2.3", True),
    ("1.2.3", "1.2.3+build", True),
    ("1.2.3", "1.2.4", False),
    ("v1.2.3", "1.2.3", True),
    ("= 2.0", "2.0.5", True),  # partial: tilde-like
    ("1.2", "1.2.9", True),
    ("1.2", "1.3.0", False),
    ("1", "1.9.9", True),
    ("1", "2.0.0", False),
    # !=
    ("!=1.2.3", "1.2.3", False),
    ("!=1.2.3", "1.2.4", True),
    ("!=1.x", "1.5.0", False),
    ("!=1.x", "2.0.0", True),
    ("!=1.2", "1.2.7", False),
    ("!=1.2", "1.3.0", True),
    # > and <
    (">1.2.3", "1.2.4", True),
    (">1.2.3", "1.2.3", False),
    (">1.2", "1.2.9", False),  # partial: above the whole 1.2.x range
    (">1.2", "1.3.0", True),
    (">1", "1.9.9", False),
    (">1", "2.0.0", True),
    ("<1.2.3", "1.2.2", True),
    ("<1.2.3", "1.2.3", False),
    ("<1.2", "1.1.9", True),
    ("<1.2", "1.2.0", False),
    ("<v0.2.1", "0.2.0", True),
    # >= (=>) and <= (=<)
    (">=1.2.3", "1.2.3", True),
    ("=>1.2.3", "1.2.3", True),
    (">=1.2.3", "1.2.2", False),
    ("<=1.2.3", "1.2.3", True),
    ("=<1.2.3", "1.2.4", False),
    ("<=1.2", "1.2.9", True),  # partial: includes the whole 1.2.x range
    ("<=1.2", "1.3.0", False),
    # ~ (~>)
    ("~1.2.3", "1.2.9", True),
    ("~1.2.3", "1.2.2", False),
    ("~1.2.3", "1.3.0", False),
    ("~>1.2.3", "1.2.5", True),
    ("~1", "1.9.0", True),
    ("~1", "2.0.0", False),
    ("~2.3", "2.3.9", True),
    ("~2.3", "2.4.0", False),
    ("~0.0.0", "5.0.0", True),  # upstream quirk: `~0.0.0` accepts everything
    # ^
    ("^1.2.3", "1.9.9", True),
    ("^1.2.3", "1.2.2", False),
    ("^1.2.3", "2.0.0", False),
    ("^0.2.3", "0.2.9", True),
    ("^0.2.3", "0.3.0", False),
    ("^0.0.3", "0.0.3", True),
    ("^0.0.3", "0.0.4", False),
    ("^0", "0.9.9", True),
    ("^0", "1.0.0", False),
    ("^0.0", "0.0.9", True),
    ("^0.0", "0.1.0", False),
    ("^1.x", "1.5.0", True),
    # wildcards
    ("*", "0.0.0", True),
    ("*", "99.0.0", True),
    ("x", "1.2.3", True),
    ("X", "1.2.3", True),
    ("1.2.x", "1.2.0", True),
    ("1.2.x", "1.2.99", True),
    ("1.2.x", "1.3.0", False),
    ("1.2.*", "1.1.9", False),
    ("1.x", "1.99.0", True),
    ("1.x.x", "2.0.0", False),
    (">= 1.2.x", "1.2.0", True),
    (">= 1.2.x", "1.1.9", False),
    ("<= 2.x", "2.99.99", True),
    ("<= 2.x", "3.0.0", False),
    ("<1.x", "0.9.9", True),
    ("<1.x", "1.0.0", False),
    # hyphen ranges
    ("1.2 - 1.4.5", "1.2.0", True),
    ("1.2 - 1.4.5", "1.4.5", True),
    ("1.2 - 1.4.5", "1.4.6", False),
    ("1.2 - 1.4.5", "1.1.9", False),
    ("1.2.3 - 2", "2.9.0", True),  # partial upper bound: `<=2` is all of 2.x
    ("1.2.3 - 2", "3.0.0", False),
    ("1.0.0 - 2.0.0 <=1.5.0", "1.6.0", False),
    ("1.0.0 - 2.0.0<1.5.0", "1.4.0", True),  # upstream accepts a range glued to the next
    # AND (spaces, commas) and OR
    (">=1.2 <1.4", "1.3.0", True),
    (">=1.2 <1.4", "1.4.0", False),
    (">=1.2, <1.4", "1.3.0", True),
    (">= 1.2 , < 1.4", "1.3.0", True),
    (">=1.2,<1.4,!=1.3.0", "1.3.0", False),
    ("<1 || >=2", "0.5.0", True),
    ("<1 || >=2", "1.5.0", False),
    ("<1 || >=2", "2.0.0", True),
    ("1.2.3||1.2.5", "1.2.5", True),
    ("^1.0 || ~2.1 || 3.x", "2.2.0", False),
    ("^1.0 || ~2.1 || 3.x", "3.1.0", True),
    # prereleases are opt-in per AND group
    ("*", "1.0.0-alpha", False),
    (">=1.0.0", "1.0.1-alpha", False),
    (">=1.0.0-0 <1.1.0-0", "1.0.0-alpha", True),
    (">=1.0.0-0 <1.1.0-0", "1.0.0", True),
    (">=1.0.0-0 <1.1.0-0", "1.1.0-alpha", False),
    (">=1.0.0 <=2.0.0-beta", "1.5.0-beta", True),  # enabled by the other comparator
    (">=1.0.0-rc.1", "1.0.0-rc.2", True),
    (">=1.0.0-rc.1", "1.0.0-beta", False),
    (">=1.0.0-rc.1 || >=2", "2.0.0-rc.1", True),  # the first group admits it
    ("<1.0.0-0 || >=2", "2.0.0-rc.1", False),
    ("~1.2.3-beta", "1.2.3-beta.2", True),
    ("^1.2.3-beta", "1.2.3-alpha", False),
]


@pytest.mark.parametrize(("constraint", "version", "satisfied"), CHECKS)
def test_constraint_check(constraint: str, version: str, satisfied: bool) -> None:
    parsed = parse_version(version)
    assert parsed is not None
    assert parse_constraint(constraint).check(parsed) is satisfied
    assert tag_selected(version, constraint) is satisfied


@pytest.mark.parametrize(
    "constraint",
    [
        "", " ", "||", "1.2 ||", "|| 1.2", "1.2 | 1.3", ">>1", "=>=1", "> =1", "!1", "a",
        "1.2.3.4", "1.2.", "1..2", "V1.2.3", "1x", "xx", "1.2.3-01", "1.2.3-", "1.2.3+",
        ">1<2", ">1,", ",>1", ">1,,<2", "1 - ", "- 1", "1 -2", "1 - 2 - 3", "1 - 2x",
        ">1 1.2 - 1.4",  # upstream's range rewrite swallows the separator
        "18446744073709551616", "1.2.3 ~", "~", "^", ">= ", "*.*.*.*", "1.2.3\u00a0", "\uff11.2.3",
        "1" * (MAX_CONSTRAINT_LENGTH + 1),
    ],
)
def test_invalid_constraints(constraint: str) -> None:
    with pytest.raises(ConstraintError):
        parse_constraint(constraint)


def test_constraint_error_is_a_value_error() -> None:
    assert issubclass(ConstraintError, ValueError)


@pytest.mark.parametrize(
    ("constraint", "groups"),
    [
        ("1.2.3", 1),
        (" >= 1.2 , <2 ", 1),
        ("1 - 2 || 3", 2),
        ("1.2||1 - 2", 2),  # upstream quirk: the range also swallows the `||`; still two
        ("1.x.|", 1),  # upstream quirk: only parts before the first wildcard are checked
        ("x.1x", 1),
    ],
)
def test_valid_constraint_shapes(constraint: str, groups: int) -> None:
    assert len(parse_constraint(constraint).groups) == groups


def test_hyphen_range_swallowing_or_matches_upstream() -> None:
    # Upstream reads `1.2||1 - 2` as `>=1.2||1, <=2`: a first group `>=1.2`.
    assert tag_selected("3.0.0", "1.2||1 - 2")
    assert not tag_selected("3.0.0", "1.2 || 1 - 2")


# --- properties ---------------------------------------------------------------------------

numbers = st.integers(0, 30)
releases = st.builds(Version, numbers, numbers, numbers)
identifiers = st.one_of(
    st.integers(0, 20).map(str),
    st.text("abcXYZ-", min_size=1, max_size=4),
)
versions = st.builds(
    Version, numbers, numbers, numbers, st.lists(identifiers, max_size=3).map(tuple)
)


@given(releases, releases)
def test_release_order_is_tuple_order(a: Version, b: Version) -> None:
    ta, tb = (a.major, a.minor, a.patch), (b.major, b.minor, b.patch)
    assert (a < b) == (ta < tb)
    assert (a == b) == (ta == tb)
    assert (a > b) == (ta > tb)


@given(versions, versions, versions)
def test_order_is_total(a: Version, b: Version, c: Version) -> None:
    assert [a < b, a == b, a > b].count(True) == 1
    assert (a <= b) == (a < b or a == b)
    assert (a >= b) == (a > b or a == b)
    if a <= b and b <= c:
        assert a <= c


@given(versions)
def test_a_release_outranks_its_prereleases(v: Version) -> None:
    release = Version(v.major, v.minor, v.patch)
    assert v <= release
    assert (v < release) == bool(v.prerelease)


@given(versions)
def test_str_round_trips(v: Version) -> None:
    assert parse_version(str(v)) == v
    assert parse_version("v" + str(v)) == v


@given(releases, releases)
def test_caret_keeps_the_major(base: Version, v: Version) -> None:
    assume(base.major > 0)
    expected = v.major == base.major and v >= base
    assert parse_constraint(f"^{base}").check(v) is expected


@given(releases, releases)
def test_tilde_keeps_major_and_minor(base: Version, v: Version) -> None:
    assume(base != Version(0, 0, 0))  # upstream quirk: `~0.0.0` accepts everything
    same = (v.major, v.minor) == (base.major, base.minor)
    assert parse_constraint(f"~{base}").check(v) is (same and v.patch >= base.patch)


@given(releases, releases)
def test_at_least_and_below_partition_releases(base: Version, v: Version) -> None:
    at_least = parse_constraint(f">={base}").check(v)
    below = parse_constraint(f"<{base}").check(v)
    assert at_least != below
    assert at_least is (v >= base)


@given(releases, releases, releases)
def test_or_is_union_and_comma_is_intersection(a: Version, b: Version, v: Version) -> None:
    ge_a, le_b = parse_constraint(f">={a}").check(v), parse_constraint(f"<={b}").check(v)
    assert parse_constraint(f">={a} || <={b}").check(v) is (ge_a or le_b)
    assert parse_constraint(f">={a}, <={b}").check(v) is (ge_a and le_b)
    assert parse_constraint(f"{a} - {b}").check(v) is (ge_a and le_b)


@given(versions.filter(lambda v: bool(v.prerelease)), releases)
def test_release_only_constraints_never_admit_prereleases(v: Version, base: Version) -> None:
    for op in ("", "=", ">=", "<=", ">", "<", "~", "^", "!="):
        assert not parse_constraint(f"{op}{base}").check(v)
    assert not parse_constraint("*").check(v)


@given(st.text(max_size=40))
def test_parsers_never_crash(text: str) -> None:
    parse_version(text)
    with suppress(ConstraintError):
        parse_constraint(text)
