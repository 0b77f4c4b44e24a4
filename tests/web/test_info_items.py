"""The smaller findings of the third hardening round: unexpected errors logged once, by type and
place only; a token of control characters is blank; a connection that sends nothing is closed;
invisible characters never reach a status description."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from receiver.push.hookindex import usable_token
from receiver.status.descriptions import truncate
from receiver.web import deliveries
from tests.conftest import (
    FIXTURES,
    FLEET,
    Bridge,
    BridgeFactory,
    make_settings,
    send_package_event,
)
from tests.e2e.realk8s import free_port, wait_until


@pytest.mark.anyio
async def test_an_unhandled_error_is_one_line_with_its_type_and_place_only(
        bridge: Bridge, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(delivery_id: str) -> str:
        raise RuntimeError(f"message quoting the request: {delivery_id}")

    monkeypatch.setattr(deliveries, "receiver_of", broken)
    caplog.set_level(logging.DEBUG)
    reply = await bridge.client.get("/deliveries/what-the-caller-sent")
    assert (reply.status_code, reply.json()) == (500, {"error": "internal error"})
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [(r.getMessage(), r.error, r.exc_info) for r in errors] == [  # type: ignore[attr-defined]
        ("unhandled error", "RuntimeError", None)]
    assert "test_info_items.py" in errors[0].where and "broken" in errors[0].where  # type: ignore[attr-defined]
    # (httpx, the test's client, logs the URL it asked for; the bridge does not.)
    assert not [r for r in caplog.records
                if r.name.startswith("receiver") and "what-the-caller-sent" in str(vars(r))]


@pytest.mark.parametrize("token", ["\0", " \0\t", "\u200b", "\x7f\n", "\ufeff"])
def test_a_token_of_nothing_visible_is_blank(token: str) -> None:
    assert not usable_token(token)


def test_a_token_with_anything_visible_is_usable() -> None:
    assert usable_token("s3cret") and usable_token("\0a")


@pytest.mark.parametrize("invisible", ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff",
                                       "\U000e0041", "\U000e007f", "\u00ad", "\u2028"])
def test_invisible_characters_leave_status_descriptions(invisible: str) -> None:
    assert truncate(f"deployed{invisible} to prod") == "deployed  to prod"


def test_an_idle_connection_is_closed(tmp_path: Path) -> None:
    """A real server: a client that connects and sends nothing is closed after the keep-alive
    time (1 s here), not kept as long as it likes (uvicorn arms that timer only after a
    response)."""
    port = free_port()
    config = tmp_path / "c.yaml"
    config.write_text(f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                      "server: {timeout_keep_alive_seconds: 1}\n")
    server = subprocess.Popen([sys.executable, "-m", "receiver.cli", "serve", "--config",
                               str(config), "--manifests", str(FLEET)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        idle = wait_until("the bridge to listen",
                          lambda: socket.create_connection(("127.0.0.1", port), timeout=1), 60)
        with idle:
            idle.settimeout(10)
            opened = time.monotonic()
            assert idle.recv(1) == b""  # closed by the server, not by the timeout above
            assert time.monotonic() - opened < 5
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.anyio
async def test_a_package_reply_names_no_object_of_a_namespace_the_receiver_does_not_list(
        bridge_factory: BridgeFactory, tmp_path: Path) -> None:
    def source(namespace: str, tag: str) -> dict[str, Any]:
        return {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "OCIRepository",
                "metadata": {"name": "apps", "namespace": namespace},
                "spec": {"url": "oci://gitea.example.com/platform/manifests/apps",
                         "interval": "5m", "ref": {"tag": tag}}}

    receiver = {"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
                "metadata": {"name": "registry", "namespace": "flux-system"},
                "spec": {"type": "github", "events": ["package"],
                         "secretRef": {"name": "registry-token"},
                         "resources": [{"kind": "OCIRepository", "name": "apps"}]}}
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": "registry-token", "namespace": "flux-system"},
              "stringData": {"token": "registry-secret-token"}}
    docs = [receiver, secret, source("flux-system", "v1.4.0"), source("team-secret", "v9"),
            source("flux-system", "v9") | {"metadata": {"name": "pinned",
                                                        "namespace": "flux-system"}}]
    (tmp_path / "oci.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs))
    bridge = await bridge_factory(make_settings(), tmp_path)
    event = json.loads((FIXTURES / "payloads" / "gitea-package-container.json").read_text())
    reply = await send_package_event(bridge, "registry", "registry-secret-token",
                                     json.dumps(event).encode())
    assert [t["name"] for t in reply["targets"]] == ["apps"]
    # Its own namespace's sources are named with the reason; another namespace's counted only.
    assert [(s["namespace"], s["name"]) for s in reply["skipped"]] == [("flux-system", "pinned")]
    assert reply["skipped_elsewhere"] == 1
    assert "team-secret" not in json.dumps(reply)
