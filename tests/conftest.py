"""Shared fixtures: the fleet fixture on an in-memory cluster, and the app over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver import signatures as sig
from receiver.config import Settings
from receiver.config_load import load_settings
from receiver.flux.store import ObjectStore
from receiver.web.app import create_app, url_normaliser
from tests.faultycluster import FaultyCluster

FIXTURES = Path(__file__).parent / "fixtures"
FLEET = FIXTURES / "fleet"
GITEA_TOKEN = "gitea-secret-token"
ACTIONS_TOKEN = "actions-secret-token"
HMAC_TOKEN = "hmac-secret-token"


async def until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition", *,
                in_thread: bool = False) -> Any:
    """Wait until `check` returns something truthy, and return it; fail after `timeout` (a
    bound for a broken build, not a pace). The one async wait of the suite (the whole-loop
    tests' blocking one is `realk8s.wait_until`).

    What the in-process tests wait on (the bridge's objects, deliveries, queues, the fake
    Gitea) only changes in a callback of this loop, so `check` is asked again after every turn
    of the loop: no interval to tune, and no change can be missed. `in_thread`: `check` makes
    blocking calls (a real API server), so it runs in a thread, each call as soon as the last
    answered."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(check) if in_thread else check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0)  # one turn of the loop: every ready callback runs first


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "cluster_name": "eu-west",
        "host_aliases": {"gitea-http.gitea.svc.cluster.local:3000": "gitea.example.com"},
        "reconcile": {"coalesce_window_seconds": 0.2, "source_timeout_seconds": 30,
                      "consumer_grace_seconds": 0},
    }
    base.update(overrides)
    return load_settings(environ={}, overrides=base)


@dataclass
class Bridge:
    app: Any
    client: httpx.AsyncClient
    cluster: FaultyCluster

    @property
    def parts(self) -> Any:
        return self.app.state.parts


BridgeFactory = Callable[..., Any]


async def send_package_event(bridge: Bridge, receiver: str, token: str, body: bytes
                             ) -> dict[str, Any]:
    """Gitea's signed `package` event to the Receiver `receiver` in flux-system; the bridge's
    202 reply. The package-routing and OCI-status tests both send it."""
    reply = await bridge.client.post(
        "/hook/" + sig.hook_digest(token, receiver, "flux-system"), content=body,
        headers={"Content-Type": "application/json", "X-Gitea-Event": "package",
                 "X-GitHub-Event": "package",
                 "X-Hub-Signature-256": "sha256=" + sig.hmac_hex("sha256", token, body)})
    assert reply.status_code == 202, reply.text
    doc: dict[str, Any] = reply.json()
    return doc


async def settled_delivery(bridge: Bridge, delivery_id: str, token: str,
                           wait: float = 10.0) -> dict[str, Any]:
    """A delivery's state once it settles, read as a client does: `GET /deliveries/{id}?wait=`
    streams a line on every change and ends when the delivery settles (a final line with
    `timeout` if it did not within `wait`, which fails here)."""
    reply = await bridge.client.get(f"/deliveries/{delivery_id}?wait={wait:g}",
                                    headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 200, reply.text
    lines = [json.loads(line) for line in reply.text.splitlines() if line.strip()]
    assert lines and not lines[-1].get("timeout"), lines[-1:]
    last: dict[str, Any] = lines[-1]
    return last


@pytest.fixture
async def bridge_factory() -> AsyncIterator[BridgeFactory]:
    stack: list[Any] = []

    async def make(settings: Settings | None = None, directory: Path = FLEET,
                   **kwargs: Any) -> Bridge:
        settings = settings or make_settings()
        store = ObjectStore(url_normaliser(settings))
        cluster = FaultyCluster.from_directory(
            store, directory, secret_ttl_seconds=settings.secret_cache_seconds)
        app = create_app(settings, cluster, **kwargs)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                   base_url="http://bridge.test")
        stack.append((lifespan, client))
        return Bridge(app, client, cluster)

    yield make
    for lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def bridge(bridge_factory: BridgeFactory) -> Bridge:
    result: Bridge = await bridge_factory()
    return result


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Show what tests recorded as `summary` (record_property): the model's example and step
    counts, which a plain run would otherwise hide."""
    lines = [str(value)
             for outcome in ("passed", "failed")
             for report in terminalreporter.stats.get(outcome, [])
             if getattr(report, "when", "") == "call"
             for name, value in getattr(report, "user_properties", ())
             if name == "summary"]
    if lines:
        terminalreporter.section("summaries")
        for line in lines:
            terminalreporter.write_line(line)
    _slowest_modules(terminalreporter)


def _slowest_modules(terminalreporter: Any, shown: int = 15) -> None:
    """Each module's wall time (setup, calls and teardown: a module fixture's real peers are
    in its first setup and last teardown), the slowest first, where a run spans several:
    where CI's time goes, from the README's plain `python -m pytest`."""
    seconds: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            nodeid, duration = getattr(report, "nodeid", ""), getattr(report, "duration", None)
            if nodeid and isinstance(duration, float) and getattr(report, "when", None):
                module = nodeid.split("::", 1)[0]
                seconds[module] = seconds.get(module, 0.0) + duration
    if len(seconds) < 2:
        return
    terminalreporter.section("slowest modules")
    total = sum(seconds.values())
    for module, spent in sorted(seconds.items(), key=lambda item: -item[1])[:shown]:
        terminalreporter.write_line(f"{spent:8.1f}s {100 * spent / total:5.1f}%  {module}")
    terminalreporter.write_line(f"{total:8.1f}s in {len(seconds)} modules")
