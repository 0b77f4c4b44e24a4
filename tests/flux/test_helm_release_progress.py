"""Where a HelmRelease stands for a commit (`revisions.progress_at`), on the status shapes
helm-controller v1.6 writes for a failed upgrade from Git (reconcileStrategy Revision): first
Ready=False UpgradeFailed with Helm's error while it is still Reconciling, then, once its
remediation retries are used up, also Stalled=True RetriesExceeded."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from receiver.flux.objects import FluxObject
from receiver.flux.revisions import FAILED, progress_at

SHA = "d18059c99fb7a0b1c2d3e4f5a6b7c8d9e0f1a2b3"
OLD = "0cc0f5c7f136a0b1c2d3e4f5a6b7c8d9e0f1a2b3"
CAUSE = ('Helm upgrade failed for release helm-apps/web-git with chart web@0.1.0+d18059c99fb7: '
         'failed to create resource: ConfigMap "Broken_Name" is invalid')
UPGRADE_FAILED = [{"type": "Ready", "status": "False", "reason": "UpgradeFailed",
                   "message": CAUSE},
                  {"type": "Released", "status": "False", "reason": "UpgradeFailed",
                   "message": CAUSE}]
RECONCILING = {"type": "Reconciling", "status": "True", "reason": "Progressing",
               "message": "Running 'upgrade' action with timeout of 1m0s"}
GAVE_UP = {"type": "Stalled", "status": "True", "reason": "RetriesExceeded",
           "message": "Failed to upgrade after 1 attempt(s)"}


def release(conditions: list[dict[str, Any]], attempted: str = SHA) -> FluxObject:
    version = f"0.1.0+{attempted[:12]}"
    return FluxObject({
        "apiVersion": "helm.toolkit.fluxcd.io/v2", "kind": "HelmRelease",
        "metadata": {"name": "web-git", "namespace": "flux-system", "generation": 1},
        "spec": {"chart": {"spec": {"chart": "./charts/web", "reconcileStrategy": "Revision",
                                    "sourceRef": {"kind": "GitRepository", "name": "fleet"}}}},
        "status": {"observedGeneration": 1, "lastAttemptedRevision": version,
                   "history": [{"chartVersion": version, "status": "failed"},
                               {"chartVersion": f"0.1.0+{OLD[:12]}", "status": "superseded"}],
                   "conditions": conditions},
    })


def test_a_failed_upgrade_fails_with_helm_s_error_before_and_after_it_stalls() -> None:
    while_reconciling = progress_at(release([RECONCILING, *UPGRADE_FAILED]), SHA)
    stalled = progress_at(release([*UPGRADE_FAILED, GAVE_UP]), SHA)
    assert (while_reconciling.state, while_reconciling.reason) == (FAILED, "UpgradeFailed")
    # Not "RetriesExceeded: Failed to upgrade after 1 attempt(s)": that hides the cause.
    assert stalled == while_reconciling
    assert CAUSE in stalled.message


@given(st.permutations([*UPGRADE_FAILED, GAVE_UP]))
def test_the_reported_failure_does_not_depend_on_the_order_of_the_conditions(
        conditions: list[dict[str, Any]]) -> None:
    found = progress_at(release(conditions), SHA)
    assert (found.state, found.reason, found.message) == (FAILED, "UpgradeFailed", CAUSE)


def test_a_stalled_release_of_another_commit_is_not_failed_for_this_one() -> None:
    assert progress_at(release([*UPGRADE_FAILED, GAVE_UP], attempted=OLD), SHA).state != FAILED


def test_a_stall_that_names_its_own_cause_is_reported_as_such() -> None:
    denied = {"type": "Stalled", "status": "True", "reason": "AccessDenied",
              "message": "cross-namespace references are not allowed"}
    found = progress_at(release([*UPGRADE_FAILED, denied]), SHA)
    assert (found.state, found.reason, found.message) == (FAILED, "AccessDenied", denied["message"])
