"""A github Receiver's `spec.events`, as Flux honours it. Pure.

Flux's github Receiver refuses (400) an event its non-empty `spec.events` does not list, `ping`
included, and compares names case-insensitively.
"""

from __future__ import annotations

from collections.abc import Mapping

from receiver.flux.objects import FluxObject

# The events the bridge routes by what their body says (`selector`): taken by a Receiver whose
# spec.events is empty, as Flux takes every event there, and routed precisely.
ROUTED_EVENTS = frozenset({"push", "package", "pull_request", "create", "delete"})


def _names(receiver: FluxObject) -> list[str]:
    events = receiver.spec.get("events")
    return [e for e in events if isinstance(e, str)] if isinstance(events, list) else []


def listed(receiver: FluxObject, event: str) -> bool:
    """Does the Receiver's spec.events name this (lower-cased) event?"""
    return (receiver.spec.get("type") == "github" and bool(event)
            and any(e.lower() == event for e in _names(receiver)))


def refusal(receiver: FluxObject, header: str) -> str | None:
    """Why the request is refused (400), or None: an event not in a non-empty spec.events."""
    if receiver.spec.get("type") != "github":
        return None
    events = _names(receiver)
    event = header.strip()
    if not events or any(e.lower() == event.lower() for e in events):
        return None
    return f"event {event[:64]!r} is not in the receiver's spec.events"


def event_name(headers: Mapping[str, str]) -> str:
    """The event a request names, lower-cased, to tell a push from a ping or another event:
    Gitea's own `X-Gitea-Event`, else `X-GitHub-Event` (Gitea sends both). `refusal` reads
    `X-GitHub-Event` alone, as Flux matches `spec.events` against it."""
    return (headers.get("x-gitea-event") or headers.get("x-github-event") or "").strip().lower()


def answer_without_push(receiver: FluxObject, event: str) -> dict[str, str] | None:
    """The 200 answer to an event the bridge does not route and that the Receiver does not
    list (it reconciles nothing): `pong` for a ping, `ignored` for any other. None: the request
    goes on (an event the bridge routes, `ROUTED_EVENTS`; no event named; or an event
    `spec.events` lists: one the bridge cannot route reconciles every listed object, as Flux
    does)."""
    if not event or event in ROUTED_EVENTS or listed(receiver, event):
        return None
    if event == "ping":
        return {"status": "pong"}
    return {"status": "ignored", "event": event[:64], "reason": (
        "not an event the bridge routes (push, package, pull_request, create, delete); list "
        "it in the receiver's spec.events to have it reconcile every listed object, as Flux "
        "does")}


def refuses_media(receiver: FluxObject, media: str, has_body: bool) -> bool:
    """Flux's github Receiver (go-github ValidatePayload) takes a body of JSON or Gitea's form
    only; a signed body of another content type is refused (415)."""
    return (has_body and receiver.spec.get("type") == "github"
            and media not in ("application/json", "application/x-www-form-urlencoded"))
