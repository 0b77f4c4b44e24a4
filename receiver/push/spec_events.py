"""A github Receiver's `spec.events`, as Flux honours it. Pure.

Flux's github Receiver refuses (400) an event its non-empty `spec.events` does not list, `ping`
included, and compares names case-insensitively.
"""

from __future__ import annotations

from receiver.flux.objects import FluxObject


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
