"""A Receiver's `spec.resourceFilter`: compiled once, evaluated per resource. Pure.

Flux's semantics (notification-controller `receiver_resource_filter.go` over fluxcd/pkg
`runtime/cel`), kept here:

* the expression is compiled with the type checker, over two variables of type
  `google.protobuf.Struct` (maps of string to anything): `res` and `req`; its output type must be
  exactly `bool` (an expression whose type is only known at run time, such as
  `res.metadata.name`, is refused too). A Receiver whose filter does not compile is unusable;
* `res` is the resource's `PartialObjectMetadata` as JSON: `apiVersion`, `kind`, `metadata`;
* `req` is the request body decoded as a JSON object when the request's Content-Type is
  `application/json`, otherwise `{}`; a JSON body that does not decode into an object is an
  error of the request;
* an evaluation error (a missing key, a bad regular expression) counts for that resource only.

The library is cel-expr-python (the CEL C++ runtime, maintained by the CEL authors): it type
checks as cel-go does and bounds comprehensions with an iteration budget. It has no budget for
the size of the values an expression builds (a chain of `replace` builds 10^8 characters) nor
for converting `req` (0.4 s for a 3 MiB body), so the bridge evaluates filters in a process of
its own, within a time and a memory budget (`cel_sandbox`, `cel_worker`). A body is at most
`body_limit_bytes` long, and `req` is converted once per request where it can be: every resource
of a request is evaluated in one call (`<resources>.map(res, <expression>)`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from receiver.bounds import parse_json

# What every filter sees; the list variable only exists for the batched evaluation.
_BATCH = "gfb_resources"
_MAX_EXPRESSION = 16_384  # a Receiver's filter longer than this is refused, not compiled


class InvalidFilter(ValueError):
    """The expression does not parse, type check or return a bool: the Receiver is unusable."""


class RequestNotJSON(ValueError):
    """A JSON request body that does not decode into an object (Flux answers 500; the bridge 400)."""


@functools.cache
def _runtime() -> tuple[Any, Any]:
    """The CEL module and the filters' environment, loaded when a filter is first compiled.

    Importing the runtime adds about 15 MB to the process, and most fleets have no filter: the
    types and errors above stay importable without it."""
    from cel_expr_python import cel  # type: ignore[import-untyped]
    from cel_expr_python.ext import (  # type: ignore[import-untyped]
        ext_encoders,
        ext_optional,
        ext_strings,
    )

    struct = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
    # Flux enables cel-go's strings, encoders and optional-types extensions; the same here
    # (cel-go's sets extension has no counterpart in this library).
    env = cel.NewEnv(
        variables={"res": struct, "req": struct, _BATCH: cel.Type.List(cel.Type.DYN)},
        extensions=[ext_strings.ExtStrings(), ext_encoders.ExtEncoders(),
                    ext_optional.ExtOptional()],
    )
    return cel, env


@dataclass(frozen=True, slots=True)
class CompiledFilter:
    expression: str
    _single: Any
    _batch: Any | None

    def evaluate(self, resources: Sequence[Mapping[str, Any]],
                 req: Mapping[str, Any]) -> list[bool | str]:
        """For each resource: True/False, or why it could not be evaluated."""
        if not resources:
            return []
        cel = _runtime()[0]
        if self._batch is not None:
            try:
                value = self._batch.eval(data={"res": {}, "req": req, _BATCH: list(resources)})
            except RuntimeError:  # e.g. the iteration budget: said per resource below
                value = None
            if value is not None and value.type() != cel.Type.ERROR:
                out = value.plain_value()
                if isinstance(out, list) and len(out) == len(resources) and all(
                        isinstance(v, bool) for v in out):
                    return list(out)
        # One resource failed (or the batch could not be used): one at a time, to say which.
        return [self._one(res, req) for res in resources]

    def _one(self, res: Mapping[str, Any], req: Mapping[str, Any]) -> bool | str:
        try:
            value = self._single.eval(data={"res": res, "req": req})
        except RuntimeError as exc:  # e.g. the iteration budget
            return _short(str(exc))
        cel = _runtime()[0]
        if value.type() == cel.Type.BOOL:
            return bool(value.value())
        return _short(str(value.value()) if value.type() == cel.Type.ERROR
                      else f"result is {value.type().name()}, not bool")


def _short(message: str) -> str:
    return message if len(message) <= 200 else message[:197] + "..."


def compile_filter(expression: str) -> CompiledFilter:
    """Compile and type check; InvalidFilter says why (never with request data in it)."""
    if len(expression) > _MAX_EXPRESSION:
        raise InvalidFilter(f"expression longer than {_MAX_EXPRESSION} characters")
    cel, env = _runtime()
    try:
        single = env.compile(expression)
    except RuntimeError as exc:
        raise InvalidFilter(_short(str(exc))) from None
    kind = single.return_type()
    if kind != cel.Type.BOOL:
        raise InvalidFilter(f"output type mismatch: expected bool, got {kind.name().lower()}")
    try:
        # A newline before the closing parentheses ends a trailing `//` comment.
        batch = env.compile(f"{_BATCH}.map(res, (\n{expression}\n))")
    except RuntimeError:
        batch = None
    return CompiledFilter(expression, single, batch)


def is_json_content(content_type: str) -> bool:
    """Flux's `isJSONContent`: any of the comma-separated media types is application/json."""
    for part in content_type.split(","):
        media = part.split(";", 1)[0].strip().lower()
        if not media or "/" not in media:
            break  # Go's mime.ParseMediaType fails here, and Flux stops looking
        if media == "application/json":
            return True
    return False


def request_document(content_type: str, body: bytes) -> dict[str, Any]:
    """`req` as Flux builds it: the JSON object for a JSON request, else `{}`."""
    if not is_json_content(content_type):
        return {}
    try:
        value = parse_json(body)
    except (ValueError, RecursionError):
        raise RequestNotJSON("request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise RequestNotJSON("request body is not a JSON object")
    return value


def resource_document(api_version: str, kind: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """`res` as Flux builds it: the object's PartialObjectMetadata as JSON."""
    return {"apiVersion": api_version, "kind": kind, "metadata": dict(metadata)}


class FilterCache:
    """Compiled filters by Receiver, recompiled when the Receiver's resourceVersion changes."""

    def __init__(self, limit: int = 10_000) -> None:
        self._by_key: dict[Any, tuple[tuple[str, str], CompiledFilter | InvalidFilter]] = {}
        self._limit = limit

    def get(self, key: Any, resource_version: str,
            expression: str) -> CompiledFilter | InvalidFilter:
        stamp = (resource_version, expression)
        cached = self._by_key.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            result: CompiledFilter | InvalidFilter = compile_filter(expression)
        except InvalidFilter as exc:
            result = exc
        if len(self._by_key) >= self._limit:
            self._by_key.clear()
        self._by_key[key] = (stamp, result)
        return result

    def forget(self, key: Any) -> None:
        self._by_key.pop(key, None)

    def invalid(self) -> dict[Any, str]:
        return {k: str(v) for k, (_, v) in self._by_key.items() if isinstance(v, InvalidFilter)}
