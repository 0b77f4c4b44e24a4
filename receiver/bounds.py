"""Cheap checks that bound what an input may cost before it is parsed or trusted. Pure.

Each runs in time linear in its input, in C (regular expressions without backtracking and
bytes methods), so a hostile input costs no more to check than to read.
"""

from __future__ import annotations

import gc
import json
import re
from typing import Any

_ESCAPE = re.compile(rb"\\.", re.DOTALL)
# With escapes gone, a string is a quote, anything but a quote, a quote: no backtracking.
_STRING = re.compile(rb'"[^"]*"')
_INNERMOST = re.compile(rb"\[\]|\{\}")
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_within(text: bytes, limit: int) -> bool:
    """Do the arrays and objects of this JSON text nest at most `limit` deep (and balance)?

    Not a validator: text that is not JSON may pass, and is then refused by the parser. Each
    of the `limit` passes removes the innermost empty pairs; whatever is left nests deeper."""
    brackets = _STRING.sub(b"", _ESCAPE.sub(b"", text)).translate(None, _NOT_BRACKET)
    for _ in range(limit):
        if not brackets:
            return True
        brackets = _INNERMOST.sub(b"", brackets)
    return not brackets


def parse_json(text: bytes | str) -> Any:
    """`json.loads` with the cyclic garbage collector paused: parsing a body of a million small
    arrays allocates a million containers, and the collections that triggers made up most of
    its cost (0.23 of 0.27 s for 3 MiB). A parse makes no cycles, so nothing is missed: what it
    built is looked at by the next collection. Raises what `json.loads` raises."""
    if not gc.isenabled():
        return json.loads(text)
    gc.disable()
    try:
        return json.loads(text)
    finally:
        gc.enable()
