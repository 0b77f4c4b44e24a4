"""The Events decision: repeats aggregate into one series, and no flood can cost an object more
API writes than its budget (hypothesis over arrivals, objects, reasons and writer wake-ups)."""

from __future__ import annotations

import itertools
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.flux.event_book import EventBook, EventNote, EventWrite, event_body
from receiver.flux.objects import ObjectKey

OBJECTS = [ObjectKey("Receiver", "flux-system", n) for n in ("a", "b", "c")]
REASONS = [("Normal", "PushAccepted"), ("Warning", "PushMatchedNothing"),
           ("Warning", "TokenUnusable")]


def note(obj: int, reason: int, message: str = "m") -> EventNote:
    type_, name = REASONS[reason]
    return EventNote(OBJECTS[obj], "notification.toolkit.fluxcd.io/v1", type_,  # type: ignore[arg-type]
                     name, message)


arrivals = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2),
                              st.floats(0, 20, allow_nan=False), st.booleans()),
                    min_size=1, max_size=300)


@settings(max_examples=200, deadline=None)
@given(arrivals)
def test_writes_stay_within_each_objects_budget_and_nothing_recorded_is_lost(
        steps: list[tuple[int, int, float, bool]]) -> None:
    book = EventBook(patch_interval=5.0, series_window=1e9, burst=4, refill_seconds=30.0)
    now, writes = 0.0, list[tuple[float, EventWrite]]()
    recorded: dict[tuple[ObjectKey, str, str], int] = defaultdict(int)
    for obj, reason, step, wake in steps:
        now += step
        book.record(note(obj, reason, f"at {now}"), now)
        recorded[note(obj, reason).series_key] += 1
        if wake:  # the writer runs whenever it is woken; not after every record
            writes += [(now, w) for w in book.due(now)]
    end = now
    while book.next_due(now) is not None:  # time passes; the writer drains the book
        now += 30.0
        writes += [(now, w) for w in book.due(now)]

    per_object: dict[ObjectKey, list[float]] = defaultdict(list)
    series: dict[str, list[tuple[float, EventWrite]]] = defaultdict(list)
    for at, w in writes:
        per_object[w.note.regarding].append(at)
        series[w.name].append((at, w))
    for times in per_object.values():
        # A token bucket: at most `burst` at once, then one per `refill_seconds`.
        for i, start in enumerate(times):
            in_window = [t for t in times[i:] if t - start <= 60.0]
            assert len(in_window) <= 4 + 60.0 / 30.0
    last_counts = {}
    for _name, ws in series.items():
        assert ws[0][1].op == "create" and all(w.op == "patch" for _, w in ws[1:])
        counts = [w.count for _, w in ws]
        assert counts == sorted(counts) and len(set(counts)) == len(counts)
        assert all(b - a >= 5.0 for (a, _), (b, _) in itertools.pairwise(ws))
        last_counts[ws[0][1].note.series_key] = counts[-1]
    # Every occurrence is counted on the one Event of its series, in the end.
    assert last_counts == dict(recorded)
    assert end <= now


def test_a_flood_of_a_thousand_pushes_is_one_event_and_a_few_patches() -> None:
    book = EventBook(patch_interval=30.0)
    writes: list[EventWrite] = []
    for i in range(1000):  # one push every 60 ms for a minute, the writer woken by each
        now = i * 0.06
        book.record(note(0, 1, f"push {i}"), now)
        writes += book.due(now)
    writes += book.due(1000.0)
    # Created at once, patched at 30 s, and once more when the writer next runs.
    assert [w.op for w in writes] == ["create", "patch", "patch"]
    assert writes[-1].count == 1000 and writes[-1].note.message == "push 999"


def test_the_event_body_is_a_core_v1_event_and_a_repeat_patches_its_count() -> None:
    book = EventBook(patch_interval=0.0)
    book.record(note(0, 0, "first"), 1_700_000_000.0)
    (create,) = book.due(1_700_000_000.0)
    body = event_body(create, "pod-1")
    assert body["involvedObject"] == {"apiVersion": "notification.toolkit.fluxcd.io/v1",
                                      "kind": "Receiver", "name": "a",
                                      "namespace": "flux-system"}
    assert (body["type"], body["reason"], body["count"]) == ("Normal", "PushAccepted", 1)
    assert body["reportingComponent"] == "gitea-flux-bridge"
    assert body["metadata"] == {"name": create.name, "namespace": "flux-system"}
    book.record(note(0, 0, "second"), 1_700_000_005.0)
    (patch,) = book.due(1_700_000_005.0)
    assert patch.name == create.name
    assert event_body(patch, "pod-1") == {"count": 2, "lastTimestamp": "2023-11-14T22:13:25Z",
                                          "message": "second"}


def test_an_object_over_budget_is_asked_for_when_its_next_token_is_back() -> None:
    book = EventBook(patch_interval=0.0, burst=2, refill_seconds=60.0)
    for reason in range(3):  # three series on one object, a budget of two
        book.record(note(0, reason), 100.0)
    assert len(book.due(100.0)) == 2
    # The writer sleeps until the bucket holds a token again, not in a poll loop.
    assert book.next_due(100.0) == 60.0
    assert book.due(159.0) == []
    (late,) = book.due(160.0)
    assert late.op == "create" and late.note.reason == REASONS[2][1]
    assert book.next_due(160.0) is None


def test_idle_series_and_full_buckets_are_forgotten_so_the_book_stays_small() -> None:
    book = EventBook(patch_interval=1.0, series_window=600.0, burst=10, refill_seconds=60.0)
    many = [ObjectKey("GitRepository", "apps", f"repo-{i}") for i in range(500)]
    for i, key in enumerate(many):
        book.record(EventNote(key, "source.toolkit.fluxcd.io/v1", "Normal",
                              "ReconcileRequested", "m"), float(i))
        assert len(book.due(float(i))) == 1
    book.record(note(0, 0), 700.0)  # a fresh series keeps what is not idle
    assert len(book.due(700.0)) == 1
    assert len(book) == 500 - 100 + 1  # series last seen more than 600 s before 700 are gone
    book.due(1200.0)
    assert len(book) == 1 and len(book._buckets) == 1  # full buckets went with them
    # A series forgotten and heard of again is a new Event.
    book.record(EventNote(many[0], "source.toolkit.fluxcd.io/v1", "Normal",
                          "ReconcileRequested", "again"), 1300.0)
    (again,) = book.due(1300.0)
    assert again.op == "create" and again.count == 1


def test_the_series_over_the_cap_are_dropped_oldest_first_and_counted() -> None:
    book = EventBook(max_series=2)
    for obj in range(3):
        book.record(note(obj, 0), 1.0)
    assert len(book) == 2 and book.dropped == 1
    assert [w.note.regarding for w in book.due(1.0)] == OBJECTS[1:]
