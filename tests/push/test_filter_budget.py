"""A Receiver's resourceFilter runs within a budget: in a process of its own, with a time and a
memory bound, so a filter that runs away (or a huge body it reads) fails its own request with a
clear 422 and neither holds the bridge's event loop nor grows the bridge's memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from receiver import signatures as sig
from receiver.flux.objects import RECONCILE_ANNOTATION
from tests.conftest import FLEET, HMAC_TOKEN, Bridge
from tests.loopprobe import probing

HMAC_PATH = "/hook/" + sig.hook_digest(HMAC_TOKEN, "hmac", "flux-system")
SOURCES = [{"kind": "GitRepository", "name": name} for name in (
    "flux-system", "fleet-staging", "fleet-releases", "fleet-pinned", "fleet-by-name",
    "shared-lib")]
READS_THE_REF = 'req.ref.split("/")[2] == "main"'
# Each replace multiplies the length by ten: 10^8 characters.
BUILDS_A_LOT = '"a"' + '.replace("a", "aaaaaaaaaa")' * 8 + '.size() > 0'


async def _bridge(bridge_factory: Any, tmp_path: Path, expression: str) -> Bridge:
    for item in FLEET.iterdir():
        if item.suffix == ".yaml":
            shutil.copy(item, tmp_path / item.name)
    docs = [d for d in yaml.safe_load_all((FLEET / "receivers.yaml").read_text()) if d]
    for doc in docs:
        if doc["kind"] == "Receiver" and doc["metadata"]["name"] == "hmac":
            doc["spec"].update(resourceFilter=expression, resources=SOURCES)
    (tmp_path / "receivers.yaml").write_text(yaml.safe_dump_all(docs))
    bridge: Bridge = await bridge_factory(directory=tmp_path)
    return bridge


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def _post(bridge: Bridge, body: bytes) -> Any:
    return await bridge.client.post(HMAC_PATH, content=body, headers={
        "Content-Type": "application/json",
        "X-Signature": "sha256=" + sig.hmac_hex("sha256", HMAC_TOKEN, body)})


def _annotated(bridge: Bridge) -> list[str]:
    return [key.name for key, patch in bridge.cluster.patches if RECONCILE_ANNOTATION in patch]


async def _flood(bridge: Bridge, body: bytes, count: int) -> tuple[list[Any], float, int]:
    """`count` requests one after another: their replies, the worst loop block, RSS growth.
    None of them may annotate anything."""
    await _post(bridge, json.dumps({"ref": "refs/heads/main"}).encode())  # worker started
    patched = len(_annotated(bridge))
    before = _rss()
    replies = []
    async with probing(bridge.client) as probe:
        for _ in range(count):
            replies.append(await _post(bridge, body))
            await probe.next()
    assert len(_annotated(bridge)) == patched
    return replies, probe.worst, _rss() - before


@pytest.mark.anyio
async def test_a_filter_reading_a_huge_body_fails_alone(bridge_factory: Any,
                                                        tmp_path: Path) -> None:
    bridge = await _bridge(bridge_factory, tmp_path, READS_THE_REF)
    # 3 MB of keys a push never has, so no field limit applies; the filter's key is missing.
    body = json.dumps({f"k{i}": "x" * 20 for i in range(90_000)}).encode()
    replies, worst, grown = await _flood(bridge, body, 3)
    assert [r.status_code for r in replies] == [422] * 3, replies[0].text
    assert replies[0].json()["error"].endswith("the reason is in the bridge's log")
    # In process the filter held the loop 0.65 s and grew the bridge by 185 MB per request.
    assert worst < 0.25
    assert grown < 100 * 2**20, grown


@pytest.mark.anyio
async def test_a_filter_that_builds_too_much_fails_with_its_budget(bridge_factory: Any,
                                                                   tmp_path: Path) -> None:
    bridge = await _bridge(bridge_factory, tmp_path, BUILDS_A_LOT)
    replies, worst, grown = await _flood(bridge, b"{}", 2)
    # Memory runs out first, unless the machine is so busy that the time budget does.
    assert {(r.status_code, r.json()["error"]) for r in replies} <= {
        (422, "resourceFilter exceeded its memory budget (128 MiB)"),
        (422, "resourceFilter exceeded its time budget (2 s)")}
    assert bridge.parts.ingest.filter_sandbox.restarts >= 2
    # In process: 1.5 s of loop time and 210 MB per request.
    assert worst < 0.25
    assert grown < 50 * 2**20, grown
    # The next request gets a fresh evaluator, and the same answer.
    reply = await _post(bridge, b"{}")
    assert reply.status_code == 422


@pytest.mark.anyio
async def test_a_filter_past_its_time_is_stopped(bridge_factory: Any, tmp_path: Path) -> None:
    bridge = await _bridge(bridge_factory, tmp_path, READS_THE_REF)
    bridge.parts.ingest.filter_sandbox.timeout = 0.05
    body = json.dumps({f"k{i}": "x" * 20 for i in range(90_000)}).encode()
    reply = await _post(bridge, body)
    assert (reply.status_code, reply.json()) == (
        422, {"error": "resourceFilter exceeded its time budget (0.05 s)"})
    bridge.parts.ingest.filter_sandbox.timeout = 5.0
    reply = await _post(bridge, json.dumps({"ref": "refs/heads/main"}).encode())
    assert reply.status_code == 202, reply.text
