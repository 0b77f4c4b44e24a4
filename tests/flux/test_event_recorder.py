"""The Events writer: a new Event is written at once, and repeats are patched on the interval
of the book it was given."""

from __future__ import annotations

import pytest

from receiver.flux.event_book import EventBook, EventNote, EventWrite
from receiver.flux.objects import ObjectKey
from receiver.flux.recorder import EventRecorder
from tests.conftest import until

pytestmark = pytest.mark.anyio

SOURCE = ObjectKey("GitRepository", "apps", "podinfo")


def requested(message: str) -> EventNote:
    return EventNote(SOURCE, "source.toolkit.fluxcd.io/v1", "Normal", "ReconcileRequested",
                     message)


def recorder_on(book: EventBook) -> tuple[EventRecorder, list[EventWrite]]:
    """A recorder on `book` whose writes land in the list returned with it."""
    writes: list[EventWrite] = []

    async def write(w: EventWrite) -> None:
        writes.append(w)

    return EventRecorder(write, book), writes


async def test_repeats_are_patched_on_the_interval_of_the_book_given() -> None:
    # Empty, so falsy: it must still be the book used (not a default one, patched at 30 s).
    recorder, writes = recorder_on(EventBook(patch_interval=0.5))
    await recorder.start()
    try:
        recorder.emit(requested("push 0"))
        await until(lambda: writes, what="the create")
        for i in range(1, 200):
            recorder.emit(requested(f"push {i}"))
        assert writes[0].op == "create" and len(writes) == 1
        (patch,) = await until(lambda: writes[1:], what="the patch after the interval")
        assert (patch.op, patch.count, patch.note.message) == ("patch", 200, "push 199")
        assert patch.name == writes[0].name
        # A new series still wakes it at once.
        recorder.emit(EventNote(SOURCE, "source.toolkit.fluxcd.io/v1", "Warning",
                                "PushMatchedNothing", "nothing"))
        (warning,) = await until(lambda: writes[2:], what="the new Event")
        assert warning.op == "create" and warning.note.reason == "PushMatchedNothing"
    finally:
        await recorder.stop()


class CountingBook(EventBook):
    """Counts how often the writer woke to ask what is due."""

    asked = 0

    def due(self, now: float) -> list[EventWrite]:
        self.asked += 1
        return super().due(now)


async def test_a_repeat_whose_patch_is_pending_does_not_wake_the_writer() -> None:
    """Most pushes repeat a series the writer already has a timer for: they must cost it no
    wake-up (one per push was a task and a timer each, on every push's path)."""
    book = CountingBook(patch_interval=30.0)
    recorder, writes = recorder_on(book)
    await recorder.start()
    try:
        recorder.emit(requested("push 0"))
        await until(lambda: writes, what="the create")
        await until(lambda: recorder._wake_at > 0, what="the writer asleep on its timer")
        asked = book.asked
        for i in range(1, 500):
            recorder.emit(requested(f"push {i}"))
        # A new series in between still wakes it, once; the repeats after it do not.
        recorder.emit(EventNote(SOURCE, "source.toolkit.fluxcd.io/v1", "Warning",
                                "PushMatchedNothing", "nothing"))
        await until(lambda: writes[1:], what="the new series' Event")
        await until(lambda: recorder._wake_at > 0, what="the writer asleep again")
        assert book.asked == asked + 1
        for i in range(500, 1000):
            recorder.emit(requested(f"push {i}"))
        assert book.asked == asked + 1 and len(writes) == 2
    finally:
        await recorder.stop()
