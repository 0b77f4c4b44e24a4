r"""Would an ImageRepository scan of a pushed tag change what an ImagePolicy selects? Pure.

image-reflector-controller (API `image.toolkit.fluxcd.io/v1`) builds a policy's candidates from
the repository's tags: `spec.filterTags.pattern` (a Go regexp) keeps the tags it matches and
`spec.filterTags.extract` (`$name`, `${name}`, `$1`; empty keeps the whole tag) rewrites each
into the value the policy ranks; then `spec.policy` picks one: `semver.range` the highest
version in range, `alphabetical.order` (`asc`, the default, takes the greatest string) or
`numerical.order` (`asc` takes the greatest number). The pick lands in `status.latestRef.tag`.

A pushed tag is *taken* when it passes the filter and ranks at or above the tag the policy
holds now (extracted the same way); with no `latestRef` (or one the policy would not pick
again, e.g. after the spec changed), any tag that passes is taken.

Regular expressions are Go's, whose syntax and semantics are RE2's: they are evaluated with
RE2 itself (google-re2), so `[[:alpha:]]`, `\pL`, `\Q…\E` and a literal `{,n}` read as in
Go, and matching takes linear time whatever the pattern. That matters here: the text matched is
a tag anyone who may push a package chooses, and a backtracking engine (Python's `re`) can be
made to run for hours by a tag against a pattern as ordinary as `^(\d+\.?)+$`. A pattern RE2
refuses (Go refuses the same: lookarounds, backreferences, `\Z`) is not evaluated; the policy is
then *assumed to take* the tag and the reason says so. Annotating one ImageRepository too many
costs a registry scan; missing one loses an update.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import re2

from receiver.push.semver import ConstraintError, tag_taken

# ImageRepository `spec.exclusionList` when unset (the CRD default): cosign signature tags.
DEFAULT_EXCLUSIONS = ("^.*\\.sig$",)

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is a reason in the plan, not a stderr line


@dataclass(frozen=True, slots=True)
class GoPattern:
    """A Go regexp compiled by RE2, or why it cannot be evaluated here."""

    text: str
    compiled: Any  # re2._Regexp: search() and Python-style match objects; no type stubs
    problem: str = ""


@functools.lru_cache(maxsize=512)
def go_pattern(text: str) -> GoPattern:
    """Compiled once per pattern: a cluster has a handful of policies, pushed to many times."""
    try:
        return GoPattern(text, re2.compile(text, _RE2_OPTIONS))
    except re2.error as exc:
        message = exc.args[0] if exc.args else ""
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        return GoPattern(text, None, f"is not a valid Go regexp ({message})")


_REF = re.compile(r"\$(?:\{(\w+)\}|(\w+)|(\$))", re.ASCII)


def expand(template: str, match: Any) -> str:
    """Go's `Regexp.ExpandString`: `$$` is `$`; `$name` takes the longest run of letters,
    digits and `_` (so `$1x` names group `1x`); a number is a group index; an unknown group or
    one that did not take part expands to ''; a `$` that starts no reference stays."""
    groups = match.re.groupindex

    def one(ref: re.Match[str]) -> str:
        if ref[3]:
            return "$"
        name = ref[1] or ref[2]
        if name.isdigit():
            index = int(name)
            return (match.group(index) or "") if index <= match.re.groups else ""
        return (match.group(name) or "") if name in groups else ""

    return _REF.sub(one, template)


def _go_float(text: str) -> float | None:
    """strconv.ParseFloat(text, 64), near enough: no spaces or `_` (Python takes them)."""
    if not text or text != text.strip() or "_" in text:
        return None
    try:
        if text.lstrip("+-")[:2].lower() == "0x":
            return float.fromhex(text)
        return float(text)
    except ValueError:
        return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def latest_tag(policy: Mapping[str, Any]) -> str:
    """The tag an ImagePolicy holds now (`status.latestRef.tag`), '' if none."""
    return _str(_dict(_dict(policy.get("status")).get("latestRef")).get("tag"))


def policy_takes(spec: Mapping[str, Any], tag: str, current: str = "") -> tuple[bool, str]:
    """Would an ImagePolicy with this `spec`, holding `current` now, take the pushed `tag`?
    With the reason, worded to follow "ImagePolicy X: ..." or "... takes <tag>"."""
    filter_tags = _dict(spec.get("filterTags"))
    pattern_text = _str(filter_tags.get("pattern"))
    extract = filter_tags.get("extract") if isinstance(filter_tags.get("extract"), str) else ""
    value, now = tag, current
    filtered = ""
    if pattern_text:
        pattern = go_pattern(pattern_text)
        if pattern.compiled is None:
            return True, (f"filterTags pattern {pattern_text!r} {pattern.problem}: "
                          f"assumed to take {tag}")
        found = pattern.compiled.search(tag)
        if found is None:
            return False, f"filterTags pattern {pattern_text!r} does not match {tag}"
        if extract:
            value = expand(extract, found)
        held = pattern.compiled.search(current) if current else None
        now = "" if held is None else (expand(extract, held) if extract else current)
        filtered = f"filterTags {pattern_text!r}" + (f" (extract {extract!r}: {value})"
                                                    if extract else "") + ", "
    choice = _dict(spec.get("policy"))
    if "semver" in choice:
        return _semver(_str(_dict(choice["semver"]).get("range")), value, now, filtered)
    for kind, rank in (("alphabetical", _alphabetical), ("numerical", _numerical)):
        if kind in choice:
            order = _str(_dict(choice[kind]).get("order")).lower() or "asc"
            if order not in ("asc", "desc"):
                return False, f"{filtered}{kind} order {order!r} is invalid"
            return rank(order, value, now, f"{filtered}{kind} {order}")
    return False, f"{filtered}no policy (semver, alphabetical or numerical) is set"


def _semver(constraint: str, value: str, now: str, prefix: str) -> tuple[bool, str]:
    try:
        taken, why = tag_taken(value, constraint, now)
    except ConstraintError:
        return False, f"{prefix}invalid semver range {constraint!r}"
    # tag_taken words it for a Git checkout; a policy holds a tag.
    return taken, prefix + why.replace("checking out", "holding")


def _alphabetical(order: str, value: str, now: str, why: str) -> tuple[bool, str]:
    if not now:
        return True, why
    # Go compares strings bytewise; for UTF-8 that is code point order, as in Python.
    if (value >= now) if order == "asc" else (value <= now):
        return True, f"{why} (at or past the current {now})"
    return False, f"{why} (holding {now}, past the pushed {value})"


def _numerical(order: str, value: str, now: str, why: str) -> tuple[bool, str]:
    pushed = _go_float(value)
    if pushed is None or math.isnan(pushed):
        return False, f"{why}: {value!r} is not a number"
    held = _go_float(now) if now else None
    if held is None or math.isnan(held):
        return True, why
    if (pushed >= held) if order == "asc" else (pushed <= held):
        return True, f"{why} (at or past the current {now})"
    return False, f"{why} (holding {now}, past the pushed {value})"


def excluded_by(exclusions: Any, tag: str) -> str | None:
    """The ImageRepository `spec.exclusionList` pattern that drops `tag` from the scan, if
    any (unset: the CRD default). A pattern not evaluated here excludes nothing (see above)."""
    patterns = exclusions if isinstance(exclusions, list) else list(DEFAULT_EXCLUSIONS)
    for text in patterns:
        if not isinstance(text, str) or not text:
            continue
        pattern = go_pattern(text)
        if pattern.compiled is not None and pattern.compiled.search(tag):
            return text
    return None
