"""The pre-parse bounds: JSON nesting measured without parsing."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from receiver.bounds import json_depth_within

scalars = st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab,:')
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=4), inner,
                                           max_size=3), max_leaves=20)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


@given(documents, st.integers(min_value=0, max_value=8))
def test_depth_is_measured_as_the_parser_would_nest(doc: Any, limit: int) -> None:
    text = json.dumps(doc, ensure_ascii=False).encode()
    assert json_depth_within(text, limit) == (_depth(doc) <= limit)


def test_unbalanced_or_hostile_text_is_refused_or_left_to_the_parser() -> None:
    assert not json_depth_within(b"[" * 100_000, 64)
    assert not json_depth_within(b"[[[]]", 8)
    assert json_depth_within(b'["\\"[[[[", "]]]"]', 1)
    assert json_depth_within(b'"\\\\"' * 10_000, 0)
