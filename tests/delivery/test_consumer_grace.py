"""A consumer whose source has the pushed commit is left to start on its own for
`consumer_grace_seconds`, then annotated: when that grace is over, not when the source's
time-out passes, whatever the event loop's timers do.

The service runs on uvloop, whose timers count whole milliseconds: a callback asked for in
`grace` seconds may run up to a millisecond before `time.monotonic()` says `grace` seconds have
passed. Here the loop's timers fire a fixed EARLY before their time, so that an evaluation which
trusts the timer finds the consumer still in its grace on every run, not on one in ten."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextvars import Context
from typing import Any

import pytest

from receiver import signatures as sig
from receiver.flux.objects import RECONCILE_ANNOTATION, ObjectKey
from tests import gitea_payloads as gp
from tests.conftest import GITEA_TOKEN, BridgeFactory, make_settings, until

pytestmark = pytest.mark.anyio

GRACE = 0.4
EARLY = 0.2  # how long before their time the loop's timers fire
SOURCE_TIMEOUT = 60.0
GITEA_PATH = "/hook/" + sig.hook_digest(GITEA_TOKEN, "gitea", "flux-system")
SOURCE = ObjectKey("GitRepository", "flux-system", "flux-system")
APPS = ObjectKey("Kustomization", "flux-system", "apps")


class EarlyTimers(asyncio.SelectorEventLoop):
    """An event loop whose `call_later` callbacks run EARLY seconds before their time."""

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any,
                   context: Context | None = None) -> asyncio.TimerHandle:
        return super().call_later(max(0.0, delay - EARLY), callback, *args, context=context)


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "asyncio", {"loop_factory": EarlyTimers}


async def test_a_consumer_is_annotated_when_its_grace_ends_though_timers_fire_early(
        bridge_factory: BridgeFactory) -> None:
    bridge = await bridge_factory(make_settings(reconcile={
        "coalesce_window_seconds": 0.2, "source_timeout_seconds": SOURCE_TIMEOUT,
        "consumer_grace_seconds": GRACE}))
    cluster = bridge.cluster
    doc = gp.push("platform/fleet", "refs/heads/main", [gp.commit(
        "platform/fleet", "grace", modified=["clusters/eu-west/apps/a.yaml"])])
    body = gp.gitea_bytes(doc)
    reply = await bridge.client.post(GITEA_PATH, content=body, headers={
        "Content-Type": "application/json", "X-Gitea-Event": "push",
        "X-Gitea-Delivery": "grace-1",
        "X-Gitea-Signature": sig.hmac_hex("sha256", GITEA_TOKEN, body)})
    assert reply.status_code == 202, reply.text
    assert {t["name"]: t["state"] for t in reply.json()["targets"]}["flux-system"] == "annotated"

    def consumer_patches() -> int:
        return sum(1 for key, annotations in cluster.patches
                   if key == APPS and RECONCILE_ANNOTATION in annotations)

    assert consumer_patches() == 0  # it waits for its source
    cluster.mark_source_fetched(SOURCE, f"main@sha1:{doc['after']}")
    ready_at = time.monotonic()
    # Unfixed, the consumer waits for the source's time-out (60 s): nothing else wakes it.
    await until(consumer_patches, GRACE + 10.0, "the consumer annotated once its grace is over")
    waited = time.monotonic() - ready_at
    assert waited >= GRACE, f"annotated {waited:.3f}s after its source was ready, within grace"
    assert consumer_patches() == 1
