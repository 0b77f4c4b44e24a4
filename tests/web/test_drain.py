"""Rollouts lose nothing: the drain at SIGTERM, in the app and through a real process.

In the app: `/readyz` answers 503 while draining, pushes are still accepted, and a `?wait` stream
ends with a line that tells the client to ask again as soon as the drain begins. Through a real
`gitea-flux-bridge serve` process: the same, driven by SIGTERM and SIGINT, then a clean exit.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver import signatures as sig
from receiver.config import ConfigError
from receiver.config_load import load_settings
from receiver.delivery.store import Delivery
from receiver.flux.objects import ObjectKey
from receiver.web.drain import Drain
from tests import gitea_payloads as gp
from tests.conftest import GITEA_TOKEN, Bridge, until
from tests.e2e.realk8s import wait_until
from tests.product.test_action_script import (
    TOKEN,
    Service,
    hook_path,
    random_sha,
    start_service,
)

GITEA_PATH = "/hook/" + sig.hook_digest(GITEA_TOKEN, "gitea", "flux-system")
RETRY = {"retry": True, "reason": "draining"}


def _push_body(path: str) -> bytes:
    doc = gp.push("platform/fleet", "refs/heads/main",
                  [gp.commit("platform/fleet", path, modified=[path])])
    return gp.gitea_bytes(doc)


async def _push(bridge: Bridge, path: str) -> httpx.Response:
    body = _push_body(path)
    return await bridge.client.post(GITEA_PATH, content=body, headers={
        "Content-Type": "application/json", "X-Gitea-Event": "push",
        "X-Gitea-Delivery": f"d-{time.monotonic_ns()}",
        "X-Gitea-Signature": sig.hmac_hex("sha256", GITEA_TOKEN, body)})


async def _delivery(bridge: Bridge, path: str) -> Delivery:
    reply = await _push(bridge, path)
    assert reply.status_code == 202, reply.text
    found = bridge.parts.deliveries.get(reply.json()["delivery"])
    assert found is not None and not found.view.settled
    return found


def _stream(bridge: Bridge, delivery: Delivery, wait: float, drain: Drain) -> Any:
    return bridge.parts.follow._stream(delivery.id, delivery.record, wait, drain)


anyio = pytest.mark.anyio


# -- the Drain object ---------------------------------------------------------------------------


@anyio
async def test_drain_begins_once_and_wakes_waiters() -> None:
    drain = Drain()
    assert not drain.draining
    waiter = asyncio.ensure_future(drain.wait())
    assert drain.begin("draining") is True
    await asyncio.wait_for(waiter, 2)
    assert drain.begin("shutting_down") is False
    assert drain.draining and drain.reason == "draining"


@anyio
async def test_drain_hold_is_cut_short() -> None:
    drain = Drain()
    holding = asyncio.ensure_future(drain.hold(60))
    drain.cut_short()
    await asyncio.wait_for(holding, 2)


# -- in the app ----------------------------------------------------------------------------------

@anyio
async def test_readyz_answers_503_while_draining_and_pushes_are_still_accepted(
    bridge: Bridge,
) -> None:
    ready = await bridge.client.get("/readyz")
    assert ready.status_code == 200 and "connection" not in ready.headers
    bridge.parts.drain.begin()
    ready = await bridge.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"error": "draining"}
    assert (await bridge.client.get("/healthz")).status_code == 200
    late = await _push(bridge, "clusters/eu-west/apps/late.yaml")
    assert late.status_code == 202
    # Keep-alive clients are told to open their next connection elsewhere.
    assert late.headers["connection"] == "close"


@anyio
async def test_wait_stream_ends_with_retry_line_when_the_drain_begins(bridge: Bridge) -> None:
    delivery = await _delivery(bridge, "clusters/eu-west/apps/a.yaml")
    drain = bridge.parts.drain
    stream = _stream(bridge, delivery, 600, drain)
    first = json.loads(await anext(stream))
    assert first["delivery"] == delivery.id and first["outcome"] == "in_progress"
    following = asyncio.ensure_future(anext(stream))
    # The stream waits for a change: nothing comes until the drain begins.
    # It has gone as far as it can: blocked on a change or the drain (asyncio.Event's waiters).
    await until(lambda: drain._begun._waiters, what="the stream to wait on the drain")
    assert not following.done()
    started = time.monotonic()
    drain.begin()
    line = json.loads(await asyncio.wait_for(following, 5))
    assert time.monotonic() - started < 2
    assert line == {"delivery": delivery.id, **RETRY}
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


@anyio
async def test_wait_opened_while_draining_gets_the_state_then_the_retry_line(
    bridge: Bridge,
) -> None:
    delivery = await _delivery(bridge, "clusters/eu-west/apps/b.yaml")
    bridge.parts.drain.begin()
    started = time.monotonic()
    reply = await bridge.client.get(f"/deliveries/{delivery.id}?wait=600",
                                    headers={"Authorization": f"Bearer {GITEA_TOKEN}"})
    assert time.monotonic() - started < 5
    lines = [json.loads(line) for line in reply.text.splitlines()]
    assert [line.get("retry") for line in lines] == [None, True]
    assert lines[0]["outcome"] == "in_progress"
    assert lines[1] == {"delivery": delivery.id, **RETRY}


@anyio
async def test_a_settled_delivery_still_ends_with_its_outcome_while_draining(
    bridge: Bridge,
) -> None:
    delivery = await _delivery(bridge, "clusters/eu-west/apps/c.yaml")
    source = ObjectKey("GitRepository", "flux-system", "flux-system")
    bridge.cluster.mark_failed(source, f"main@sha1:{delivery.sha}", "GitOperationFailed",
                               "cannot fetch")
    bridge.parts.drain.begin()
    lines = [json.loads(line) async for line in _stream(bridge, delivery, 600,
                                                          bridge.parts.drain)]
    assert len(lines) == 1
    assert lines[0]["outcome"] == "failed"


# -- configuration -----------------------------------------------------------------------------


def test_shutdown_settings() -> None:
    settings = load_settings(environ={})
    assert settings.shutdown.drain_seconds == 5
    assert settings.shutdown.in_flight_seconds == 10
    assert settings.shutdown.flush_seconds == 10
    assert settings.shutdown.worst_case_seconds == 25
    env = load_settings(environ={"GFB_SHUTDOWN__DRAIN_SECONDS": "0"})
    assert env.shutdown.drain_seconds == 0
    for bad in ({"drain_seconds": -1}, {"in_flight_seconds": 0}, {"flush_seconds": 301},
                {"drain_second": 1}):
        with pytest.raises(ConfigError, match="shutdown"):
            load_settings(environ={}, overrides={"shutdown": bad})


# -- a real process ------------------------------------------------------------------------------


def _readyz(service: Service) -> int:
    try:
        return service.get("/readyz")[0]
    except httpx.TransportError:
        return 0


def _signed_push(service: Service, path: str) -> httpx.Response:
    body = json.dumps({"repository": "https://gitea.example.com/teams/apps",
                       "ref": "refs/heads/production", "sha": random_sha()}).encode()
    return httpx.post(service.base_url + path, content=body, timeout=10, headers={
        "Content-Type": "application/json",
        "X-Signature": sig.sign_timestamped(TOKEN, body, int(time.time()))})


class Follower(threading.Thread):
    """Follows a delivery with `?wait=` and keeps every line it receives."""

    def __init__(self, service: Service, delivery: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{service.base_url}/deliveries/{delivery}?wait=600"
        self.lines: list[dict[str, Any]] = []
        self.opened = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("GET", self.url, headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=httpx.Timeout(10, read=60)) as response:
                for line in response.iter_lines():
                    if line:
                        self.lines.append(json.loads(line))
                        self.opened.set()
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.fixture
def processes() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_then_exits_0(tmp_path: Path, processes: list[Service],
                                      signum: int) -> None:
    drain_seconds = 3.0
    service = start_service(tmp_path, "--drain-seconds", str(drain_seconds))
    processes.append(service)
    path = hook_path(tmp_path)
    accepted = _signed_push(service, path)
    assert accepted.status_code == 202, accepted.text
    follower = Follower(service, accepted.json()["delivery"])
    follower.start()
    assert follower.opened.wait(20), follower.error

    service.process.send_signal(signum)
    signalled = time.monotonic()
    wait_until("/readyz to answer 503", lambda: _readyz(service) == 503, 20, interval=0.02)
    assert time.monotonic() - signalled < drain_seconds
    assert service.get("/readyz") == (503, b'{"error":"draining"}')
    # The stream ends at once, with the line that says ask again.
    follower.join(20)
    assert not follower.is_alive() and follower.error is None, follower.error
    assert time.monotonic() - signalled < drain_seconds
    assert follower.lines[-1] == {"delivery": accepted.json()["delivery"], **RETRY}
    # The listener still accepts and serves: a late push is answered, not refused.
    late = _signed_push(service, path)
    assert late.status_code == 202, late.text
    assert late.headers["connection"] == "close"
    assert time.monotonic() - signalled < drain_seconds
    assert _readyz(service) == 503

    code = service.process.wait(timeout=drain_seconds + 20)
    elapsed = time.monotonic() - signalled
    assert code == 0, service.log.read_text()
    assert elapsed >= drain_seconds - 0.1
    log = [json.loads(line) for line in service.log.read_text().splitlines()
           if line.startswith("{")]
    messages = [r["msg"] for r in log]
    assert messages.index("draining: not ready, still serving") < messages.index(
        "drain over: shutting down") < messages.index("Application shutdown complete.")


def test_a_second_signal_ends_the_drain(tmp_path: Path, processes: list[Service]) -> None:
    service = start_service(tmp_path, "--drain-seconds", "120")
    processes.append(service)
    service.process.send_signal(signal.SIGTERM)
    wait_until("/readyz to answer 503", lambda: _readyz(service) == 503, 20, interval=0.02)
    again = time.monotonic()
    service.process.send_signal(signal.SIGINT)
    assert service.process.wait(timeout=30) == 0
    assert time.monotonic() - again < 15


def test_without_a_drain_the_signal_shuts_down_at_once(tmp_path: Path,
                                                        processes: list[Service]) -> None:
    service = start_service(tmp_path, env={"GFB_SHUTDOWN__DRAIN_SECONDS": "0"})
    processes.append(service)
    signalled = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 15
    assert "draining: not ready" not in service.log.read_text()
