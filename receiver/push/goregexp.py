"""Go regular expressions, as Flux evaluates them: compiled by RE2 itself. Pure.

Flux compiles the patterns of its objects with Go's `regexp`, whose syntax and semantics are
RE2's: an ImagePolicy's `filterTags.pattern`, an ImageRepository's `exclusionList`, an
OCIRepository's `ref.semverFilter`. The bridge evaluates every one of them with RE2
(google-re2), so `[[:alpha:]]`, `\\pL`, `\\Q…\\E` and a literal `{,n}` read as in Go, and
matching takes time linear in the text whatever the pattern. That matters: the text matched is a
tag or version anyone who may push a package chooses, and a backtracking engine (Python's `re`)
is made to run for hours by a version of 40 characters against a pattern as ordinary as
`^(\\d+\\.?)+$`. A pattern RE2 refuses (Go refuses the same: lookarounds, backreferences, `\\Z`)
is not evaluated; each caller says what that means for it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import re2

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is a reason in the plan, not a stderr line


@dataclass(frozen=True, slots=True)
class GoPattern:
    """A Go regexp compiled by RE2, or why it cannot be evaluated here."""

    text: str
    compiled: Any  # re2._Regexp: search() and Python-style match objects; no type stubs
    problem: str = ""

    def search(self, text: str) -> Any:
        """Go's `MatchString`/`FindStringSubmatch`: unanchored; None without a match (or
        when the pattern could not be compiled: ask `compiled` first where that matters)."""
        return self.compiled.search(text) if self.compiled is not None else None


@functools.lru_cache(maxsize=512)
def go_pattern(text: str) -> GoPattern:
    """Compiled once per pattern: a cluster has a handful of them, pushed to many times."""
    try:
        return GoPattern(text, re2.compile(text, _RE2_OPTIONS))
    except re2.error as exc:
        message = exc.args[0] if exc.args else ""
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        return GoPattern(text, None, f"is not a valid Go regexp ({message})")
