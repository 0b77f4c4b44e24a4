"""What a push's 202 says, and the ref its delivery records."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from starlette.responses import Response

from receiver.bounded import BoundedMap
from receiver.delivery.store import Delivery
from receiver.flux.objects import ObjectKey
from receiver.flux.origin import package_ref
from receiver.giturls import registry_host
from receiver.push.mismatch import Unmatched
from receiver.push.package_routing import OCI_TYPES
from receiver.push.routing import Plan
from receiver.push.selector import Selection

# Starlette's JSONResponse rendering: the reply's bytes are the same as before it was templated.
# One encoder for every call (`json.dumps` with these arguments builds a new one each time);
# a string it encodes in one C call.
_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None,
                          separators=(",", ":")).encode


def record_ref(selection: Selection) -> str:
    """A push's ref; for a container package, the OCI reference pushed (`origin.package_ref`),
    which lets any replica tell the artifact it produced (`delivery.package.has_push`); for a
    pull request, its head ref (`refs/pull/<number>/head`, as Gitea names it); for a branch
    or tag created or deleted, its full ref."""
    if selection.push is not None:
        return selection.push.ref
    if selection.pull_request is not None:
        return f"refs/pull/{selection.pull_request.number}/head"
    if (ref := selection.ref_event) is not None:
        return f"refs/{'heads' if ref.ref_type == 'branch' else 'tags'}/{ref.name}"
    package = selection.package
    registry = registry_host(package.instance) if package is not None else None
    if package is None or registry is None or package.type not in OCI_TYPES:
        return ""
    return package_ref(registry, package.owner, package.name, package.version)


class _Template:
    """A plan's 202 reply rendered once, but for what differs per push: the delivery's id, mark,
    commit and ref, each target's state, and what `_annotate_only` and `unmatched` report."""

    __slots__ = ("annotate_only", "head", "keys", "prefixes", "tail", "tail_after_annotate")

    def __init__(self, plan: Plan, listed: Collection[ObjectKey]) -> None:
        reply = plan.as_dict()  # without a store: unrelated objects are only counted
        namespace = plan.receiver.partition("/")[0]
        shown = [s for s in reply["skipped"] if s["namespace"] == namespace
                 or ObjectKey(s["kind"], s["namespace"], s["name"]) in listed]
        if len(shown) < len(reply["skipped"]):
            reply["skipped_elsewhere"] = len(reply["skipped"]) - len(shown)
            reply["skipped"] = shown
        self.keys = tuple(t.key for t in plan.targets)
        # Each target's entry without its closing brace: the state (and error) follow.
        self.prefixes = tuple(_dumps(t.as_dict())[:-1] for t in plan.targets)
        rest = [(k, v) for k, v in reply.items() if k not in ("receiver", "targets")]
        at = next((i for i, (k, _) in enumerate(rest) if k == "annotate_only"), None)
        self.annotate_only = at is not None
        before = rest if at is None else rest[:at]
        after = [] if at is None else rest[at + 1:]
        plan_annotate = _dumps(reply["annotate_only"]) if at is not None else ""
        # `tail`: everything after the targets, the plan's own annotate_only included;
        # `tail_after_annotate`: what follows that key when a reply fills it in itself.
        self.tail = _fields(before) + (f',"annotate_only":{plan_annotate}' if at is not None
                                       else "") + _fields(after)
        self.tail_after_annotate = (_fields(before), _fields(after))
        self.head = f',"receiver":{_dumps(reply["receiver"])},"targets":['


def _fields(items: list[tuple[str, Any]]) -> str:
    return "".join(f",{_dumps(k)}:{_dumps(v)}" for k, v in items)


# (plan, listed) by identity -> its template: plans come from `push.plan_cache` and a delivery
# keeps its own, so the pushes of one Receiver to one place share one.
_TEMPLATES: BoundedMap[tuple[int, int], tuple[Plan, Collection[ObjectKey], _Template]] = (
    BoundedMap(4096))


def _template(plan: Plan, listed: Collection[ObjectKey]) -> _Template:
    key = (id(plan), id(listed))
    found = _TEMPLATES.get(key)
    if found is not None and found[0] is plan and found[1] is listed:
        return found[2]
    template = _Template(plan, listed)
    _TEMPLATES[key] = (plan, listed, template)  # both kept alive: their ids stay theirs
    return template


def accepted_reply(delivery: Delivery, plan: Plan, listed: Collection[ObjectKey],
                   annotate_only: list[dict[str, str]] | None = None,
                   mismatch: Unmatched | None = None) -> Response:
    """The 202 reply: the plan with each annotated target's state now, the kinds annotated by
    name only, and why a push that matched no source did not (`unmatched`). `plan` is passed
    in: a delivery that settled at once (a refused patch) has already dropped its own.
    Objects skipped in another namespace than the Receiver's, which it does not list, are only
    counted (`skipped_elsewhere`): the pusher holds this Receiver's token, not a view of every
    namespace that reads the same repository or registry."""
    template = _template(plan, listed)
    views = {t.key: t for t in delivery.view.targets}
    entries = []
    for key, prefix in zip(template.keys, template.prefixes, strict=True):
        view = views.get(key)
        if view is None:
            entries.append(prefix + ',"state":"queued"}')
        elif view.state == "failed":
            entries.append(f'{prefix},"state":"failed","error":{_dumps(view.message)}}}')
        else:
            entries.append(f'{prefix},"state":{_dumps(view.state)}}}')
    if annotate_only and template.annotate_only:
        before, after = template.tail_after_annotate
        tail = f'{before},"annotate_only":{_dumps(annotate_only)}{after}'
    elif annotate_only:
        tail = f'{template.tail},"annotate_only":{_dumps(annotate_only)}'
    else:
        tail = template.tail
    if mismatch is not None:
        tail += f',"unmatched":{_dumps(mismatch.as_dict())}'
    body = (f'{{"delivery":{_dumps(delivery.id)},"mark":{_dumps(delivery.record.mark)},'
            f'"commit":{_dumps(delivery.sha)},"ref":{_dumps(delivery.ref)}'
            f'{template.head}{",".join(entries)}]{tail}}}')
    return Response(body.encode(), status_code=202, media_type="application/json")
