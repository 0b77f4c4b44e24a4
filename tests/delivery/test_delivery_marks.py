"""The bridge's delivery marks on objects: newest first, never evicted within the replay
window, bounded by refusing, tolerant of hand edits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from receiver.delivery import marks as dm
from receiver.delivery.marks import DELIVERIES_ANNOTATION, Mark

A, B, C = "a" * 16, "b" * 16, "c" * 16


def merged(current: dict[str, str], new: list[Mark], now: float, keep_seconds: float) -> str:
    return dm.merge(current, new, now, keep_seconds).value


def test_new_marks_come_first_and_old_ones_age_out() -> None:
    current = {DELIVERIES_ANNOTATION: f"{B}@100.000 {C}@10.000"}
    value = merged(current, [Mark(A, 200.0)], now=200.0, keep_seconds=150.0)
    assert value == f"{A}@200.000 {B}@100.000"
    assert dm.has({DELIVERIES_ANNOTATION: value}, A)
    assert not dm.has({DELIVERIES_ANNOTATION: value}, C)


def test_a_mark_is_never_written_twice() -> None:
    current = {DELIVERIES_ANNOTATION: f"{A}@100.000"}
    assert merged(current, [Mark(A, 150.0)], now=150.0, keep_seconds=1e9) == f"{A}@100.000"


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
def test_keeps_every_mark_within_the_window_and_every_new_one(existing: list[Mark],
                                                              new: list[Mark]) -> None:
    current = {DELIVERIES_ANNOTATION: " ".join(f"{m.mark}@{m.at:.3f}" for m in existing)}
    merge = dm.merge(current, new, now=1e6, keep_seconds=1e7)
    parsed = dm.parse(merge.value)
    assert len({m.mark for m in parsed}) == len(parsed)
    assert {m.mark for m in existing} | {m.mark for m in new} == {m.mark for m in parsed}
    assert not merge.refused
    assert [m.at for m in parsed] == sorted((m.at for m in parsed), reverse=True)


def _value(entries: list[Mark]) -> dict[str, str]:
    return {DELIVERIES_ANNOTATION: " ".join(f"{m.mark}@{m.at:.3f}" for m in entries)}


def test_a_flood_from_another_receiver_never_evicts_a_mark_within_the_window() -> None:
    victim = Mark(dm.mark_for("apps/actions", "sig:captured"), 1000.0)
    value = _value([victim])
    flood_owner = "flux-system/other"
    for n in range(dm.PER_OWNER + 40):  # the flooder's whole share, and more
        merge = dm.merge(value, [Mark(dm.mark_for(flood_owner, f"sig:{n}"), 1001.0 + n)],
                         now=1001.0 + n, keep_seconds=3600)
        value = {DELIVERIES_ANNOTATION: merge.value}
        assert dm.has(value, victim.mark), n
    # The flooder filled only its own share: its further marks are refused, not written...
    assert len(merge.refused) == 1 and not merge.written
    assert len(dm.of(value)) == dm.PER_OWNER + 1
    # ...while another Receiver's push still gets its mark.
    other = Mark(dm.mark_for("apps/gitea", "gitea:1"), 2000.0)
    assert dm.merge(value, [other], now=2000.0, keep_seconds=3600).written == (other,)


def test_the_object_bound_refuses_instead_of_evicting() -> None:
    owners = [f"ns/r{n}" for n in range(dm.MAX_ENTRIES // dm.PER_OWNER)]
    full = [Mark(dm.mark_for(o, f"k{n}"), 10.0 + n) for o in owners for n in range(dm.PER_OWNER)]
    late = Mark(dm.mark_for("ns/late", "k"), 99_999.0)
    merge = dm.merge(_value(full), [late], now=100_000.0, keep_seconds=1e6)
    assert merge.refused == (late,) and not merge.written
    assert "delivery_dedupe_seconds" in dm.refusal(3600)
    # Once marks leave the window, there is room again.
    assert dm.merge(_value(full), [late], now=1e7, keep_seconds=1e6).written == (late,)


def test_marks_name_their_receiver_and_replays_of_one_request_share_one() -> None:
    a = dm.mark_for("flux-system/gitea", "gitea:1")
    assert a == dm.mark_for("flux-system/gitea", "gitea:1")
    assert dm.owner(a) == dm.owner_of("flux-system/gitea") == dm.owner(
        dm.fresh_mark("flux-system/gitea"))
    assert dm.owner(a) != dm.owner(dm.mark_for("apps/actions", "gitea:1"))
    assert len(a) == 16 and set(a) <= set("0123456789abcdef")
    assert dm.legacy_mark_for("flux-system/gitea", "gitea:1") != a


def test_has_follows_the_value_it_is_given_when_values_are_parsed_once() -> None:
    first = merged({}, [Mark("a" * 16, 10.0)], 10.0, 60)
    second = merged({DELIVERIES_ANNOTATION: first}, [Mark("b" * 16, 11.0)], 11.0, 60)
    for _ in range(2):  # the second pass is answered from the parse cache
        assert dm.has({DELIVERIES_ANNOTATION: first}, "a" * 16)
        assert not dm.has({DELIVERIES_ANNOTATION: first}, "b" * 16)
        assert dm.has({DELIVERIES_ANNOTATION: second}, "b" * 16)
        assert dm.has({DELIVERIES_ANNOTATION: second}, "a" * 16)
    assert not dm.has({}, "a" * 16)
    assert not dm.has({DELIVERIES_ANNOTATION: ""}, "a" * 16)
    assert dm.parse(first) == dm.parse(first)
    assert dm.names(first) is dm.names(first)  # parsed once: the same set each time


def test_merge_writes_kept_marks_as_it_formats_new_ones() -> None:
    """A hand-edited entry comes out in the one format, and the order is newest first."""
    hand = f"{'a' * 16}@10 {'b' * 16}@12.5 junk {'c' * 16}@11.0004"
    out = merged({DELIVERIES_ANNOTATION: hand}, [Mark("d" * 16, 11.5)], 12.0, 60)
    assert out == (f"{'b' * 16}@12.500 {'d' * 16}@11.500 {'c' * 16}@11.000 "
                   f"{'a' * 16}@10.000")
    assert [m.mark for m in dm.parse(out)] == ["b" * 16, "d" * 16, "c" * 16, "a" * 16]


def test_marks_outlive_every_repeat_that_is_refused() -> None:
    from receiver.signatures import TIMESTAMP_TOLERANCE_SECONDS

    assert dm.replay_window(3600) == 3600
    assert dm.replay_window(10) == 2 * TIMESTAMP_TOLERANCE_SECONDS


# -- a value written here is merged without reading it again -----------------------------------

owners = st.sampled_from(["aaaa", "bbbb", "cccc"])
own_marks = st.builds(lambda o, rest, at: Mark(o + rest, at), owners,
                      st.text(alphabet="0123456789abcdef", min_size=12, max_size=12),
                      st.floats(min_value=0, max_value=1000, allow_nan=False))


@given(st.lists(st.lists(own_marks, max_size=6), min_size=1, max_size=25),
       st.floats(min_value=1, max_value=400), st.integers(min_value=0, max_value=3))
def test_merging_a_value_written_here_equals_reading_it_again(
        batches: list[list[Mark]], keep: float, bound_shift: int) -> None:
    """Patch after patch, the quick merge of a value this process wrote gives exactly what
    reading and writing every entry again gives (value, written, refused); small bounds make
    refusals and marks leaving the window happen."""
    import receiver.delivery.marks as marks_module

    original = (marks_module.PER_OWNER, marks_module.MAX_ENTRIES)
    marks_module.PER_OWNER, marks_module.MAX_ENTRIES = 3 + bound_shift, 7 + bound_shift
    try:
        value = ""
        now = 0.0
        for batch in batches:
            now = max([now, *(m.at for m in batch)])
            current = {DELIVERIES_ANNOTATION: value}
            ordered = sorted(batch, key=lambda m: -m.at)
            expected = marks_module._merge_any(current, ordered, now, keep)
            got = dm.merge(current, batch, now, keep)
            assert (got.value, got.written, got.refused) == (
                expected.value, expected.written, expected.refused)
            value = got.value
    finally:
        marks_module.PER_OWNER, marks_module.MAX_ENTRIES = original


@given(st.lists(st.lists(own_marks, max_size=6), min_size=1, max_size=25),
       st.floats(min_value=1, max_value=400), st.lists(own_marks, max_size=4),
       st.floats(min_value=0, max_value=1000))
def test_a_value_written_here_answers_as_reading_every_entry_would(
        batches: list[list[Mark]], keep: float, strangers: list[Mark], at: float) -> None:
    """The questions every push asks of a busy object's marks (is mine there, did a later
    delivery annotate it, which marks did this change add) are answered from the text of a
    value written here; the answers equal those of reading every entry, patch after patch."""
    before, now = "", 0.0
    for batch in batches:
        now = max([now, *(m.at for m in batch)])
        after = dm.merge({DELIVERIES_ANNOTATION: before}, batch, now, keep).value
        entries = dm.parse(after)
        for probe in [*batch, *strangers, *entries]:
            assert dm.has({DELIVERIES_ANNOTATION: after}, probe.mark) == (
                probe.mark in {m.mark for m in entries})
            assert dm.newer_than({DELIVERIES_ANNOTATION: after}, at, probe.mark) == any(
                m.at > at and m.mark != probe.mark for m in entries)
        assert dm.added(before, after) == (
            {m.mark for m in entries} - {m.mark for m in dm.parse(before)})
        before = after


def test_a_hand_edited_value_is_read_entry_by_entry() -> None:
    """A value this process did not write may be in any order, with junk: its answers come
    from reading it whole, not from its text."""
    hand = f"{A}@10 junk {B}@30.5 {C}@20"
    assert dm.has({DELIVERIES_ANNOTATION: hand}, B)
    assert not dm.has({DELIVERIES_ANNOTATION: "junk" + A + "@5"}, A)
    assert dm.newer_than({DELIVERIES_ANNOTATION: hand}, 25.0, A)  # B, though not in front
    assert not dm.newer_than({DELIVERIES_ANNOTATION: hand}, 30.5, A)
    assert dm.added(hand, f"{C}@40.000 " + hand) == frozenset()
    assert dm.added(f"{A}@10", hand) == {B, C}
