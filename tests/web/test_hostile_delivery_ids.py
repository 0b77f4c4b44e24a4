"""`GET /deliveries/{id}` is open to anyone: an id costs little before its signature holds.

A compressed payload is not inflated, let alone parsed, before the signature is checked; the
Receiver it claims is read from its first bytes only; a signed one inflates to a bounded size."""

from __future__ import annotations

import logging
import tracemalloc
import zlib
from typing import Any

import pytest
from itsdangerous.encoding import base64_decode, base64_encode

from receiver.delivery import record as dr
from tests.conftest import GITEA_TOKEN, Bridge
from tests.loopprobe import probing

RECEIVER = "flux-system/gitea"


def _payload_id(raw: bytes, *, token: str | None = None) -> str:
    """An id whose payload is `raw` compressed; signed with `token`, else a made-up signature."""
    packed = "." + base64_encode(zlib.compress(raw, 9)).decode()
    if token is None:
        return packed + "." + "A" * 43
    signer = dr._serializer(token).make_signer()
    return signer.sign(packed).decode()


def _bomb(token: str | None = None) -> str:
    """The largest id under the length bound that inflates to millions of empty lists."""
    best = ""
    for count in (2 ** n for n in range(10, 30)):
        raw = b'[1,"' + RECEIVER.encode() + b'","","",0,"",0,[' + b"[]," * count + b"[]]]"
        candidate = _payload_id(raw, token=token)
        if len(candidate) > dr.MAX_ID_LENGTH:
            return best
        best = candidate
    return best


def test_a_bomb_id_costs_no_memory_signed_or_not() -> None:
    forged, signed = _bomb(), _bomb(GITEA_TOKEN)
    assert len(zlib.decompress(base64_decode(forged.split(".")[1]))) > 1_000_000
    tracemalloc.start()
    try:
        read = [(dr.receiver_of(bomb), dr.decode(bomb, GITEA_TOKEN))
                for _ in range(3) for bomb in (forged, signed)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Inflating one of these is ~4 MB of JSON and ~100 MB of lists; the bound is 64 KiB.
    assert peak < 1_000_000, peak
    # The claimed Receiver is still read (it finds the key); the record is refused.
    assert read == [(RECEIVER, None)] * 6


def _huge_time_id(token: str | None) -> str:
    raw = b'[1,"' + RECEIVER.encode() + b'","","",' + b"9" * 4000 + b',"m",0,[]]'
    return _payload_id(raw, token=token)


def test_a_time_past_any_date_is_not_a_record() -> None:
    for token in (None, GITEA_TOKEN):
        assert dr.decode(_huge_time_id(token), GITEA_TOKEN) is None


def _read(bridge: Bridge, delivery_id: str) -> Any:
    return bridge.client.get(f"/deliveries/{delivery_id}",
                             headers={"Authorization": f"Bearer {GITEA_TOKEN}"})


@pytest.mark.anyio
async def test_a_time_past_any_date_answers_404_and_logs_no_error(
        bridge: Bridge, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    replies = [await _read(bridge, _huge_time_id(token)) for token in (None, GITEA_TOKEN)]
    assert [(r.status_code, r.json()) for r in replies] == [
        (404, {"error": "no such delivery"})] * 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.anyio
async def test_hostile_ids_answer_404_without_holding_the_loop_or_memory(
        bridge: Bridge) -> None:
    hostile = [_bomb(), _bomb(GITEA_TOKEN), "x" * (dr.MAX_ID_LENGTH + 100)]
    replies: list[Any] = []
    await _read(bridge, hostile[0])  # first use pays once for what is loaded lazily
    tracemalloc.start()
    try:
        async with probing(bridge.client) as probe:
            for _ in range(3):
                for delivery_id in hostile:
                    replies.append(await _read(bridge, delivery_id))
                    await probe.next()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert {(r.status_code, r.text) for r in replies} == {(404, '{"error":"no such delivery"}')}
    # Before: each bomb held the loop 0.3-1 s and its lists stayed alive (100+ MB).
    assert probe.worst < 0.25, probe.latencies
    assert held < 5_000_000, held


def test_a_fleet_that_compresses_well_still_fits_the_inflation_bound() -> None:
    many = tuple(dr.RecordTarget(dr.ObjectKey("Kustomization", "apps", "same"), dr.ROLE_TRACK)
                 for _ in range(50_000))
    record = dr.DeliveryRecord(RECEIVER, "", "refs/heads/main", 1.0, "m", many)
    delivery_id, carried = dr.encode(record, GITEA_TOKEN)
    assert len(carried.targets) > 0 and carried.omitted == 50_000 - len(carried.targets)
    assert dr.decode(delivery_id, GITEA_TOKEN) == carried
