"""Every signature scheme, directly and with hypothesis."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given, settings
from hypothesis import strategies as st

from receiver import signatures as sig

TOKEN = "s3cret-token"
BODY = b'{\n  "ref": "refs/heads/main"\n}'


def hexmac(algo: str, key: str, msg: bytes) -> str:
    return hmac.new(key.encode(), msg, getattr(hashlib, algo)).hexdigest()


def test_flux_digest_rule() -> None:
    # Flux: hex(sha256(token + name + namespace)), plain concatenation
    expected = hashlib.sha256(b"tokenwebappflux-system").hexdigest()
    assert sig.hook_digest("token", "webapp", "flux-system") == expected
    assert len(expected) == 64


def test_gitea_bare_hex_and_hub_header() -> None:
    good = hexmac("sha256", TOKEN, BODY)
    assert sig.verify_gitea({"x-gitea-signature": good}, BODY, TOKEN).ok
    assert sig.verify_gitea({"x-hub-signature-256": f"sha256={good}"}, BODY, TOKEN).ok
    assert sig.verify_gitea({"x-gitea-signature": good.upper()}, BODY, TOKEN).ok


def test_gitea_every_sha256_header_present_must_hold() -> None:
    # Flux reads X-Hub-Signature-256: a wrong one is refused whatever X-Gitea-Signature says,
    # and the other way round.
    good, bad = hexmac("sha256", TOKEN, BODY), hexmac("sha256", "other", BODY)
    both = {"x-gitea-signature": good, "x-hub-signature-256": f"sha256={good}"}
    assert sig.verify_gitea(both, BODY, TOKEN).ok
    wrong_hub = {**both, "x-hub-signature-256": f"sha256={bad}"}
    assert sig.verify_gitea(wrong_hub, BODY, TOKEN) == sig.Verdict(False, "hub-sha256", "mismatch")
    wrong_gitea = {**both, "x-gitea-signature": bad}
    assert not sig.verify_gitea(wrong_gitea, BODY, TOKEN).ok


def test_gitea_unsigned_webhook_headers_count_as_missing() -> None:
    # A Gitea webhook without a secret still sends the headers, empty or as bare prefixes.
    headers = {"x-gitea-signature": "", "x-hub-signature": "sha1=", "x-hub-signature-256": "sha256="}
    verdict = sig.verify_gitea(headers, BODY, TOKEN)
    assert not verdict.ok and verdict.reason == "missing"


def test_gitea_sha1_alone_is_refused() -> None:
    headers = {"x-hub-signature": "sha1=" + hexmac("sha1", TOKEN, BODY)}
    verdict = sig.verify_gitea(headers, BODY, TOKEN)
    assert not verdict.ok and verdict.reason == "sha1-refused"


def test_gitea_wrong_algorithm_prefix_is_refused() -> None:
    headers = {"x-hub-signature-256": "sha1=" + hexmac("sha256", TOKEN, BODY)}
    assert not sig.verify_gitea(headers, BODY, TOKEN).ok


def test_generic_hmac_all_algorithms() -> None:
    for algo in ("sha1", "sha256", "sha512"):
        header = {"x-signature": f"{algo}={hexmac(algo, TOKEN, BODY)}"}
        assert sig.verify_generic_hmac(header, BODY, TOKEN).ok, algo
    assert sig.verify_generic_hmac({"x-signature": "md5=abcd"}, BODY, TOKEN).reason == "malformed"
    assert sig.verify_generic_hmac({}, BODY, TOKEN).reason == "missing"


def test_timestamped_window_and_shape() -> None:
    now = 1_800_000_000
    header = sig.sign_timestamped(TOKEN, BODY, now)
    verdict = sig.verify_timestamped(header, BODY, TOKEN, now + 10)
    assert verdict.ok and verdict.replay_key and verdict.replay_until > now + 300
    assert sig.verify_timestamped(header, BODY, TOKEN, now + 301).reason == "stale"
    assert sig.verify_timestamped(header, BODY, TOKEN, now - 301).reason == "stale"
    assert sig.verify_timestamped(header, BODY + b" ", TOKEN, now).reason == "mismatch"
    assert sig.verify_timestamped("v1=abc", BODY, TOKEN, now).reason == "malformed"
    # the timestamp is inside the signed message: changing it breaks the signature
    forged = header.replace(f"t={now}", f"t={now + 1}")
    assert sig.verify_timestamped(forged, BODY, TOKEN, now).reason == "mismatch"


def test_timestamped_accepts_one_of_several_signatures_for_rotation() -> None:
    now = 1_800_000_000
    good = sig.sign_timestamped(TOKEN, BODY, now)
    rotated = f"t={now},v1={'0' * 64},{good.split(',')[1]}"
    assert sig.verify_timestamped(rotated, BODY, TOKEN, now).ok


def test_generic_requires_auth_unless_insecure() -> None:
    assert not sig.verify_generic({}, BODY, TOKEN, 0, allow_unsigned=False).ok
    assert sig.verify_generic({}, BODY, TOKEN, 0, allow_unsigned=True).ok
    bearer = {"authorization": f"Bearer {TOKEN}"}
    assert sig.verify_generic(bearer, BODY, TOKEN, 0, allow_unsigned=False).ok
    assert not sig.verify_generic({"authorization": "Bearer nope"}, BODY, TOKEN, 0,
                                  allow_unsigned=False).ok
    assert not sig.verify_generic({"authorization": f"Basic {TOKEN}"}, BODY, TOKEN, 0,
                                  allow_unsigned=False).ok


@given(token=st.text(min_size=1, max_size=40), body=st.binary(max_size=512),
       algo=st.sampled_from(["sha1", "sha256", "sha512"]))
def test_generic_hmac_roundtrip_and_any_bit_flip_fails(token: str, body: bytes, algo: str) -> None:
    good = f"{algo}={sig.hmac_hex(algo, token, body)}"
    assert sig.verify_generic_hmac({"x-signature": good}, body, token).ok
    assert not sig.verify_generic_hmac({"x-signature": good}, body + b"x", token).ok


@given(token=st.text(min_size=1, max_size=40), body=st.binary(max_size=512),
       now=st.integers(min_value=0, max_value=2**33), skew=st.integers(-300, 300))
def test_timestamped_roundtrip_within_window(token: str, body: bytes, now: int, skew: int) -> None:
    header = sig.sign_timestamped(token, body, now)
    assert sig.verify_timestamped(header, body, token, now + skew).ok


@given(value=st.text(max_size=200))
def test_header_parsers_never_raise(value: str) -> None:
    headers = {"x-signature": value, "x-gitea-signature": value, "x-hub-signature-256": value,
               "authorization": value}
    for verdict in (
        sig.verify_gitea(headers, BODY, TOKEN),
        sig.verify_generic_hmac(headers, BODY, TOKEN),
        sig.verify_generic(headers, BODY, TOKEN, 0, allow_unsigned=False),
    ):
        assert not verdict.ok


@given(name=st.text(min_size=1, max_size=30), ns=st.text(min_size=1, max_size=30),
       token=st.text(max_size=30))
def test_digest_is_64_lowercase_hex(name: str, ns: str, token: str) -> None:
    digest = sig.hook_digest(token, name, ns)
    assert len(digest) == 64 and digest == digest.lower()
    assert digest == hashlib.sha256((token + name + ns).encode()).hexdigest()


def test_event_signature_is_sha256_only() -> None:
    good = {"x-signature": "sha256=" + hexmac("sha256", TOKEN, BODY)}
    assert sig.verify_event(good, BODY, TOKEN).ok
    weak = {"x-signature": "sha1=" + hexmac("sha1", TOKEN, BODY)}
    assert not sig.verify_event(weak, BODY, TOKEN).ok


# -- one credential, one use ----------------------------------------------

_ids = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=40)
_times = st.integers(min_value=0, max_value=10**12 - 1)


def _push_verdicts(value: str, body: bytes, token: str, now: int) -> list[sig.Verdict]:
    """`value` presented as every push credential the bridge takes, over `body`."""
    _, _, v1 = value.rpartition("v1=")
    headers = {"x-signature": value, "x-gitea-signature": v1, "x-hub-signature-256": "sha256=" + v1}
    return [
        sig.verify_timestamped(value, body, token, now),
        sig.verify_generic(headers, body, token, now, allow_unsigned=False),
        sig.verify_gitea(headers, body, token),
        sig.verify_generic_hmac({"x-signature": "sha256=" + v1}, body, token),
        sig.verify_event({"x-signature": "sha256=" + v1}, body, token),
    ]


@settings(deadline=None, max_examples=300)
@given(token=st.text(max_size=40), delivery=_ids, now=_times, body=st.binary(max_size=200))
def test_a_read_credential_is_never_a_push_credential(token: str, delivery: str, now: int,
                                                      body: bytes) -> None:
    read = sig.sign_read(token, delivery, now)
    assert sig.verify_read(read, delivery, token, now).ok
    # Every body a replay could carry, including the empty one (the finding: `"<t>."`) and
    # the read's own text.
    for candidate in (body, b"", sig.read_message(now, delivery), f"{now}.".encode()):
        assert not any(v.ok for v in _push_verdicts(read, candidate, token, now)), candidate


@settings(deadline=None, max_examples=300)
@given(token=st.text(max_size=40), delivery=_ids, now=_times, body=st.binary(max_size=200))
def test_a_push_credential_is_never_a_read_credential(token: str, delivery: str, now: int,
                                                      body: bytes) -> None:
    pushes = [
        sig.sign_timestamped(token, body, now),
        sig.sign_timestamped(token, b"", now),  # what notify-flux used to send on every poll
        sig.sign_timestamped(token, f"GET /deliveries/{delivery}".encode(), now),
        f"t={now},v1={sig.hmac_hex('sha256', token, body)}",
        f"t={now},v1={sig.hmac_hex('sha256', token, sig.read_message(now, delivery))}",
    ]
    for value in pushes:
        assert not sig.verify_read(value, delivery, token, now).ok


def test_a_read_is_bound_to_its_delivery_time_and_token() -> None:
    now = 1_800_000_000
    read = sig.sign_read(TOKEN, "d-1", now)
    assert sig.verify_read(read, "d-1", TOKEN, now + 300).ok
    assert sig.verify_read(read, "d-2", TOKEN, now).reason == "mismatch"
    assert sig.verify_read(read, "d-1", TOKEN + "x", now).reason == "mismatch"
    assert sig.verify_read(read, "d-1", TOKEN, now + 301).reason == "stale"
    assert sig.verify_read("v1=abc", "d-1", TOKEN, now).reason == "malformed"


def test_a_read_signature_is_documented_arithmetic() -> None:
    # What notify.sh computes in bash: the read key is the hex text of HMAC(token, label).
    key = hexmac("sha256", TOKEN, b"gitea-flux-bridge delivery-read v1")
    mac = hexmac("sha256", key, b"1800000000.GET /deliveries/d-1")
    assert sig.sign_read(TOKEN, "d-1", 1_800_000_000) == f"t=1800000000,v1={mac}"


def test_non_ascii_digits_in_the_timestamp_are_malformed_not_a_crash() -> None:
    for t in ("\u00b2", "\u0663", "1\u00b2", "\uff11"):  # superscript, Arabic-Indic, fullwidth
        value = f"t={t},v1={'0' * 64}"
        assert sig.parse_timestamped(value) is None
        assert sig.verify_timestamped(value, BODY, TOKEN, 0).reason == "malformed"
        assert sig.verify_read(value, "d", TOKEN, 0).reason == "malformed"


@given(st.lists(st.binary(max_size=300), max_size=6), st.sampled_from(["sha1", "sha256", "sha512"]),
       st.integers(0, 2_000_000_000))
def test_a_body_in_chunks_verifies_as_the_same_bytes_joined(
        chunks: list[bytes], algorithm: str, timestamp: int) -> None:
    """A large body is verified in the chunks it arrived in: every scheme reaches the same
    verdict as over the joined bytes, signed with the token or not."""
    body = b"".join(chunks)
    parts = tuple(chunks)
    assert sig.hmac_hex(algorithm, "k", parts) == sig.hmac_hex(algorithm, "k", body)
    for key in ("k", "other"):
        signed = {"x-signature": f"{algorithm}={sig.hmac_hex(algorithm, key, body)}",
                  "x-gitea-signature": sig.hmac_hex("sha256", key, body)}
        assert sig.verify_generic_hmac(signed, parts, "k") == sig.verify_generic_hmac(
            signed, body, "k")
        assert sig.verify_gitea(signed, parts, "k") == sig.verify_gitea(signed, body, "k")
        stamped = sig.sign_timestamped(key, body, timestamp)
        assert sig.verify_timestamped(stamped, parts, "k", timestamp) == sig.verify_timestamped(
            stamped, body, "k", timestamp)
