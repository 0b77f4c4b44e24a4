"""Gitea pull request, branch and tag events -> the input providers whose inputs they change,
in the shape of a push's plan. Pure.

flux-operator's ResourceSetInputProvider (`fluxcd.controlplane.io/v1`) of type
`GiteaPullRequest`, `GiteaBranch` or `GiteaTag` lists the open pull requests, the branches or
the tags of the Gitea repository its `spec.url` names, and exports one input per item for
ResourceSets to render (a preview per pull request, an environment per branch). It polls; a
Receiver listing it makes a change show at once. What it lists, as its Gitea provider and
reconciler decide (the facts this module keeps):

* a pull request while it is open, when its head branch name passes the include and exclude
  patterns (Go regexps, unanchored) and it carries every label of `spec.filter.labels`; it
  exports the number, head commit, head branch, title, author and labels, so opening,
  reopening, a new head commit, an edit (the title) and a label change can change the inputs,
  and closing removes one. Assignees, milestones and reviews are not exported;
* the include pattern is the last one set of `includeBranch`, `includeTag` and
  `includeEnvironment` (each replaces the one before), the exclude pattern likewise;
* `spec.skip.labels`: a pull request holding one of them (or lacking one written `!label`)
  keeps the inputs it had, and a new one is not added, so its changes change nothing;
* a branch or tag by its name, with the commit it points at (tags also within
  `spec.filter.semver`, when set): creating, moving and deleting one changes the inputs;
* the annotation `fluxcd.controlplane.io/reconcile: disabled` pauses the provider.

A provider is matched by repository as a GitRepository is (`spec.url` normalised, host aliases
applied). Routing is conservative where the event cannot tell: a label change or a close is
routed whatever the labels are now (the pull request may have been listed under labels it no
longer has), and `spec.filter.limit` is not applied (which items fall within it depends on the
others).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from receiver.flux.objects import INPUT_PROVIDER_KIND, FluxObject, ObjectKey
from receiver.flux.store import ObjectStore
from receiver.gitea.ref_payloads import PullRequestEvent, RefEvent
from receiver.push.goregexp import go_pattern
from receiver.push.resources import Resolved, resolve_resources
from receiver.push.routing import Plan, Target, _target
from receiver.push.semver import ConstraintError, tag_selected

PULL_REQUEST_TYPE = "GiteaPullRequest"
BRANCH_TYPE = "GiteaBranch"
TAG_TYPE = "GiteaTag"
GITEA_TYPES = frozenset({PULL_REQUEST_TYPE, BRANCH_TYPE, TAG_TYPE})
# flux-operator pauses a provider annotated `<group>/reconcile: disabled`.
RECONCILE_SWITCH = "fluxcd.controlplane.io/reconcile"

# Pull request actions that can change what a provider exports (Gitea's HookIssueAction).
CHANGING_ACTIONS = frozenset({"opened", "reopened", "synchronized", "edited", "label_updated",
                              "label_cleared", "closed"})
# ...of which these may take a pull request out of the list whatever labels it has now.
LEAVING_ACTIONS = frozenset({"label_updated", "label_cleared", "closed"})

Event = PullRequestEvent | RefEvent


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _filter(spec: dict[str, Any]) -> dict[str, Any]:
    found = spec.get("filter")
    return found if isinstance(found, dict) else {}


def _last_set(filter_: dict[str, Any], names: Sequence[str]) -> tuple[str, str]:
    """(field, pattern) of the last of `names` set: flux-operator lets each replace the one
    before, whatever the provider's type."""
    chosen = ("", "")
    for name in names:
        if pattern := _str(filter_.get(name)):
            chosen = (name, pattern)
    return chosen


def name_passes(spec: dict[str, Any], name: str) -> tuple[bool, str]:
    """Does a branch or tag name pass the provider's include and exclude patterns? With the
    reason ("" when no pattern is set)."""
    filter_ = _filter(spec)
    include = _last_set(filter_, ("includeBranch", "includeTag", "includeEnvironment"))
    exclude = _last_set(filter_, ("excludeBranch", "excludeTag", "excludeEnvironment"))
    why: list[str] = []
    for (field, text), wanted in ((include, True), (exclude, False)):
        if not text:
            continue
        pattern = go_pattern(text)
        if pattern.compiled is None:
            return False, f"its {field} {text!r} {pattern.problem}: the provider lists nothing"
        if (pattern.search(name) is not None) is not wanted:
            verb = "does not match" if wanted else "matches"
            return False, f"{name} {verb} its {field} {text!r}"
        why.append(f"{field} {text!r}")
    return True, " and ".join(why)


def skip_label(spec: dict[str, Any], labels: Iterable[str]) -> str | None:
    """The `spec.skip.labels` entry that holds a pull request's inputs as they were, or None."""
    skip = spec.get("skip")
    entries = skip.get("labels") if isinstance(skip, dict) else None
    have = set(labels)
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, str) or not entry:
            continue
        if entry.startswith("!") and entry[1:] not in have:
            return entry
        if not entry.startswith("!") and entry in have:
            return entry
    return None


def pull_request_changes(spec: dict[str, Any], pr: PullRequestEvent) -> tuple[bool, str]:
    """Can this pull request event change what a GiteaPullRequest provider exports?"""
    if pr.action not in CHANGING_ACTIONS:
        return False, f"action {pr.action} changes nothing a pull request provider exports"
    ok, why = name_passes(spec, pr.head_ref)
    if not ok:
        return False, why
    where = f"head branch {pr.head_ref}" + (f" passes {why}" if why else "")
    if pr.action in LEAVING_ACTIONS:
        return True, f"{pr.label}: {where}; it may enter or leave the list"
    wanted = [x for x in _filter(spec).get("labels") or [] if isinstance(x, str)]
    missing = [x for x in wanted if x not in pr.labels]
    if missing:
        return False, f"{pr.label} lacks label {missing[0]} of its filter.labels"
    if (held := skip_label(spec, pr.labels)) is not None:
        return False, f"{pr.label}: its skip.labels entry {held!r} keeps the inputs as they were"
    labels = f" and carries {', '.join(wanted)}" if wanted else ""
    return True, f"{pr.label}: {where}{labels}"


def ref_changes(spec: dict[str, Any], kind: str, ev: RefEvent) -> tuple[bool, str]:
    """Can this branch or tag change what a GiteaBranch or GiteaTag provider exports?"""
    wanted = "branch" if kind == BRANCH_TYPE else "tag"
    if ev.ref_type != wanted:
        plural = {"branch": "branches", "tag": "tags"}
        return False, f"a {kind} provider lists {plural[wanted]}, not {plural[ev.ref_type]}"
    ok, why = name_passes(spec, ev.name)
    if not ok:
        return False, why
    semver = _str(_filter(spec).get("semver")) if kind == TAG_TYPE else ""
    if semver:
        try:
            if not tag_selected(ev.name, semver):
                return False, f"tag {ev.name} is outside its filter.semver {semver}"
        except ConstraintError:
            return False, f"its filter.semver {semver!r} is invalid: the provider lists nothing"
        why = " and ".join(w for w in (why, f"filter.semver {semver}") if w)
    return True, f"{ev.label}" + (f": passes {why}" if why else "")


def changes(obj: FluxObject, event: Event) -> tuple[bool, str]:
    """Can the event change what this input provider exports? With the reason."""
    kind = _str(obj.spec.get("type"))
    if kind not in GITEA_TYPES:
        return False, f"type {kind or '(none)'} does not list Gitea pull requests, branches " \
                      "or tags"
    if obj.annotations.get(RECONCILE_SWITCH, "").lower() == "disabled":
        return False, f"paused ({RECONCILE_SWITCH}: disabled)"
    if isinstance(event, PullRequestEvent):
        if kind != PULL_REQUEST_TYPE:
            return False, f"a {kind} provider does not list pull requests"
        return pull_request_changes(obj.spec, event)
    if kind == PULL_REQUEST_TYPE:
        # A push to a pull request's head branch comes with its own `synchronized` event.
        return False, "a GiteaPullRequest provider changes with pull_request events, not " \
                      f"with a {ev_kind(event)}"
    return ref_changes(obj.spec, kind, event)


def ev_kind(event: RefEvent) -> str:
    return {"create": "create event", "delete": "delete event"}.get(event.event, "push")


def same_repository(obj: FluxObject, event: Event, store: ObjectStore,
                    prefixes: frozenset[str]) -> bool:
    """Does the provider's `spec.url` name the event's repository (host aliases applied)? By
    name on the configured Gitea hosts when the event carries no URL (an Actions body)."""
    mine = store.normalise_url(_str(obj.spec.get("url")))
    if not mine:
        return False
    if event.repo_urls:
        return any(store.normalise_url(u) == mine for u in event.repo_urls)
    name = event.full_name.lower()
    if not name or not mine.lower().endswith("/" + name):
        return False
    return not prefixes or mine.lower().removesuffix("/" + name) in prefixes


def route(objects: Iterable[FluxObject], event: Event, store: ObjectStore,
          prefixes: frozenset[str]) -> tuple[dict[ObjectKey, Target], dict[ObjectKey, Target]]:
    """The listed input providers the event changes (targets) and the others (skipped), by
    key, with the reasons; objects of other kinds are not looked at."""
    targets: dict[ObjectKey, Target] = {}
    skipped: dict[ObjectKey, Target] = {}
    repository = event.full_name or (event.repo_urls[0] if event.repo_urls else "")
    for obj in objects:
        if obj.kind != INPUT_PROVIDER_KIND:
            continue
        if not same_repository(obj, event, store, prefixes):
            skipped[obj.key] = _target(obj, f"its spec.url is not repository {repository}")
            continue
        ok, why = changes(obj, event)
        (targets if ok else skipped)[obj.key] = _target(
            obj, f"repository {repository}, {why}" if ok else why)
    return targets, skipped


def _other_reason(obj: FluxObject, event: Event) -> str:
    what = event.label if isinstance(event, PullRequestEvent) else f"a {ev_kind(event)}"
    return f"{what} changes only input providers' inputs: a {obj.kind} is not reconciled for it"


def plan_event(receiver: FluxObject, event: Event, store: ObjectStore, *,
               allow_cross_namespace: bool = True, resolved: Resolved | None = None,
               gitea_prefixes: frozenset[str] = frozenset()) -> Plan:
    """The plan for a pull request event, or a `create` or `delete` of a branch or tag: the
    listed input providers it changes; every other listed object is skipped, with the
    reason."""
    if resolved is None:
        resolved = resolve_resources(receiver, store, allow_cross_namespace=allow_cross_namespace)
    objects = resolved.objects(store)
    targets, skipped = route(objects, event, store, gitea_prefixes)
    for obj in objects:
        if obj.kind != INPUT_PROVIDER_KIND:
            skipped[obj.key] = _target(obj, _other_reason(obj, event))
    issues = [Target(i.api_version, i.kind, i.namespace, i.name, i.reason)
              for i in resolved.issues]
    # Kinds the bridge only patches by name: nothing they read changed either.
    blind = [Target(api, key.kind, key.namespace, key.name,
                    f"a {key.kind} is not reconciled for this event")
             for api, key in resolved.annotate_only]
    return Plan(
        receiver=f"{receiver.namespace}/{receiver.name}",
        targets=tuple(t for _, t in sorted(targets.items())),
        tracked=(),  # a provider has no commit to be Ready at; its ResourceSet's objects do
        skipped=tuple(sorted((*skipped.values(), *issues, *blind), key=lambda t: t.key)),
    )


def with_ref_providers(plan: Plan, event: RefEvent | None, store: ObjectStore,
                       resolved: Resolved, gitea_prefixes: frozenset[str] = frozenset()) -> Plan:
    """A push's plan with the listed input providers the pushed branch or tag changes: after
    the push's own targets (they read the Git host, not a source), the others skipped."""
    providers = resolved.provider_objects(store)
    if not providers or event is None:
        return plan
    targets, skipped = route(providers, event, store, gitea_prefixes)
    return replace(
        plan,
        targets=(*plan.targets, *(t for _, t in sorted(targets.items()))),
        skipped=tuple(sorted((*plan.skipped, *skipped.values()), key=lambda t: t.key)),
        related=plan.related | targets.keys() | skipped.keys(),
    )
