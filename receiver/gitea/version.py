"""Which commit status states a Gitea version accepts. Pure.

Gitea added the `skipped` state in 1.25 (and counts it as success in a commit's combined
state); older versions answer a `skipped` post with a final 4xx. The bridge posts `skipped` for a
commit Flux never deployed because the branch moved on (statuses.desired_after_timeout). On an
older Gitea it posts `success` instead, with the same "Superseded: ..." description:

- `success`, because that is what Gitea >= 1.25 makes of `skipped` in the combined state, so a
  commit's checks look the same on every version, and nothing failed: a newer commit was
  deployed in its place;
- not `error` or `failure`, which would turn a superseded commit red and page people for a
  deployment that worked; not `warning`, which Gitea also shows as not-quite-green;
- never left `pending`, which is what a rejected `skipped` would leave.

A version that cannot be parsed (a development build) is taken to accept `skipped`. Forgejo
reports `<forgejo version>+gitea-<gitea version>`: the Gitea version counts.
"""

from __future__ import annotations

import re

SKIPPED = "skipped"
SKIPPED_FALLBACK = "success"
SKIPPED_SINCE = (1, 25)

_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """`1.24.3` → (1, 24, 3); `v1.25.0-rc1+dev-12-gabc` → (1, 25, 0); Forgejo's
    `11.0.1+gitea-1.22.0` → (1, 22, 0); None when it is not a version."""
    text = text.strip()
    if "+gitea-" in text:
        text = text.split("+gitea-", 1)[1]
    match = _VERSION.match(text)
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3] or 0)


def accepts_skipped(version: str | None) -> bool:
    parsed = parse_version(version) if version else None
    return parsed is None or parsed[:2] >= SKIPPED_SINCE


def state_for_version(state: str, version: str | None) -> str:
    """The state to post to a Gitea of `version` (None: unknown) for the state we mean."""
    if state == SKIPPED and not accepts_skipped(version):
        return SKIPPED_FALLBACK
    return state
