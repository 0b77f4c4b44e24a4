"""Connection limits and timeouts: settings, what `serve` hands uvicorn, and the
body deadline the app enforces itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from receiver import signatures as sig
from receiver.cli import EXIT_OK, main
from receiver.config import ConfigError
from receiver.config_load import load_settings
from tests.conftest import ACTIONS_TOKEN, FLEET, Bridge, make_settings

ACTIONS_PATH = "/hook/" + sig.hook_digest(ACTIONS_TOKEN, "actions", "apps")


def test_defaults_and_what_uvicorn_gets() -> None:
    server = load_settings(environ={}).server
    assert server.uvicorn_options() == {
        "http": "httptools", "limit_concurrency": 1000, "backlog": 2048,
        "timeout_keep_alive": 5.0, "h11_max_incomplete_event_size": 64 * 1024}
    assert server.body_timeout_seconds == 30.0
    env = {"GFB_SERVER__HTTP": "h11", "GFB_SERVER__LIMIT_CONCURRENCY": "50"}
    assert load_settings(environ=env).server.uvicorn_options()["limit_concurrency"] == 50
    with pytest.raises(ConfigError, match=r"server\.limit_concurrency"):
        load_settings(environ={"GFB_SERVER__LIMIT_CONCURRENCY": "0"})
    with pytest.raises(ConfigError, match=r"server\.http"):
        load_settings(environ={"GFB_SERVER__HTTP": "asyncio"})


def test_serve_passes_the_limits_to_uvicorn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from receiver import logs
    from receiver.web.drain import DrainingServer

    seen: dict[str, Any] = {}

    def run(server: DrainingServer) -> None:  # what uvicorn would be started with, not started
        config = server.config
        seen.update(http=getattr(config.http, "__name__", config.http),
                    limit_concurrency=config.limit_concurrency,
                     timeout_keep_alive=config.timeout_keep_alive, backlog=config.backlog,
                     h11_max_incomplete_event_size=config.h11_max_incomplete_event_size)
        server.started = True

    monkeypatch.setattr(DrainingServer, "run", run)
    monkeypatch.setattr(logs, "configure", lambda level: None)
    config = tmp_path / "c.yaml"
    config.write_text("server: {limit_concurrency: 77, timeout_keep_alive_seconds: 2, "
                      "http: h11, h11_max_incomplete_event_size: 8192}\n")
    assert main(["serve", "--config", str(config), "--manifests", str(FLEET)]) == EXIT_OK
    assert {k: seen[k] for k in ("http", "limit_concurrency", "timeout_keep_alive",
                                 "h11_max_incomplete_event_size", "backlog")} == {
        "http": "IdleClosingH11", "limit_concurrency": 77, "timeout_keep_alive": 2.0,
        "h11_max_incomplete_event_size": 8192, "backlog": 2048}


def _scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 5),
            "server": ("bridge.test", 80)}


@pytest.mark.anyio
async def test_a_body_that_never_finishes_is_a_408(bridge_factory: Any) -> None:
    bridge: Bridge = await bridge_factory(make_settings(server={"body_timeout_seconds": 0.2}))
    stalled = asyncio.Event()  # never set: the second chunk never comes
    messages = [{"type": "http.request", "body": b'{"ref": ', "more_body": True}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await stalled.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"application/json"),
               (b"authorization", f"Bearer {ACTIONS_TOKEN}".encode())]
    await asyncio.wait_for(bridge.app(_scope(ACTIONS_PATH, headers), receive, send), timeout=30)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert json.loads(body) == {"error": "request body not received in time"}
    assert bridge.cluster.patches == []


@pytest.mark.anyio
async def test_the_deadline_ends_with_the_body_not_with_a_streamed_wait(
    bridge_factory: Any,
) -> None:
    bridge: Bridge = await bridge_factory(make_settings(server={"body_timeout_seconds": 0.05}))
    r = await bridge.client.post(ACTIONS_PATH, headers={"Authorization": f"Bearer {ACTIONS_TOKEN}"})
    delivery = r.json()["delivery"]
    await bridge.parts.reconciler.stop()
    r = await bridge.client.get(f"/deliveries/{delivery}?wait=0.3",
                                headers={"Authorization": f"Bearer {ACTIONS_TOKEN}"})
    assert r.status_code == 200
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[-1].get("timeout") is True or lines[-1].get("final") is True
