"""Every request-signature scheme the bridge accepts. Pure: no I/O, no clock of its own.

One function per Receiver type, in the spirit of notification-controller's handlers: each takes
the request headers, the bytes the sender signed and the Receiver's token, and returns a
`Verdict`. Comparisons are constant-time (`hmac.compare_digest`); a verdict never says *why*
a signature failed beyond a short internal reason that is logged, never sent to the client.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

TIMESTAMP_TOLERANCE_SECONDS = 300
# `t=<unix>,v1=<hex>`: a few candidates during a rotation; a longer value is malformed, unread.
MAX_TIMESTAMPED_LENGTH = 1024
MAX_TIMESTAMPED_CANDIDATES = 8

_HASHES = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}
_HEX_LENGTHS = {"sha1": 40, "sha256": 64, "sha512": 128}


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    scheme: str
    # Why it failed, for logs and metrics only ("missing", "mismatch", "stale", ...).
    reason: str = ""
    # For one-time signatures: the value the caller must remember until `replay_until`.
    replay_key: str = ""
    replay_until: float = 0.0


def hook_digest(token: str, name: str, namespace: str) -> str:
    """Flux's webhook path digest: hex(sha256(token + name + namespace)), no separators."""
    return hashlib.sha256((token + name + namespace).encode()).hexdigest()


# What a signature covers: the bytes, or the chunks they arrived in (a large body is verified
# chunk by chunk: joining 3 MiB costs the event loop more than hashing it costs the verifier).
Signed = bytes | tuple[bytes, ...]


def hmac_hex(algorithm: str, key: str | bytes, message: Signed) -> str:
    key_bytes = key.encode() if isinstance(key, str) else key
    if isinstance(message, bytes):
        return hmac.new(key_bytes, message, _HASHES[algorithm]).hexdigest()
    mac = hmac.new(key_bytes, None, _HASHES[algorithm])
    for part in message:
        mac.update(part)
    return mac.hexdigest()


def _after(prefix: bytes, message: Signed) -> Signed:
    """`prefix + message`, without joining a chunked message."""
    return prefix + message if isinstance(message, bytes) else (prefix, *message)


def _equal_hex(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.strip().lower().encode("ascii", "replace"))


def _split_prefixed(value: str) -> tuple[str, str]:
    """'sha256=abc' -> ('sha256', 'abc'); a value without '=' has no algorithm."""
    algorithm, sep, digest = value.strip().partition("=")
    return (algorithm.strip().lower(), digest.strip()) if sep else ("", value.strip())


def verify_gitea(headers: Mapping[str, str], signed: Signed, token: str) -> Verdict:
    """A Gitea (or GitHub-style) webhook: `X-Gitea-Signature` and/or `X-Hub-Signature-256`.

    `signed` is the JSON document Gitea signed: the raw body for the JSON content type, the
    decoded `payload` field for the form content type. Every SHA-256 signature the request
    carries must hold: Flux reads `X-Hub-Signature-256`, so a request whose header there is
    wrong is refused whatever `X-Gitea-Signature` says (Gitea always sends both alike). Gitea
    sends the headers even for a webhook without a secret, empty or as a bare `sha256=`: that
    counts as unsigned. The SHA-1 `X-Hub-Signature` alone is refused.
    """
    expected = hmac_hex("sha256", token, signed)
    checked: list[tuple[str, bool]] = []
    gitea = headers.get("x-gitea-signature", "").strip()
    if gitea:
        checked.append(("gitea-sha256", _equal_hex(expected, gitea)))
    algorithm, digest = _split_prefixed(headers.get("x-hub-signature-256", ""))
    if digest:
        checked.append(("hub-sha256", algorithm == "sha256" and _equal_hex(expected, digest)))
    if checked:
        # Both compared (constant time each) before deciding; the scheme named is the first
        # that failed, else the one Flux reads.
        failed = [scheme for scheme, ok in checked if not ok]
        if failed:
            return Verdict(False, failed[0], "mismatch")
        return Verdict(True, checked[-1][0])
    if headers.get("x-hub-signature", "").partition("=")[2].strip():
        return Verdict(False, "hub-sha1", "sha1-refused")
    return Verdict(False, "gitea-sha256", "missing")


def verify_generic_hmac(headers: Mapping[str, str], body: Signed, token: str) -> Verdict:
    """Flux `generic-hmac`: `X-Signature: sha1|sha256|sha512=<hex>` over the raw body."""
    algorithm, digest = _split_prefixed(headers.get("x-signature", ""))
    if not digest:
        return Verdict(False, "x-signature", "missing")
    if algorithm not in _HASHES or len(digest) != _HEX_LENGTHS[algorithm]:
        return Verdict(False, "x-signature", "malformed")
    ok = _equal_hex(hmac_hex(algorithm, token, body), digest)
    return Verdict(ok, f"x-signature-{algorithm}", "" if ok else "mismatch")


def parse_timestamped(value: str) -> tuple[int, list[str]] | None:
    """`t=<unix>,v1=<hex>[,v1=<hex>...]` -> (t, [hex, ...]); None if it is not that shape."""
    if len(value) > MAX_TIMESTAMPED_LENGTH:
        return None
    timestamp: int | None = None
    signatures: list[str] = []
    for part in value.split(","):
        key, sep, item = part.strip().partition("=")
        if not sep:
            return None
        if key == "t":
            # ASCII digits only: `"²".isdigit()` is true and `int("²")` raises.
            if not (item.isascii() and item.isdigit()) or len(item) > 12 or timestamp is not None:
                return None
            timestamp = int(item)
        elif key == "v1":
            signatures.append(item.strip())
    if timestamp is None or not signatures or len(signatures) > MAX_TIMESTAMPED_CANDIDATES:
        return None
    return timestamp, signatures


def sign_timestamped(token: str, body: bytes, timestamp: int) -> str:
    """The header value a client sends: `t=<unix>,v1=<hex HMAC-SHA256 of "<unix>." + body>`.

    The documented push format, kept as it is for existing callers; reads sign differently
    (`sign_read`)."""
    return f"t={timestamp},v1={hmac_hex('sha256', token, str(timestamp).encode() + b'.' + body)}"


def verify_timestamped(value: str, body: Signed, token: str, now: float) -> Verdict:
    parsed = parse_timestamped(value)
    if parsed is None:
        return Verdict(False, "timestamped", "malformed")
    timestamp, signatures = parsed
    if abs(now - timestamp) > TIMESTAMP_TOLERANCE_SECONDS:
        return Verdict(False, "timestamped", "stale")
    expected = hmac_hex("sha256", token, _after(str(timestamp).encode() + b".", body))
    # Check every candidate (rotation) without stopping early.
    matched = [s for s in signatures if _equal_hex(expected, s)]
    if not matched:
        return Verdict(False, "timestamped", "mismatch")
    return Verdict(
        True,
        "timestamped",
        replay_key=f"{timestamp}:{expected}",
        replay_until=timestamp + TIMESTAMP_TOLERANCE_SECONDS + 1,
    )


# -- reading a delivery: a credential of its own -------------------------------------------
#
# A push signature is an HMAC under the token itself over bytes the sender chooses (a `github`
# or `generic-hmac` Receiver signs the bare body, a `generic` one `"<t>." + body`), so any
# string signed with the token is a push credential for some body. A read credential must
# never be one: it is an HMAC under a key *derived* from the token, over a text that names the
# method, the path and the time. Nothing signs with the derived key but a reader, and nothing
# verifies a push with it, so neither credential passes for the other, whatever the bytes.

READ_KEY_LABEL = b"gitea-flux-bridge delivery-read v1"


def read_key(token: str) -> str:
    """The delivery-read key: hex(HMAC-SHA256(token, READ_KEY_LABEL)), used as ASCII text."""
    return hmac_hex("sha256", token, READ_KEY_LABEL)


def read_message(timestamp: int, delivery_id: str) -> bytes:
    """What a read signature covers: `"<unix>.GET /deliveries/<id>"` (the id as decoded)."""
    return f"{timestamp}.GET /deliveries/{delivery_id}".encode("utf-8", "surrogatepass")


def sign_read(token: str, delivery_id: str, timestamp: int) -> str:
    """The `X-Signature` value of `GET /deliveries/<id>`: `t=<unix>,v1=<hex>`."""
    mac = hmac_hex("sha256", read_key(token), read_message(timestamp, delivery_id))
    return f"t={timestamp},v1={mac}"


def verify_read(value: str, delivery_id: str, token: str, now: float) -> Verdict:
    """A read signature for this delivery, within the window. Reusable within it (a read
    changes nothing), so no replay key."""
    parsed = parse_timestamped(value)
    if parsed is None:
        return Verdict(False, "read", "malformed")
    timestamp, given = parsed
    if abs(now - timestamp) > TIMESTAMP_TOLERANCE_SECONDS:
        return Verdict(False, "read", "stale")
    expected = hmac_hex("sha256", read_key(token), read_message(timestamp, delivery_id))
    ok = bool([s for s in given if _equal_hex(expected, s)])
    return Verdict(ok, "read", "" if ok else "mismatch")


def verify_bearer(headers: Mapping[str, str], token: str) -> Verdict:
    scheme, _, given = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return Verdict(False, "bearer", "missing")
    ok = hmac.compare_digest(given.strip().encode(), token.encode())
    return Verdict(ok, "bearer", "" if ok else "mismatch")


def verify_generic(
    headers: Mapping[str, str], body: Signed, token: str, now: float, *, allow_unsigned: bool
) -> Verdict:
    """Flux `generic`, hardened: a bearer token or the timestamped signature is required.

    Unauthenticated requests pass only when the operator turned on the insecure switch.
    """
    if headers.get("x-signature", "").strip():
        return verify_timestamped(headers["x-signature"], body, token, now)
    if headers.get("authorization", "").strip():
        return verify_bearer(headers, token)
    if allow_unsigned:
        return Verdict(True, "unsigned")
    return Verdict(False, "generic", "missing")


def verify_event(headers: Mapping[str, str], body: Signed, token: str) -> Verdict:
    """A Flux Provider of type `generic-hmac`: `X-Signature: sha256=<hex>` over the raw bytes.

    notification-controller only ever sends SHA-256, so nothing weaker is taken here."""
    algorithm, _ = _split_prefixed(headers.get("x-signature", ""))
    if algorithm and algorithm != "sha256":
        return Verdict(False, "event-signature", "malformed")
    return verify_generic_hmac(headers, body, token)
