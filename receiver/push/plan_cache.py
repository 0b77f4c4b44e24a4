"""Plans remembered per (Receiver, pushed repository, ref, changed files): a push of a new commit
to the same place routes exactly as the one before it, since a plan never depends on the commit.

Each plan is kept with the versions it was computed at: the Receiver's `resourceVersion` and the
store's `routing_version`, which every watch event that can change a route bumps (an object
added or removed, a spec or label changed, a source's artifact revision, an annotation such as
a consumer's paths or an input provider's reconcile switch). Flux's and the bridge's own request
marks, which change a busy source every second, leave the plans valid. Only pushes are
remembered: package, pull request and ref events, and bodies without push details, are routed
afresh every time.
"""

from __future__ import annotations

from collections.abc import Hashable

from receiver.bounded import BoundedMap
from receiver.flux.objects import FluxObject
from receiver.flux.store import ObjectStore
from receiver.push.package_routing import plan_selection
from receiver.push.resources import Resolved
from receiver.push.routing import Plan
from receiver.push.selector import Selection

# Distinct (Receiver, push) shapes remembered; a CI pushing to many branches or paths only
# cycles the oldest out.
MAX_PLANS = 2048


def _push_key(selection: Selection) -> Hashable:
    push = selection.push
    assert push is not None
    # Everything of the push that routing reads (its own and the input providers' part); not
    # its commit.
    return (selection.shape, push.repo_urls, push.full_name, push.ref, push.deleted,
            push.paths_complete, push.paths)


class PlanCache:
    def __init__(self, store: ObjectStore, *, allow_cross_namespace: bool,
                 gitea_prefixes: frozenset[str], max_plans: int = MAX_PLANS) -> None:
        self._store = store
        self._allow_cross_namespace = allow_cross_namespace
        self._gitea_prefixes = gitea_prefixes
        self._plans: BoundedMap[Hashable, tuple[tuple[str, int], Plan]] = BoundedMap(
            max_plans)

    def plan(self, receiver: FluxObject, selection: Selection, resolved: Resolved) -> Plan:
        """`plan_selection`'s plan, compacted (`Plan.compact`): what a delivery keeps."""
        if selection.push is None:  # a package, pull request or ref event, or no details
            return self._route(receiver, selection, resolved)
        store = self._store
        key = (receiver.key, _push_key(selection))
        # `resolved` changes only with the Receiver's version or the store's shape: both here.
        stamp = (receiver.resource_version, store.routing_version)
        cached = self._plans.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        plan = self._route(receiver, selection, resolved)
        self._plans[key] = (stamp, plan)
        return plan

    def _route(self, receiver: FluxObject, selection: Selection, resolved: Resolved) -> Plan:
        return plan_selection(
            receiver, selection, self._store, allow_cross_namespace=self._allow_cross_namespace,
            resolved=resolved, gitea_prefixes=self._gitea_prefixes).compact()
