"""A Flux event, as notification-controller forwards it to a `generic(-hmac)` Provider. Pure.

The body is Go's `json.Marshal` of fluxcd/pkg `eventv1.Event`. Everything is type-checked
before use: a body that is not JSON is an `EventError` 400, one without what a status needs
(the involved object, a reason) is 422. Metadata keys arrive unprefixed from
notification-controller >= 1.8 (it strips `<group>/` and `event.toolkit.fluxcd.io/`), and
prefixed from older ones; both are read, and the result is always unprefixed.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from receiver.flux.revisions import commit_of

EVENT_PREFIX = "event.toolkit.fluxcd.io/"
SEVERITIES = frozenset({"trace", "info", "error"})
# Internal keys notification-controller drops before forwarding; never keep them (the values
# may be secrets or are meaningless to us).
_DROPPED_KEYS = frozenset({"token", "checksum", "digest"})
# Bounds on what an event may carry. A metadata key is `[<DNS prefix>/]<name>`: a prefix is a
# DNS subdomain (at most 253 characters) and an annotation name at most 63, so no key Flux
# sends is longer; longer keys and over-long values are ignored, never parsed.
MAX_KEY_PREFIX = 253
MAX_KEY_NAME = 63
MAX_METADATA_VALUE = 8192
# A message only feeds a 140-character description: keep far more than that, never megabytes.
MAX_MESSAGE = 32 * 1024
_DNS_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-")
_ALNUM = frozenset(string.ascii_lowercase + string.digits)
# Lone UTF-16 surrogates: JSON may carry them (`"\ud800"`), UTF-8 cannot. Linear to replace.
_SURROGATE = re.compile("[\ud800-\udfff]")


class EventError(ValueError):
    """The body is not a usable Flux event; `status` is the HTTP answer (400 or 422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class InvolvedObject:
    kind: str
    namespace: str
    name: str
    api_version: str = ""
    uid: str = ""

    @property
    def group(self) -> str:
        return self.api_version.rsplit("/", 1)[0] if "/" in self.api_version else ""


@dataclass(frozen=True, slots=True)
class FluxEvent:
    involved: InvolvedObject
    severity: str
    reason: str
    message: str = ""
    timestamp: str = ""
    reporting_controller: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def revision(self) -> str:
        """The revision Flux's `Event.GetRevision` returns: commit > originRevision > revision."""
        for key in ("commit", "originRevision", "revision"):
            value = self.metadata.get(key, "")
            if value:
                return value
        return ""

    @property
    def commit(self) -> str | None:
        """The full commit id the event names, if any (first key in GetRevision order that has one).

        A HelmRelease's `revision` is a chart version, which names no commit by itself.
        """
        for key in ("commit", "originRevision", "revision"):
            found = commit_of(self.metadata.get(key, ""))
            if found:
                return found
        return None


def clean_text(value: str) -> str:
    """`value` with every lone surrogate replaced by U+FFFD, so it can always be encoded."""
    return _SURROGATE.sub("\ufffd", value)


def _text(value: Any) -> str:
    return clean_text(value.strip()) if isinstance(value, str) else ""


def split_prefixed(key: str) -> tuple[str, str] | None:
    """`<group>/<name>` -> (`<group>/`, `<name>`); None when `key` has no API-group prefix.

    A prefix is lower-case DNS characters, starts with a letter or digit and holds a dot that
    follows a letter or digit and is not its last character (`kustomize.toolkit.fluxcd.io`).
    One pass over the key, whatever it holds (a backtracking pattern here was quadratic).
    """
    prefix, sep, name = key.partition("/")
    if not sep or not name or "/" in name or len(prefix) < 3:
        return None
    if prefix[0] not in _ALNUM or not set(prefix) <= _DNS_CHARS:
        return None
    dotted = any(
        prefix[i] == "." and prefix[i - 1] in _ALNUM for i in range(1, len(prefix) - 1))
    return (prefix + "/", name) if dotted else None


def normalise_metadata(raw: Mapping[str, Any], group: str) -> dict[str, str]:
    """Unprefixed keys; when several spellings of a key arrive, the strongest one wins.

    Precedence mirrors notification-controller's combineEventMetadata: an unprefixed key (already
    combined by NC >= 1.8) > the controller's own `<group>/key` > `event.toolkit.fluxcd.io/key`
    (object annotations) > any other `<group>/key`.

    Keys longer than a prefix and an annotation name allow, and values longer than
    `MAX_METADATA_VALUE`, are ignored: Flux never sends them.
    """
    ranked: dict[str, tuple[int, str]] = {}
    for raw_key, raw_value in raw.items():
        if not isinstance(raw_key, str) or not isinstance(raw_value, str):
            continue
        if len(raw_key) > MAX_KEY_PREFIX + 1 + MAX_KEY_NAME or len(raw_value) > MAX_METADATA_VALUE:
            continue
        split = split_prefixed(raw_key)
        if split is None:
            key, rank = raw_key, 3
        else:
            prefix, key = split
            if len(prefix) > MAX_KEY_PREFIX + 1:
                continue
            rank = 2 if group and prefix == group + "/" else 1 if prefix == EVENT_PREFIX else 0
        if len(key) > MAX_KEY_NAME or key in _DROPPED_KEYS:
            continue
        if key not in ranked or rank > ranked[key][0]:
            ranked[key] = (rank, clean_text(raw_value.strip()))
    return {key: value for key, (_, value) in ranked.items()}


def parse_event(body: bytes) -> FluxEvent:
    """Raw request bytes -> FluxEvent, or EventError (400 unreadable, 422 incomplete)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise EventError(400, "body is not valid JSON") from None
    except RecursionError:
        raise EventError(400, "body is nested too deeply") from None
    if not isinstance(doc, dict):
        raise EventError(422, "event must be a JSON object")
    involved_raw = doc.get("involvedObject")
    if not isinstance(involved_raw, dict):
        raise EventError(422, "event has no involvedObject")
    involved = InvolvedObject(
        kind=_text(involved_raw.get("kind")),
        namespace=_text(involved_raw.get("namespace")),
        name=_text(involved_raw.get("name")),
        api_version=_text(involved_raw.get("apiVersion")),
        uid=_text(involved_raw.get("uid")),
    )
    missing = [k for k in ("kind", "namespace", "name") if not getattr(involved, k)]
    if missing:
        raise EventError(422, "involvedObject lacks " + ", ".join(missing))
    reason = _text(doc.get("reason"))
    if not reason:
        raise EventError(422, "event has no reason")
    severity = _text(doc.get("severity")).lower()
    if severity not in SEVERITIES:
        raise EventError(422, "severity must be one of info, error, trace")
    metadata_raw = doc.get("metadata")
    if metadata_raw is not None and not isinstance(metadata_raw, dict):
        raise EventError(422, "metadata must be an object of strings")
    message = doc.get("message")
    return FluxEvent(
        involved=involved,
        severity=severity,
        reason=reason,
        message=clean_text(message[:MAX_MESSAGE]) if isinstance(message, str) else "",
        timestamp=_text(doc.get("timestamp")),
        reporting_controller=_text(doc.get("reportingController")),
        metadata=normalise_metadata(metadata_raw or {}, involved.group),
    )
