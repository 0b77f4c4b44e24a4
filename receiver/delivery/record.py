"""A delivery's record, carried in its own signed id. Pure.

Any replica can answer `GET /deliveries/{id}` without having seen the push: the id holds what
the push asked for (Receiver, commit, ref, time received, the targets and their roles, and the
mark the bridge wrote on the objects it annotated), signed with a key derived from the
Receiver's token so nobody without the token can forge or alter one.

The id is URL-safe (itsdangerous' base64 alphabet plus '.'), compressed when that is shorter,
and kept under `MAX_ID_LENGTH` so it fits in a request line behind common proxies: targets that
do not fit are counted in `omitted`, never silently dropped.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadData, Signer, URLSafeSerializer
from itsdangerous.encoding import base64_encode, want_bytes

from receiver.flux.objects import ObjectKey

ROLE_ANNOTATE = "annotate"
ROLE_TRACK = "track"
_ROLE_CODES = {ROLE_ANNOTATE: "a", ROLE_TRACK: "t"}
_ROLES = {v: k for k, v in _ROLE_CODES.items()}
_VERSION = 1
_SALT = "gitea-flux-bridge/delivery-id/v1"
# nginx's default large_client_header_buffers is 8 KiB for the whole request line.
MAX_ID_LENGTH = 6000


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
        raw = json.dumps(obj, separators=(",", ":")).encode()
        if len(raw) < _COMPRESS_FROM:
            return base64_encode(raw)
        return super().dump_payload(obj)


_COMPRESS_FROM = 512


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
        token_id = serializer.dumps(_payload(record, targets, omitted))
        if len(token_id) <= MAX_ID_LENGTH or not targets:
            break
        # Halve what is left over the bound: a few encodes at most, even for huge fleets.
        keep = max(0, len(targets) * MAX_ID_LENGTH // len(token_id) - 1)
        omitted += len(targets) - keep
        targets = targets[:keep]
    carried = DeliveryRecord(record.receiver, record.sha, record.ref, record.received,
                             record.mark, targets, omitted)
    return token_id, carried


def receiver_of(delivery_id: str) -> str | None:
    """The Receiver an id claims, read without checking the signature (to find the key)."""
    payload = _unverified(delivery_id)
    return payload[1] if payload is not None else None


def decode(delivery_id: str, token: str) -> DeliveryRecord | None:
    """The record, if the id is well formed and signed with this Receiver's token."""
    try:
        payload = _serializer(token).loads(delivery_id)
    except (BadData, ValueError, TypeError, RecursionError):
        return None
    return _record(payload)


def _unverified(delivery_id: str) -> list[Any] | None:
    if len(delivery_id) > MAX_ID_LENGTH + 64 or "." not in delivery_id:
        return None
    try:
        _valid, payload = URLSafeSerializer(b"-").loads_unsafe(delivery_id)
    except (BadData, ValueError, TypeError, RecursionError):
        return None
    record = _record(payload)
    return payload if record is not None else None


def _record(payload: Any) -> DeliveryRecord | None:
    """Shape-check a decoded payload; anything unexpected is not a record."""
    if not isinstance(payload, list) or len(payload) != 8 or payload[0] != _VERSION:
        return None
    _, receiver, sha, ref, received_ms, mark, omitted, raw_targets = payload
    if not (isinstance(receiver, str) and "/" in receiver and isinstance(sha, str)
            and isinstance(ref, str) and isinstance(received_ms, int)
            and isinstance(mark, str) and isinstance(omitted, int)
            and isinstance(raw_targets, list)):
        return None
    targets: list[RecordTarget] = []
    for item in raw_targets:
        if not (isinstance(item, list) and len(item) == 4
                and all(isinstance(part, str) for part in item) and item[3] in _ROLES):
            return None
        targets.append(RecordTarget(ObjectKey(item[0], item[1], item[2]), _ROLES[item[3]]))
    return DeliveryRecord(receiver, sha, ref, received_ms / 1000, mark, tuple(targets), omitted)
