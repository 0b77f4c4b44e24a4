"""The one bounded map: at most `max_entries`, the least recently set go first."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver.bounded import BoundedMap


def test_the_least_recently_set_go_first() -> None:
    m: BoundedMap[str, int] = BoundedMap(2)
    m["a"], m["b"] = 1, 2
    m["a"] = 3  # set again: now the newest
    m["c"] = 4
    assert dict(m) == {"a": 3, "c": 4}
    assert m.oldest() == ("a", 3)
    del m["a"]
    assert m.oldest() == ("c", 4) and len(m) == 1
    with pytest.raises(ValueError):
        BoundedMap(0)


@given(st.lists(st.tuples(st.integers(0, 30), st.integers()), max_size=200),
       st.integers(1, 10))
def test_never_past_the_bound_and_keeps_the_newest(writes: list[tuple[int, int]],
                                                   bound: int) -> None:
    m: BoundedMap[int, int] = BoundedMap(bound)
    for key, value in writes:
        m[key] = value
        assert len(m) <= bound and m[key] == value
    recent: list[int] = []
    for key, _ in reversed(writes):
        if key not in recent:
            recent.append(key)
    assert set(m) == set(recent[:bound])
