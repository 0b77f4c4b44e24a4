"""A plan narrowed by the Receiver's `spec.resourceFilter` and `spec.resources[].filter`. Pure.

Every object the plan would annotate is shown to the filter as `res`; one for which it is false
is not annotated and moves to `skipped` with the reason. When the filter cannot be evaluated
for an object (a key the request lacks), the whole request fails, as it does in Flux: a CI step
must not read success from a request that annotated nothing by accident. A consumer
is no longer followed when it is filtered out, nor when its source is: that source will not
fetch the pushed commit on the bridge's request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from receiver.flux.objects import ObjectKey, consumer_source
from receiver.flux.store import ObjectStore
from receiver.push.cel_filter import CompiledFilter, resource_document
from receiver.push.routing import Plan, Target

FALSE_REASON = "resourceFilter is false"
ENTRY_FALSE_REASON = "its spec.resources[].filter is false"


class FilterEvaluationError(Exception):
    """The filter failed for an object: the request is refused and nothing is annotated."""


def _res(target: Target, store: ObjectStore) -> dict[str, Any]:
    obj = store.get(target.key)
    if obj is not None:
        return resource_document(obj.api_version, obj.kind, obj.metadata)
    # A kind the bridge only patches (not listed or watched): what its entry says.
    return resource_document(target.api_version, target.kind,
                             {"name": target.name, "namespace": target.namespace})


def filter_plan(plan: Plan, compiled: CompiledFilter, req: Mapping[str, Any],
                store: ObjectStore) -> Plan:
    candidates = (*plan.targets, *plan.annotate_only)
    verdicts = compiled.evaluate([_res(t, store) for t in candidates], req)
    return _narrowed(plan, zip(candidates, verdicts, strict=True), FALSE_REASON, store)


def filter_entries(plan: Plan, filters: Mapping[ObjectKey, Sequence[CompiledFilter]],
                   req: Mapping[str, Any], store: ObjectStore) -> Plan:
    """`spec.resources[].filter`: an object only filtered entries list (`filters`, see
    `Resolved.entry_filters`) is annotated when one of its entries' filters is true, as Flux
    annotates per entry. One that cannot be evaluated fails the request, as above."""
    verdicts: list[tuple[Target, bool | str]] = []
    for target in (*plan.targets, *plan.annotate_only):
        compiled = filters.get(target.key)
        if not compiled:
            continue
        res = _res(target, store)
        results = [f.evaluate([res], req)[0] for f in compiled]
        failed = [r for r in results if not isinstance(r, bool)]
        verdicts.append((target, failed[0] if failed else any(results)))
    return _narrowed(plan, verdicts, ENTRY_FALSE_REASON, store)


def _narrowed(plan: Plan, verdicts: Iterable[tuple[Target, bool | str]], reason: str,
              store: ObjectStore) -> Plan:
    dropped: dict[ObjectKey, Target] = {}
    for target, verdict in verdicts:
        if verdict is True:
            continue
        if verdict is not False:
            raise FilterEvaluationError(
                f"resourceFilter could not be evaluated for {target.kind} "
                f"{target.namespace}/{target.name}: {str(verdict)[:200]}")
        dropped[target.key] = dataclasses.replace(target, reason=reason)
    if not dropped:
        return plan

    def still_followed(target: Target) -> bool:
        if target.key in dropped:
            return False
        obj = store.get(target.key)
        source = consumer_source(obj) if obj is not None else None
        return source is None or source.key not in dropped

    return dataclasses.replace(
        plan,
        targets=tuple(t for t in plan.targets if t.key not in dropped),
        tracked=tuple(t for t in plan.tracked if still_followed(t)),
        skipped=tuple(sorted((*plan.skipped, *dropped.values()), key=lambda t: t.key)),
        annotate_only=tuple(t for t in plan.annotate_only if t.key not in dropped),
    )
