"""What a push's 202 says, and the ref its delivery records."""

from __future__ import annotations

from collections.abc import Collection

from starlette.responses import JSONResponse

from receiver.delivery.store import Delivery
from receiver.flux.objects import ObjectKey
from receiver.flux.origin import package_ref
from receiver.giturls import registry_host
from receiver.push.mismatch import Unmatched
from receiver.push.package_routing import OCI_TYPES
from receiver.push.routing import Plan
from receiver.push.selector import Selection


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


def accepted_reply(delivery: Delivery, plan: Plan, listed: Collection[ObjectKey],
              annotate_only: list[dict[str, str]] | None = None,
              mismatch: Unmatched | None = None) -> JSONResponse:
    """The 202 reply: the plan with each annotated target's state now, the kinds annotated by
    name only, and why a push that matched no source did not (`unmatched`). `plan` is passed
    in: a delivery that settled at once (a refused patch) has already dropped its own.
    Objects skipped in another namespace than the Receiver's, which it does not list, are only
    counted (`skipped_elsewhere`): the pusher holds this Receiver's token, not a view of every
    namespace that reads the same repository or registry."""
    reply = plan.as_dict()  # without a store: unrelated objects are only counted
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
    return JSONResponse({"delivery": delivery.id, "mark": delivery.record.mark,
                         "commit": delivery.sha, "ref": delivery.ref, **reply}, status_code=202)
