"""Delivery ids carry their own record, signed with a key derived from the Receiver's token."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from receiver.delivery import marks as dm
from receiver.delivery import record as dr
from receiver.delivery.record import ROLE_ANNOTATE, ROLE_TRACK, DeliveryRecord, RecordTarget
from receiver.flux.objects import ObjectKey

TOKEN = "receiver-token"
SRC = RecordTarget(ObjectKey("GitRepository", "flux-system", "fleet"), ROLE_ANNOTATE)
APPS = RecordTarget(ObjectKey("Kustomization", "flux-system", "apps"), ROLE_ANNOTATE)
CANARY = RecordTarget(ObjectKey("HelmRelease", "apps", "canary"), ROLE_TRACK)


def record(*targets: RecordTarget, sha: str = "a" * 40) -> DeliveryRecord:
    return DeliveryRecord("flux-system/gitea", sha, "refs/heads/main", 1_760_000_000.123,
                          dm.mark_for("flux-system/gitea", "gitea:abc"), targets or (SRC, APPS))


def test_round_trip_through_the_id() -> None:
    original = record(SRC, APPS, CANARY)
    delivery_id, carried = dr.encode(original, TOKEN)
    assert carried == original
    assert dr.receiver_of(delivery_id) == "flux-system/gitea"
    assert dr.decode(delivery_id, TOKEN) == original


def test_id_is_url_safe_and_short_for_a_typical_push() -> None:
    delivery_id, _ = dr.encode(record(SRC, APPS, CANARY), TOKEN)
    allowed = set(string.ascii_letters + string.digits + "-_.")
    assert set(delivery_id) <= allowed
    assert len(delivery_id) < 400


def test_another_token_or_any_change_is_refused() -> None:
    delivery_id, _ = dr.encode(record(), TOKEN)
    assert dr.decode(delivery_id, "other-token") is None
    for i in range(len(delivery_id)):
        flipped = "A" if delivery_id[i] != "A" else "B"
        assert dr.decode(delivery_id[:i] + flipped + delivery_id[i + 1:], TOKEN) is None


def test_a_huge_fleet_is_cut_to_fit_and_counted() -> None:
    many = tuple(RecordTarget(ObjectKey("Kustomization", f"team-{i % 97}", f"app-{i}-{i * 7919}"),
                              ROLE_TRACK) for i in range(5000))
    delivery_id, carried = dr.encode(record(SRC, *many), TOKEN)
    assert len(delivery_id) <= dr.MAX_ID_LENGTH
    assert carried.omitted == 5001 - len(carried.targets) > 0
    assert carried.targets[0] == SRC  # annotation order: sources first, they stay
    decoded = dr.decode(delivery_id, TOKEN)
    assert decoded == carried


def test_marks_are_per_receiver_and_per_request() -> None:
    a = dm.mark_for("flux-system/gitea", "gitea:1")
    assert a == dm.mark_for("flux-system/gitea", "gitea:1")
    assert a != dm.mark_for("flux-system/other", "gitea:1")
    assert a != dm.mark_for("flux-system/gitea", "gitea:2")
    assert len(a) == 16 and set(a) <= set("0123456789abcdef")


@given(st.text(max_size=300))
def test_anything_else_is_not_an_id(text: str) -> None:
    assert dr.decode(text, TOKEN) is None
    claimed = dr.receiver_of(text)
    assert claimed is None or isinstance(claimed, str)


names = st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=20)


@given(st.lists(st.tuples(st.sampled_from(["GitRepository", "Kustomization", "HelmRelease"]),
                          names, names, st.sampled_from([ROLE_ANNOTATE, ROLE_TRACK])),
                max_size=30),
       st.text(max_size=80), st.floats(min_value=0, max_value=4e9))
def test_any_record_round_trips(targets: list[tuple[str, str, str, str]], ref: str,
                                received: float) -> None:
    original = DeliveryRecord("ns/recv", "", ref, round(received, 3), "0123456789abcdef",
                              tuple(RecordTarget(ObjectKey(k, n, m), r) for k, n, m, r in targets))
    delivery_id, carried = dr.encode(original, TOKEN)
    assert carried == original
    assert dr.decode(delivery_id, TOKEN) == original


@given(st.lists(st.tuples(st.sampled_from(["GitRepository", "Kustomization", "HelmRelease"]),
                          names, names, st.sampled_from([ROLE_ANNOTATE, ROLE_TRACK])),
                max_size=12),
       st.text(max_size=40), st.sampled_from(["", "b" * 40]), st.sampled_from([TOKEN, "other"]))
def test_ids_are_the_ones_itsdangerous_signs(targets: list[tuple[str, str, str, str]], ref: str,
                                             sha: str, token: str) -> None:
    """Short ids are signed without itsdangerous' layers: still its format, byte for byte, so
    replicas of earlier releases read them and this one reads theirs."""
    original = DeliveryRecord("ns/recv", sha, ref, 1_760_000_000.5, "0123456789abcdef",
                              tuple(RecordTarget(ObjectKey(k, n, m), r) for k, n, m, r in targets))
    delivery_id, carried = dr.encode(original, token)
    payload = dr._payload(carried, carried.targets, carried.omitted)
    assert delivery_id == dr._serializer(token).dumps(payload)
