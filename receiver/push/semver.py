"""Flux's semver tag selection for `GitRepository.spec.ref.semver`. Pure: no I/O.

source-controller picks the highest tag that satisfies a Masterminds/semver v3 constraint.
The bridge reimplements those rules so it can tell, from a pushed tag alone, whether Flux
would select it. Behaviour follows Masterminds v3.4/v3.5 (the version Flux builds with),
including its corner cases, because "what Flux does" matters more here than "what is
tidy". Known quirks kept on purpose are marked "upstream quirk".

Parsing follows upstream's pipeline (hyphen ranges rewritten first, then the `||` split,
then comparators), so odd inputs are accepted or rejected exactly as Flux would. This was
checked by differential fuzzing against Masterminds/semver itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "MAX_CONSTRAINT_LENGTH",
    "Comparator",
    "Constraint",
    "ConstraintError",
    "Version",
    "highest",
    "parse_constraint",
    "parse_version",
    "tag_selected",
    "tag_taken",
]

# Real constraints are a few dozen characters; this only bounds work on hostile ones.
MAX_CONSTRAINT_LENGTH = 1024

# Go parses version numbers as uint64; anything larger is not a version there.
_MAX_NUMBER = 2**64 - 1
# Go's `\s`; Python's would also match Unicode spaces, which Masterminds rejects.
_WS = "[ \t\n\f\r]"
# Possessive quantifiers: upstream's grammar never needs to backtrack into these, and not
# doing so spares us catastrophic backtracking on hostile input.
_IDENTS = r"[0-9A-Za-z-]++(?:\.[0-9A-Za-z-]++)*+"
_TAG_RE = re.compile(
    rf"v?(?P<major>[0-9]++)(?:\.(?P<minor>[0-9]++))?+(?:\.(?P<patch>[0-9]++))?+"
    rf"(?:-(?P<pre>{_IDENTS}))?+(?:\+(?P<build>{_IDENTS}))?+"
)

# A version inside a constraint is as loose as upstream's: each part is any run of digits,
# `x`, `X`, `*` and even `|`. Only the parts before the first wildcard must be numbers, so
# `1.x.|` is a valid `1.x` and `1x` is an error — upstream quirk.
_LOOSE = r"[0-9xX*|]++"
_CV = rf"v?{_LOOSE}(?:\.{_LOOSE})?+(?:\.{_LOOSE})?+(?:-{_IDENTS})?+(?:\+{_IDENTS})?+"
_CV_PARTS_RE = re.compile(
    rf"v?(?P<major>{_LOOSE})(?:\.(?P<minor>{_LOOSE}))?+(?:\.(?P<patch>{_LOOSE}))?+"
    rf"(?:-(?P<pre>{_IDENTS}))?+(?:\+{_IDENTS})?+"
)
_HYPHEN_RANGE_RE = re.compile(rf"{_WS}*+({_CV}){_WS}++-{_WS}++({_CV}){_WS}*+")
_COMPARATOR_RE = re.compile(rf"(?P<op>!=|>=|=>|<=|=<|~>|[=<>~^])?+{_WS}*+(?P<version>{_CV})")
_WILDCARDS = ("x", "X", "*")

# Spelling variants collapse to one canonical operator; "" is the bare form.
_CANONICAL_OPS = {"": "=", "=": "=", "!=": "!=", ">": ">", "<": "<", ">=": ">=", "=>": ">=",
                  "<=": "<=", "=<": "<=", "~": "~", "~>": "~", "^": "^"}


class ConstraintError(ValueError):
    """A constraint Flux would refuse (its GitRepository reports a parse error), or one too long."""


def _ident_key(ident: str) -> tuple[bool, int, str]:
    # Numeric identifiers sort numerically and before any alphanumeric one (semver §11.4).
    # Upstream quirk: one too big for uint64 sorts as text, like an alphanumeric one.
    number = _number(ident) if ident.isdigit() else None
    return (False, number, "") if number is not None else (True, 0, ident)


@dataclass(frozen=True, slots=True)
class Version:
    """A semantic version. Equality and ordering follow semver precedence: build is ignored."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: tuple[str, ...] = field(default=(), compare=False)

    def _key(self) -> tuple[int, int, int, bool, tuple[tuple[bool, int, str], ...]]:
        # A release outranks all its prereleases; a shorter prerelease prefix ranks lower,
        # which is exactly Python's tuple ordering.
        pre = tuple(_ident_key(i) for i in self.prerelease)
        return (self.major, self.minor, self.patch, not self.prerelease, pre)

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __le__(self, other: Version) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: Version) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: Version) -> bool:
        return self._key() >= other._key()

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text


def _number(text: str) -> int | None:
    digits = text.lstrip("0") or "0"  # leading zeros are accepted (Masterminds "coerce" mode)
    if len(digits) > 20:  # also keeps int() away from huge digit strings, which it refuses
        return None
    value = int(digits)
    return value if value <= _MAX_NUMBER else None


def _prerelease(text: str | None) -> tuple[str, ...] | None:
    """Split and validate a prerelease; None if a numeric identifier has a leading zero."""
    if not text:
        return ()
    idents = tuple(text.split("."))
    if any(i.isdigit() and len(i) > 1 and i[0] == "0" for i in idents):
        return None
    return idents


def parse_version(tag: str) -> Version | None:
    """Parse a Git tag the way Flux does, or None if Flux would skip the tag.

    Flux first demands three '.'-separated parts (so `v1.2` and `1` are skipped), then
    parses leniently: `v` prefix, leading zeros, missing minor/patch. Hence `v1.2-rc.1`
    passes (its prerelease supplies the dots) and means 1.2.0-rc.1 — upstream quirk.
    """
    if len(tag.split(".", 2)) != 3:
        return None
    m = _TAG_RE.fullmatch(tag)
    if m is None:
        return None
    major, minor, patch = (_number(m[g] or "0") for g in ("major", "minor", "patch"))
    pre = _prerelease(m["pre"])
    if major is None or minor is None or patch is None or pre is None:
        return None
    build = tuple(m["build"].split(".")) if m["build"] else ()
    return Version(major, minor, patch, pre, build)


@dataclass(frozen=True, slots=True)
class Comparator:
    """One `<op><version>` term.

    `version` has missing or wildcard parts filled with 0; `precision` counts how many of
    major/minor/patch were given as numbers before the first missing or wildcard one
    (`*` → 0, `1.x` → 1, `1.2` → 2, `1.2.3` → 3). Operators are canonical: `=` (also the
    bare form), `!=`, `>`, `<`, `>=`, `<=`, `~`, `^`.
    """

    op: str
    version: Version
    precision: int


def _below(v: Version, c: Comparator) -> bool:
    return v < c.version


def _at_least(v: Version, c: Comparator) -> bool:
    return v >= c.version


def _above(v: Version, c: Comparator) -> bool:
    base = c.version
    if c.precision in (0, 3):
        return v > base
    if v.major != base.major:
        return v.major > base.major
    # `>1` means 2.0.0 or later, `>1.2` means 1.3.0 or later.
    return c.precision == 2 and v.minor > base.minor


def _at_most(v: Version, c: Comparator) -> bool:
    base = c.version
    if c.precision == 3:
        return v <= base
    # `<=1` covers all of 1.x, `<=1.2` all of 1.2.x. Upstream quirk: `<=*` is 0.0.x only.
    if v.major != base.major:
        return v.major < base.major
    return c.precision == 1 or v.minor <= base.minor


def _tilde(v: Version, c: Comparator) -> bool:
    base = c.version
    if v < base:
        return False
    # Upstream quirk: `~0.0.0` (and `~*`) accept everything at or above 0.0.0.
    if c.precision in (0, 3) and (base.major, base.minor, base.patch) == (0, 0, 0):
        return True
    if v.major != base.major:
        return False
    return c.precision == 1 or v.minor == base.minor


def _caret(v: Version, c: Comparator) -> bool:
    base = c.version
    if v < base:
        return False
    if base.major > 0 or c.precision == 1:
        return v.major == base.major
    # Major 0: the leftmost non-zero (or last given) part must stay put.
    # Upstream quirk: `^*` therefore accepts only 0.0.0.
    if v.major > 0:
        return False
    if base.minor > 0 or c.precision == 2:
        return v.minor == base.minor
    return v.minor == 0 and v.patch == base.patch


def _equal(v: Version, c: Comparator) -> bool:
    # A partial version means "anything in that range": `1.2` is `~1.2`.
    return v == c.version if c.precision == 3 else _tilde(v, c)


def _not_equal(v: Version, c: Comparator) -> bool:
    base = c.version
    if c.precision == 1:
        return v.major != base.major
    if c.precision == 2:
        same_minor = (v.major, v.minor) == (base.major, base.minor)
        return not same_minor or v.prerelease != base.prerelease
    return v != base  # `!=*` is `!=0.0.0` upstream


_CHECKS = {"=": _equal, "!=": _not_equal, ">": _above, "<": _below, ">=": _at_least,
           "<=": _at_most, "~": _tilde, "^": _caret}


@dataclass(frozen=True, slots=True)
class Constraint:
    """OR of AND-groups of comparators, as parsed from `expr`."""

    expr: str
    groups: tuple[tuple[Comparator, ...], ...]

    def check(self, v: Version) -> bool:
        return any(_group_allows(group, v) for group in self.groups)


def _group_allows(group: tuple[Comparator, ...], v: Version) -> bool:
    # Prereleases are opt-in per AND group: one comparator naming a prerelease opens the
    # whole group to them, so `>=1.0.0-0 <1.1.0-0` admits 1.0.0-alpha but `*` does not.
    if v.prerelease and not any(c.version.prerelease for c in group):
        return False
    return all(_CHECKS[c.op](v, c) for c in group)


def _comparator(op: str, text: str, expr: str) -> Comparator:
    m = _CV_PARTS_RE.fullmatch(text)
    assert m is not None  # `text` was matched by the same pattern
    parts = (m["major"], m["minor"], m["patch"])
    precision = next((i for i, p in enumerate(parts) if p is None or p in _WILDCARDS), 3)
    numbers = [_number(p) if p.isdigit() else None for p in parts[:precision]]
    pre = _prerelease(m["pre"])
    if None in numbers or pre is None:
        raise ConstraintError(f"invalid semver constraint {expr!r}: bad version {text!r}")
    major, minor, patch = [n or 0 for n in numbers] + [0] * (3 - precision)
    return Comparator(_CANONICAL_OPS[op], Version(major, minor, patch, pre), precision)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\f\r":
        pos += 1
    return pos


def _parse_group(text: str, expr: str) -> tuple[Comparator, ...]:
    """Comparators of one `||` alternative, separated by whitespace or a comma."""
    comparators: list[Comparator] = []
    pos = _skip_ws(text, 0)
    while True:
        m = _COMPARATOR_RE.match(text, pos)
        if m is None:
            raise ConstraintError(f"invalid semver constraint {expr!r} near {text[pos:]!r}")
        comparators.append(_comparator(m["op"] or "", m["version"], expr))
        pos = m.end()
        after = _skip_ws(text, pos)
        if after == len(text):
            return tuple(comparators)
        if text[after] == ",":
            pos = _skip_ws(text, after + 1)
        elif after > pos:
            pos = after
        else:  # `>1<2`: comparators must be separated
            raise ConstraintError(f"invalid semver constraint {expr!r} near {text[pos:]!r}")


def _rewrite_hyphen_ranges(expr: str) -> str:
    # `a - b` becomes `>= a, <= b `, each side keeping its own precision. Upstream rewrites
    # the whole expression before splitting on `||`, and its loose version pattern lets a
    # range swallow neighbouring text, so the same is done here to agree on odd inputs:
    # `1.2||1 - 2` means `>=1.2 || 1, <=2`, and `>1 1.2 - 1.4` is an error.
    return _HYPHEN_RANGE_RE.sub(lambda m: f">= {m[1]}, <= {m[2]} ", expr)


def parse_constraint(expr: str) -> Constraint:
    """Parse a Masterminds/semver v3 constraint; raise ConstraintError if Flux would reject it.

    `||` separates alternatives; inside one, comparators are separated by spaces or commas
    and must all hold. An empty expression is an error (Flux only uses semver when set).
    Expressions over MAX_CONSTRAINT_LENGTH are refused too, although Flux has no limit:
    parsing is quadratic on some hostile inputs and a tenant controls this field.
    """
    if len(expr) > MAX_CONSTRAINT_LENGTH:
        raise ConstraintError(f"semver constraint longer than {MAX_CONSTRAINT_LENGTH} characters")
    groups = tuple(_parse_group(g, expr) for g in _rewrite_hyphen_ranges(expr).split("||"))
    return Constraint(expr, groups)


def tag_selected(tag: str, constraint: str) -> bool:
    """Would a GitRepository with `spec.ref.semver: constraint` consider this tag?"""
    parsed = parse_constraint(constraint)  # first, so a bad constraint always raises
    version = parse_version(tag)
    return version is not None and parsed.check(version)


def highest(tags: Iterable[str], constraint: str) -> str | None:
    """The tag Flux would check out: the highest match, or None if nothing matches.

    Versions equal in precedence (differing only in build metadata) are ordered by commit
    time in Flux; without that here, the later one in iteration order wins.
    """
    parsed = parse_constraint(constraint)
    best: tuple[Version, str] | None = None
    for tag in tags:
        version = parse_version(tag)
        if version is not None and parsed.check(version) and (best is None or version >= best[0]):
            best = (version, tag)
    return best[1] if best else None


def artifact_tag(revision: str) -> str:
    """The tag a semver GitRepository checks out now, from `status.artifact.revision`
    (`v1.2.0@sha1:<hex>`, legacy `v1.2.0/<hex>`); "" when there is none."""
    name, at, _ = revision.rpartition("@")
    if at:
        return name
    name, slash, _ = revision.rpartition("/")
    return name if slash else ""


def tag_taken(tag: str, constraint: str, current: str) -> tuple[bool, str]:
    """Would a pushed `tag` become the checkout of a GitRepository with `spec.ref.semver:
    constraint` whose artifact is at tag `current` ("" if unknown)? With the reason.

    source-controller checks out the highest tag in range, so a tag in range is taken only if
    it is not below the one checked out now: the hotfix `v1.0.5` pushed after `v1.2.0` is not.
    Equal precedence (`1.2.0` beside `v1.2.0`, or build metadata) is broken by commit time in
    Flux, and the pushed commit is the newer one, so it is taken. A current tag that no longer
    satisfies the range (the range was edited) says nothing about the new checkout.
    Raises ConstraintError for a constraint Flux would refuse.
    """
    if not tag_selected(tag, constraint):
        return False, f"semver {constraint}"
    pushed = parse_version(tag)
    now = parse_version(current) if current else None
    if pushed is None or now is None or not parse_constraint(constraint).check(now):
        return True, f"semver {constraint}"
    if pushed < now:
        return False, f"semver {constraint} (checking out {current}, above the pushed {tag})"
    return True, f"semver {constraint} (above the current {current})"
