"""Promotion gates: Flagger asks, Gitea's statuses answer. Pure.

A gate (`statuses.canaries.gates.<name>.require`) names contexts the analysed commit must show
`success` on, e.g. `flux/env/staging` (every staging cluster deployed it) and
`approve/production` (a person approved it: a Gitea Actions workflow posts that status).

- `confirm-rollout`, `confirm-promotion` (and `confirm-traffic-increase`): go on only when
  every required context shows `success`; otherwise say which are missing or what they show.
- `rollback`: roll back only when a required context shows `failure` or `error` (someone
  rejected the commit, or the earlier environment failed it); otherwise do not.

Flagger reads any answer above 202 as "no"; the reason goes into its event log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from receiver.status.descriptions import ERROR, FAILURE, SUCCESS

CONFIRM, ROLLBACK = "confirm", "rollback"
FAILED_STATES = frozenset({FAILURE, ERROR})


@dataclass(frozen=True, slots=True)
class GateAnswer:
    yes: bool
    reason: str


def confirm(require: Sequence[str], shown: Mapping[str, str], sha: str) -> GateAnswer:
    """May Flagger go on? `shown`: the latest state per context on the commit."""
    short = sha[:12]
    missing = [c for c in require if c not in shown]
    other = [f"{c} is {shown[c]}" for c in require if c in shown and shown[c] != SUCCESS]
    if not missing and not other:
        return GateAnswer(True, f"{short} shows success on {', '.join(require)}")
    parts = []
    if missing:
        parts.append(f"no status {', '.join(missing)}")
    parts.extend(other)
    return GateAnswer(False, f"{short} is not cleared: {'; '.join(parts)}")


def rollback(require: Sequence[str], shown: Mapping[str, str], sha: str) -> GateAnswer:
    """Should Flagger roll back? Yes only when a required context failed on the commit."""
    short = sha[:12]
    failed = [f"{c} is {shown[c]}" for c in require if shown.get(c) in FAILED_STATES]
    if failed:
        return GateAnswer(True, f"{short} was rejected: {'; '.join(failed)}")
    return GateAnswer(False, f"{short}: no required status failed")


def answer(hook: str, require: Sequence[str], shown: Mapping[str, str], sha: str) -> GateAnswer:
    return rollback(require, shown, sha) if hook == ROLLBACK else confirm(require, shown, sha)
