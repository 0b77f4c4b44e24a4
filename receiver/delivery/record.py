"""A delivery's record, carried in its own signed id. Pure.

Any replica can answer `GET /deliveries/{id}` without having seen the push: the id holds what
the push asked for (Receiver, commit, ref, time received, the targets and their roles, and the
mark the bridge wrote on the objects it annotated), signed with a key derived from the
Receiver's token so nobody without the token can forge or alter one.

The id is URL-safe (itsdangerous' base64 alphabet plus '.'), compressed when that is shorter,
and kept under `MAX_ID_LENGTH` so it fits in a request line behind common proxies: targets that
do not fit are counted in `omitted`, never silently dropped.

Anyone may send an id, so reading one costs little before its signature holds: an id longer
than the bound is refused unread; the Receiver it claims is read from the first
`_HEAD_BYTES` of the payload (decompressed that far and no further, matched by a pattern,
never parsed as JSON); the signature is checked on the payload as sent (compressed); only
then is it decompressed, to at most `MAX_PAYLOAD_BYTES`, its nesting checked and parsed.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadData, Signer, URLSafeSerializer
from itsdangerous.encoding import base64_decode, base64_encode, want_bytes

from receiver.bounds import json_depth_within, parse_json
from receiver.flux.objects import ObjectKey

ROLE_ANNOTATE = "annotate"
ROLE_TRACK = "track"
_ROLE_CODES = {ROLE_ANNOTATE: "a", ROLE_TRACK: "t"}
_ROLES = {v: k for k, v in _ROLE_CODES.items()}
_VERSION = 1
_SALT = "gitea-flux-bridge/delivery-id/v1"
# nginx's default large_client_header_buffers is 8 KiB for the whole request line.
MAX_ID_LENGTH = 6000
# The decoded payload (JSON) of an id: `encode` keeps every id within it, so an id that
# decompresses past it was not made here. A payload is a list of lists of strings (depth 3).
MAX_PAYLOAD_BYTES = 64 * 1024
_MAX_DEPTH = 3
# Enough of the payload to read `[1,"<namespace>/<name>",`: a namespace is at most 63
# characters and a name 253; JSON escapes never occur in them.
_HEAD_BYTES = 400
_HEAD = re.compile(rb'\[1,"([^"\\\x00-\x1f]{1,320})",')
# A record's time in milliseconds: from 1970 to the end of year 9999, as `time.gmtime` takes.
_MAX_RECEIVED_MS = 253_402_300_799_999
_MAX_OMITTED = 10**9

# `json.dumps(..., separators=(",", ":"))`, with one encoder for every call (`json.dumps`
# builds a new one for any argument but the defaults).
_COMPACT = json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class RecordTarget:
    key: ObjectKey
    role: str


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    receiver: str  # namespace/name of the Receiver
    sha: str  # "" when the push named no commit
    ref: str
    received: float  # unix seconds, millisecond precision
    mark: str  # what the bridge writes on the objects it annotates for this delivery
    targets: tuple[RecordTarget, ...]
    omitted: int = 0  # targets that did not fit in the id


class _KeyedSigner(Signer):
    """itsdangerous' signer with its derived key computed once: the stock one derives it again
    (one more HMAC) for every id it signs or checks. Same key, same ids."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._derived: dict[bytes, bytes] = {}

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        raw = self.secret_keys[-1] if secret_key is None else want_bytes(secret_key)
        key = self._derived.get(raw)
        if key is None:
            key = self._derived[raw] = super().derive_key(raw)
        return key


class _IdSerializer(URLSafeSerializer):
    """Compresses only payloads long enough to gain from it: a typical push's few targets do
    not, and trying zlib on every id was a measurable share of the hook path. One signer per
    serializer (the stock one builds a signer, and derives its key, per id)."""

    @functools.cached_property
    def _signer(self) -> Signer:
        return _KeyedSigner(self.secret_keys, salt=self.salt, **self.signer_kwargs)

    def make_signer(self, salt: str | bytes | None = None) -> Signer:
        return self._signer if salt is None or salt == self.salt else super().make_signer(salt)

    def dump_payload(self, obj: Any) -> bytes:
        raw = _COMPACT(obj).encode()
        if len(raw) < _COMPRESS_FROM:
            return base64_encode(raw)
        return super().dump_payload(obj)


_COMPRESS_FROM = 512


@functools.lru_cache(maxsize=1024)
def _signing_key(token: str) -> bytes:
    """The key the serializer's signer derives (django-concat), for `_sign_short`."""
    signer = _serializer(token).make_signer()
    return signer.derive_key()


def _sign_short(raw: bytes, token: str) -> str:
    """What `_serializer(token).dumps` makes of a payload whose JSON is `raw`, when that is too
    short to compress: its base64, a dot, and the base64 of its HMAC-SHA1 with the derived key
    (itsdangerous' format, computed here without its per-call layers; the same ids)."""
    value = base64_encode(raw)
    signature = base64_encode(hmac.digest(_signing_key(token), value, "sha1"))  # one C call
    return (value + b"." + signature).decode()


@functools.lru_cache(maxsize=1024)
def _serializer(token: str) -> URLSafeSerializer:
    # A key of its own: the id's signature must never double as any other credential. Cached:
    # a Receiver's pushes all sign with the same key (a rotated token is simply a new entry).
    key = hmac.new(token.encode(), b"gitea-flux-bridge delivery id", hashlib.sha256).digest()
    return _IdSerializer(key, salt=_SALT)


def _payload(record: DeliveryRecord, targets: tuple[RecordTarget, ...], omitted: int) -> list[Any]:
    return [
        _VERSION, record.receiver, record.sha, record.ref, round(record.received * 1000),
        record.mark, omitted,
        [[t.key.kind, t.key.namespace, t.key.name, _ROLE_CODES[t.role]] for t in targets],
    ]


def encode(record: DeliveryRecord, token: str) -> tuple[str, DeliveryRecord]:
    """The signed id, and the record it really carries (targets beyond the length bound are
    dropped from the end of the list, which is in annotation order, and counted)."""
    serializer = _serializer(token)
    targets = record.targets
    omitted = record.omitted
    while True:
        payload = _payload(record, targets, omitted)
        raw = _COMPACT(payload).encode()
        size = len(raw)
        if size < _COMPRESS_FROM:
            token_id = _sign_short(raw, token)
        else:
            token_id = serializer.dumps(payload) if size <= MAX_PAYLOAD_BYTES else ""
        if (token_id and len(token_id) <= MAX_ID_LENGTH) or not targets:
            break
        # Cut what is left over the bound: a few encodes at most, even for huge fleets.
        over = max(len(token_id) / MAX_ID_LENGTH, size / MAX_PAYLOAD_BYTES)
        keep = max(0, int(len(targets) / over) - 1)
        omitted += len(targets) - keep
        targets = targets[:keep]
    carried = DeliveryRecord(record.receiver, record.sha, record.ref, record.received,
                             record.mark, targets, omitted)
    return token_id, carried


def receiver_of(delivery_id: str) -> str | None:
    """The Receiver an id claims, read without checking the signature (to find the key): from
    the payload's first bytes only, so a hostile id costs next to nothing."""
    parts = _parts(delivery_id)
    if parts is None:
        return None
    compressed, data = parts
    if compressed:
        try:
            data = zlib.decompressobj().decompress(data, _HEAD_BYTES)
        except zlib.error:
            return None
    found = _HEAD.match(data)
    if found is None or b"/" not in found[1]:
        return None
    return found[1].decode("utf-8", "replace")


def decode(delivery_id: str, token: str) -> DeliveryRecord | None:
    """The record, if the id is well formed and signed with this Receiver's token. The
    signature is checked before anything is decompressed or parsed."""
    if _parts(delivery_id) is None:
        return None
    try:
        signed = _serializer(token).make_signer().unsign(delivery_id)
    except BadData:
        return None
    return _record(_load(signed))


def _parts(delivery_id: str) -> tuple[bool, bytes] | None:
    """(compressed, payload bytes) of an id of the right length and alphabet, else None."""
    if len(delivery_id) > MAX_ID_LENGTH + 64 or not delivery_id.isascii():
        return None
    value, dot, _signature = delivery_id.rpartition(".")
    if not dot or not value:
        return None
    compressed = value.startswith(".")
    try:
        return compressed, base64_decode(value[1:] if compressed else value)
    except BadData:
        return None


def _load(signed: bytes) -> Any:
    """Decompress (bounded) and parse a signed payload; None if it is not one of ours."""
    compressed = signed.startswith(b".")
    try:
        data = base64_decode(signed[1:] if compressed else signed)
        if compressed:
            inflater = zlib.decompressobj()
            data = inflater.decompress(data, MAX_PAYLOAD_BYTES + 1)
            if len(data) > MAX_PAYLOAD_BYTES or not inflater.eof:
                return None
        if len(data) > MAX_PAYLOAD_BYTES or not json_depth_within(data, _MAX_DEPTH):
            return None
        return parse_json(data)
    except (BadData, zlib.error, ValueError, RecursionError):
        return None


def _record(payload: Any) -> DeliveryRecord | None:
    """Shape-check a decoded payload; anything unexpected is not a record."""
    if not isinstance(payload, list) or len(payload) != 8 or payload[0] != _VERSION:
        return None
    _, receiver, sha, ref, received_ms, mark, omitted, raw_targets = payload
    if not (isinstance(receiver, str) and "/" in receiver and isinstance(sha, str)
            and isinstance(ref, str) and _whole(received_ms, _MAX_RECEIVED_MS)
            and isinstance(mark, str) and _whole(omitted, _MAX_OMITTED)
            and isinstance(raw_targets, list)):
        return None
    targets: list[RecordTarget] = []
    for item in raw_targets:
        if not (isinstance(item, list) and len(item) == 4
                and all(isinstance(part, str) for part in item) and item[3] in _ROLES):
            return None
        targets.append(RecordTarget(ObjectKey(item[0], item[1], item[2]), _ROLES[item[3]]))
    return DeliveryRecord(receiver, sha, ref, received_ms / 1000, mark, tuple(targets), omitted)


def _whole(value: Any, most: int) -> bool:
    """A JSON integer from 0 to `most` (a bool is an int in Python, not here)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most
