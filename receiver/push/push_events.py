"""What the bridge says as Kubernetes Events about a push and a Receiver. Pure.

On the Receiver: a push accepted with its targets (Normal `PushAccepted`), a push that
reconciles nothing (Warning `PushMatchedNothing`: Gitea shows the 202 green), a token it cannot
use (Warning `TokenUnusable`: the path answers 404), an unusable type (Warning
`UnsupportedType`), an invalid filter (Warning `InvalidFilter`: requests answer 503). On each
source it annotates for a push at once: Normal `ReconcileRequested`, naming the Receiver and the
push.
The `EventBook` aggregates repeats and bounds the writes.
"""

from __future__ import annotations

from collections.abc import Sequence

from receiver.flux.event_book import EventNote
from receiver.flux.objects import FluxObject
from receiver.flux.store import ObjectStore
from receiver.push.routing import PHASE_SOURCE, Plan

MAX_NAMED = 5  # targets named in one message
MAX_TARGET_EVENTS = 20  # objects given their own Event per push


def _note(obj: FluxObject, type_: str, reason: str, message: str) -> EventNote:
    uid = obj.metadata.get("uid")
    return EventNote(obj.key, obj.api_version, "Warning" if type_ == "Warning" else "Normal",
                     reason, message, uid if isinstance(uid, str) else "")


def _what(ref: str, sha: str) -> str:
    if ref and sha:
        return f"push of {ref} at {sha[:12]}"
    return "request without push details"


def _names(keys: Sequence[str]) -> str:
    more = len(keys) - MAX_NAMED
    return ", ".join(keys[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")


def push_notes(receiver: FluxObject, plan: Plan, store: ObjectStore, *, ref: str, sha: str,
               annotated: Sequence[str] = (), unmatched: str = "") -> list[EventNote]:
    """The Events of one accepted push: on the Receiver, and on what it annotates.
    `annotated`: the kinds-and-names annotated without routing (`Kind/ns/name`)."""
    what = _what(ref, sha)
    named = [f"{t.kind}/{t.namespace}/{t.name}" for t in plan.targets] + list(annotated)
    if not named:
        why = unmatched or plan.note or "no object the Receiver lists takes it"
        return [_note(receiver, "Warning", "PushMatchedNothing",
                      f"{what} reconciles nothing: {why}")]
    notes = [_note(receiver, "Normal", "PushAccepted",
                   f"{what}: reconciling {_names(named)}")]
    by = f"{receiver.namespace}/{receiver.name}"
    # Sources are annotated at once; a consumer only once its source has the commit (and
    # then the delivery says so), so only the sources get an Event now.
    for target in [t for t in plan.targets if t.phase == PHASE_SOURCE][:MAX_TARGET_EVENTS]:
        obj = store.get(target.key)
        if obj is not None:
            notes.append(_note(obj, "Normal", "ReconcileRequested",
                               f"requested by Receiver {by} for the {what}"))
    return notes


def token_note(receiver: FluxObject, why: str) -> EventNote:
    secret = (receiver.spec.get("secretRef") or {}).get("name") or "(none)"
    return _note(receiver, "Warning", "TokenUnusable",
                 f"Secret {receiver.namespace}/{secret}: {why}; the hook path answers 404")


def type_note(receiver: FluxObject) -> EventNote:
    return _note(receiver, "Warning", "UnsupportedType", (
        f"type {receiver.spec.get('type')!r} is not served by gitea-flux-bridge (github, "
        "generic, generic-hmac): the hook path answers 404"))


def filter_note(receiver: FluxObject, which: str) -> EventNote:
    return _note(receiver, "Warning", "InvalidFilter",
                 f"invalid {which}: every request to the hook answers 503")
