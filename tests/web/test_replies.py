"""The 202 reply, rendered from a template per plan: the same JSON, key for key and in the same
order, as the reply built field by field (`docs/api.md`), whatever the plan and the states."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from receiver.delivery.record import DeliveryRecord
from receiver.delivery.store import Delivery, record_targets
from receiver.delivery.view import DeliveryView, TargetView
from receiver.flux.objects import ObjectKey
from receiver.push.mismatch import Unmatched
from receiver.push.routing import Plan, Target
from receiver.web.replies import accepted_reply

_KINDS = ["GitRepository", "Kustomization", "HelmRelease", "Bucket"]
targets_ = st.builds(
    Target, st.sampled_from(["source.toolkit.fluxcd.io/v1", "kustomize.toolkit.fluxcd.io/v1"]),
    st.sampled_from(_KINDS), st.sampled_from(["flux-system", "apps", "other"]),
    st.text(min_size=1, max_size=6), st.text(max_size=20))
states = st.sampled_from(["queued", "annotated", "reconciling", "ready", "failed", "timed_out"])


def _reference(delivery: Delivery, plan: Plan, listed: set[ObjectKey],
               annotate_only: list[dict[str, str]] | None,
               mismatch: Unmatched | None) -> dict[str, Any]:
    """The reply as the documentation lists its fields, built one by one."""
    reply = plan.as_dict()
    namespace = plan.receiver.partition("/")[0]
    shown = [s for s in reply["skipped"] if s["namespace"] == namespace
             or ObjectKey(s["kind"], s["namespace"], s["name"]) in listed]
    if len(shown) < len(reply["skipped"]):
        reply["skipped_elsewhere"] = len(reply["skipped"]) - len(shown)
        reply["skipped"] = shown
    if annotate_only:
        reply["annotate_only"] = annotate_only
    if mismatch is not None:
        reply["unmatched"] = mismatch.as_dict()
    reply["targets"] = []
    for target in plan.targets:
        view = delivery.view.get(target.key)
        entry = {**target.as_dict(), "state": view.state if view else "queued"}
        if view is not None and view.state == "failed":
            entry["error"] = view.message
        reply["targets"].append(entry)
    return {"delivery": delivery.id, "mark": delivery.record.mark, "commit": delivery.sha,
            "ref": delivery.ref, **reply}


@given(
    targets=st.lists(targets_, max_size=5, unique_by=lambda t: t.key),
    skipped=st.lists(targets_, max_size=4), others=st.lists(targets_, max_size=3),
    note=st.sampled_from(["", "no push details: the body is empty"]),
    listed_some=st.booleans(), data=st.data(),
    annotate_only=st.none() | st.lists(st.fixed_dictionaries(
        {"kind": st.just("Bucket"), "state": st.sampled_from(["annotated", "failed"])}),
        min_size=1, max_size=2),
    mismatch=st.none() | st.builds(Unmatched, st.just("no-source"), st.text(max_size=10)),
    unrelated=st.integers(0, 5), ref=st.text(max_size=10),
)
def test_the_reply_is_the_documented_json(
        targets: list[Target], skipped: list[Target], others: list[Target], note: str,
        listed_some: bool, data: st.DataObject, annotate_only: list[dict[str, str]] | None,
        mismatch: Unmatched | None, unrelated: int, ref: str) -> None:
    plan = Plan("flux-system/gitea", tuple(targets), tuple(targets[::2]), tuple(skipped),
                note=note, annotate_only=tuple(others), unrelated_count=unrelated)
    record = DeliveryRecord("flux-system/gitea", "a" * 40, ref, 1.5, "m0", record_targets(plan))
    delivery = Delivery.from_record("id.\u00e9", record, plan)
    delivery.view = DeliveryView(tuple(
        TargetView(t.key, t.role, data.draw(states), message=data.draw(st.text(max_size=8)))
        for t in record.targets if data.draw(st.booleans())))
    listed = {t.key for t in skipped[::2]} if listed_some else set()
    for _ in range(2):  # rendered afresh, then from the plan's template
        reply = accepted_reply(delivery, plan, listed, annotate_only, mismatch)
        expected = _reference(delivery, plan, listed, annotate_only, mismatch)
        assert reply.status_code == 202
        assert reply.headers["content-type"] == "application/json"
        document = json.loads(reply.body)
        assert document == expected
        assert list(document) == list(expected)
        assert [list(e) for e in document["targets"]] == [list(e) for e in expected["targets"]]
