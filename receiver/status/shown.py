"""What Gitea shows, and what differs from what is wanted. Pure.

Several replicas post to one Gitea, so no replica's memory of its own posts is the truth. A
replica may believe what it posted or read for `repeat_window` seconds (that suppresses an exact
repeat, and lets one listing of a commit answer for all its contexts); after that it asks Gitea.
A change is never suppressed: memory can only say "same", and "same" expires."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from receiver.status.descriptions import comparable

Fields = tuple[str, str, str]  # (state, description, target_url): what a status shows


class ListedStatus(Protocol):
    """One status as a Gitea listing returns it, with the time Gitea stamped on it
    (`gitea.api_types.CommitStatus` fits)."""

    @property
    def state(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def target_url(self) -> str: ...
    @property
    def context(self) -> str: ...
    @property
    def id(self) -> int: ...
    @property
    def at(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class Seen:
    """What a replica saw Gitea show for one context at `at`: posted or read. None: nothing.
    `origin` names the event a post came from ("" for a read or a state-derived post)."""

    fields: Fields | None
    at: float
    origin: str = ""


def is_fresh(observed_at: float, now: float, window: float) -> bool:
    """An observation may be believed for `window` seconds, never longer (0: never)."""
    return 0 <= now - observed_at < window


def recall(
    seen: Seen | None, listed_at: float | None, now: float, window: float
) -> tuple[bool, Fields | None]:
    """(known, fields): what the replica may still believe Gitea shows for a context.

    A fresh post or read of the context answers. Otherwise a fresh *complete* listing of the
    commit answers "no status" (a listing records every context it shows, so a context it did
    not refresh was not in it). Anything older is unknown: ask Gitea.
    """
    if seen is not None and is_fresh(seen.at, now, window):
        return True, seen.fields
    if listed_at is not None and is_fresh(listed_at, now, window):
        return True, None
    return False, None


def recall_for_event(
    seen: Seen | None, listed_at: float | None, now: float, window: float, origin: str,
    arrived: float,
) -> tuple[bool, Fields | None]:
    """`recall` for a status that comes from a Flux event (`origin` identifies the event).

    Another replica may have posted since this one last looked, so only two things may be
    believed: our own post of this very event (a redelivery of it is an exact repeat), and what
    Gitea showed after the event arrived. A new event with the same words as an old one is not a
    repeat: failure, success (posted elsewhere), failure again must end showing failure.
    """
    if seen is not None and seen.origin == origin and is_fresh(seen.at, now, window):
        return True, seen.fields
    return recall(seen if seen is not None and seen.at >= arrived else None,
                  listed_at if listed_at is not None and listed_at >= arrived else None,
                  now, window)


def same_status(a: tuple[str, str, str], b: tuple[str, str, str], *, state_only: bool) -> bool:
    """(state, description, target_url) equality, durations masked; or the state alone."""
    if state_only:
        return a[0] == b[0]
    return a[0] == b[0] and comparable(a[1]) == comparable(b[1]) and a[2] == b[2]


def needs_post(shown: Fields | None, wanted: Fields, *, state_only: bool) -> bool:
    """Post unless Gitea (as far as we may know) shows the same latest status already."""
    return shown is None or not same_status(shown, wanted, state_only=state_only)


Shown = TypeVar("Shown", bound=ListedStatus)


def latest_by_context(items: Iterable[Shown]) -> dict[str, Shown]:
    """Gitea's latest status per context from listed statuses, whatever order they came in.

    Gitea's ids grow with every status, so the highest id of a context is its latest; without
    ids the first listed wins (we ask for newest first). Empty states and contexts are skipped.
    """
    best: dict[str, tuple[tuple[int, int], Shown]] = {}
    for position, item in enumerate(items):
        if not item.state or not item.context:
            continue
        rank = (item.id, -position)
        current = best.get(item.context)
        if current is None or rank > current[0]:
            best[item.context] = (rank, item)
    return {context: item for context, (_, item) in best.items()}


def latest_per_context(items: Iterable[ListedStatus]) -> dict[str, Fields]:
    """What Gitea shows per context: the latest status's (state, description, target_url)."""
    return {context: (item.state, item.description, item.target_url)
            for context, item in latest_by_context(items).items()}
