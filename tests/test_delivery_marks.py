"""The bridge's delivery marks on objects: bounded, newest first, tolerant of hand edits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from receiver import delivery_marks as dm
from receiver.delivery_marks import DELIVERIES_ANNOTATION, Mark

A, B, C = "a" * 16, "b" * 16, "c" * 16


def test_new_marks_come_first_and_old_ones_age_out() -> None:
    current = {DELIVERIES_ANNOTATION: f"{B}@100.000 {C}@10.000"}
    value = dm.merged(current, [Mark(A, 200.0)], now=200.0, keep_seconds=150.0)
    assert value == f"{A}@200.000 {B}@100.000"
    assert dm.has({DELIVERIES_ANNOTATION: value}, A)
    assert not dm.has({DELIVERIES_ANNOTATION: value}, C)


def test_a_mark_is_never_written_twice() -> None:
    current = {DELIVERIES_ANNOTATION: f"{A}@100.000"}
    assert dm.merged(current, [Mark(A, 150.0)], now=150.0, keep_seconds=1e9) == f"{A}@150.000"


def test_hand_edited_values_are_ignored_not_fatal() -> None:
    assert dm.parse("junk nomark@1 zzzzzzzzzzzzzzzz@1 " + f"{A}@nan {B}@x {C}@5") == (Mark(C, 5.0),)
    assert dm.parse(None) == ()


def test_newer_than_ignores_our_own_mark() -> None:
    ann = {DELIVERIES_ANNOTATION: f"{A}@300.000 {B}@100.000"}
    assert dm.newer_than(ann, 200.0, mine=B)
    assert not dm.newer_than(ann, 200.0, mine=A)
    assert not dm.newer_than(ann, 300.0, mine=B)


marks = st.builds(Mark, st.text(alphabet="0123456789abcdef", min_size=16, max_size=16),
                  st.floats(min_value=0, max_value=1e6).map(lambda f: round(f, 3)))


@given(st.lists(marks, max_size=60), st.lists(marks, min_size=1, max_size=5))
def test_bounded_and_keeps_every_new_mark(existing: list[Mark], new: list[Mark]) -> None:
    current = {DELIVERIES_ANNOTATION: " ".join(f"{m.mark}@{m.at:.3f}" for m in existing)}
    value = dm.merged(current, new, now=1e6, keep_seconds=1e7)
    parsed = dm.parse(value)
    assert len(parsed) <= dm.MAX_ENTRIES
    assert len({m.mark for m in parsed}) == len(parsed)
    assert {m.mark for m in new} <= {m.mark for m in parsed}


def test_has_follows_the_value_it_is_given_when_values_are_parsed_once() -> None:
    first = dm.merged({}, [Mark("a" * 16, 10.0)], 10.0, 60)
    second = dm.merged({DELIVERIES_ANNOTATION: first}, [Mark("b" * 16, 11.0)], 11.0, 60)
    for _ in range(2):  # the second pass is answered from the parse cache
        assert dm.has({DELIVERIES_ANNOTATION: first}, "a" * 16)
        assert not dm.has({DELIVERIES_ANNOTATION: first}, "b" * 16)
        assert dm.has({DELIVERIES_ANNOTATION: second}, "b" * 16)
        assert dm.has({DELIVERIES_ANNOTATION: second}, "a" * 16)
    assert not dm.has({}, "a" * 16)
    assert not dm.has({DELIVERIES_ANNOTATION: ""}, "a" * 16)
    assert dm.parse(first) is dm.parse(first)
