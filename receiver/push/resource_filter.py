"""A plan narrowed by the Receiver's `spec.resourceFilter` and `spec.resources[].filter`. Pure.

Every object the plan would annotate is shown to the filter as `res`; one for which it is false
is not annotated and moves to `skipped` with the reason. When the filter cannot be evaluated
for an object (a key the request lacks), the whole request fails, as it does in Flux: a CI step
must not read success from a request that annotated nothing by accident. The pusher is told
which object, not CEL's message (which may quote the object's metadata); that goes to the log.
The evaluation itself runs elsewhere (`cel_sandbox`): this module builds its input
(`filter_inputs`) and applies its verdicts (`apply_verdicts`). A consumer
is no longer followed when it is filtered out, nor when its source is: that source will not
fetch the pushed commit on the bridge's request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from receiver.flux.objects import ObjectKey, consumer_source
from receiver.flux.store import ObjectStore
from receiver.push.cel_filter import CompiledFilter, resource_document
from receiver.push.routing import Plan, Target

FALSE_REASON = "resourceFilter is false"
ENTRY_FALSE_REASON = "its spec.resources[].filter is false"


class FilterEvaluationError(Exception):
    """The filter failed for an object: the request is refused and nothing is annotated.
    `str()` is for the pusher; `reason` (CEL's message) for the log only."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _res(target: Target, store: ObjectStore) -> dict[str, Any]:
    obj = store.get(target.key)
    if obj is not None:
        return resource_document(obj.api_version, obj.kind, obj.metadata)
    # A kind the bridge only patches (not listed or watched): what its entry says.
    return resource_document(target.api_version, target.kind,
                             {"name": target.name, "namespace": target.namespace})


# (expression, each object's `res`, content type, body) -> a verdict per object: True, False,
# or why it could not be evaluated (`cel_sandbox.FilterSandbox.evaluate`).
Evaluate = Callable[[str, Sequence[Mapping[str, Any]], str, bytes], Awaitable[list[bool | str]]]


async def narrow(plan: Plan, compiled: CompiledFilter | None,
                 entries: Mapping[ObjectKey, Sequence[CompiledFilter]], evaluate: Evaluate,
                 content_type: str, body: bytes, store: ObjectStore) -> Plan:
    """The plan narrowed by the Receiver's `resourceFilter`, then by the filters of the
    `spec.resources` entries that list an object: the one pipeline the service and `plan` share.
    Raises what `evaluate` raises, and FilterEvaluationError."""
    if compiled is not None:
        candidates, resources = filter_inputs(plan, store)
        if candidates:
            verdicts = await evaluate(compiled.expression, resources, content_type, body)
            plan = apply_verdicts(plan, candidates, verdicts, store)
    listed = [t for t in (*plan.targets, *plan.annotate_only) if entries.get(t.key)]
    per_target: list[bool | str] = []
    for target in listed:
        res = resource_of(target, store)
        results = [(await evaluate(f.expression, [res], content_type, body))[0]
                   for f in entries[target.key]]
        per_target.append(entry_verdict(results))
    return apply_verdicts(plan, listed, per_target, store, ENTRY_FALSE_REASON)


def filter_inputs(plan: Plan, store: ObjectStore) -> tuple[tuple[Target, ...],
                                                          list[dict[str, Any]]]:
    """The objects the filter decides on, and each one's `res`."""
    candidates = (*plan.targets, *plan.annotate_only)
    return candidates, [_res(t, store) for t in candidates]


def resource_of(target: Target, store: ObjectStore) -> dict[str, Any]:
    """The `res` a filter sees for one object."""
    return _res(target, store)


def entry_verdict(results: Sequence[bool | str]) -> bool | str:
    """`spec.resources[].filter`: an object its filtered entries list is annotated when one of
    their filters is true, as Flux annotates per entry; one that cannot be evaluated (a str,
    the reason) fails the request."""
    failed = [r for r in results if not isinstance(r, bool)]
    return failed[0] if failed else any(results)


def apply_verdicts(plan: Plan, candidates: Sequence[Target], verdicts: Sequence[bool | str],
                   store: ObjectStore, reason: str = FALSE_REASON) -> Plan:
    """The plan without the candidates whose verdict is False (skipped with `reason`);
    FilterEvaluationError if one could not be evaluated."""
    return _narrowed(plan, zip(candidates, verdicts, strict=True), reason, store)


def _narrowed(plan: Plan, verdicts: Iterable[tuple[Target, bool | str]], reason: str,
              store: ObjectStore) -> Plan:
    dropped: dict[ObjectKey, Target] = {}
    for target, verdict in verdicts:
        if verdict is True:
            continue
        if verdict is not False:
            raise FilterEvaluationError(
                f"resourceFilter could not be evaluated for {target.kind} "
                f"{target.namespace}/{target.name}: the reason is in the bridge's log",
                str(verdict)[:200])
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
