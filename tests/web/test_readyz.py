"""/readyz: not ready while a configured secret cannot be read (the reason names the setting and
the file or Secret, never a value); Receivers with unusable tokens are listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from receiver.flux.objects import ObjectKey
from tests.conftest import BridgeFactory, make_settings, until

pytestmark = pytest.mark.anyio

SECRET_VALUE = "s3cr3t-value-never-shown"


def _gitea(token_file: Path) -> list[dict[str, object]]:
    return [{"name": "eu", "url": "https://gitea.example.com", "token": {"file": str(token_file)}}]


async def test_ready_when_every_secret_is_readable(bridge_factory: BridgeFactory,
                                                   tmp_path: Path) -> None:
    token = tmp_path / "gitea-token"
    token.write_text(SECRET_VALUE + "\n")
    hmac = tmp_path / "events"
    hmac.write_text(SECRET_VALUE)
    bridge = await bridge_factory(make_settings(gitea=_gitea(token),
                                                events={"hmac_token": {"file": str(hmac)}}))
    r = await bridge.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ready"
    assert "receivers_unusable" not in r.json()


async def test_missing_secret_files_make_it_not_ready(bridge_factory: BridgeFactory,
                                                      tmp_path: Path) -> None:
    token = tmp_path / "gitea-token"
    hmac = tmp_path / "events-hmac"
    bridge = await bridge_factory(make_settings(
        gitea=_gitea(token), events={"hmac_token": {"file": str(hmac)}},
        badge_key={"secret": "flux-system/badge", "key": "key"}))
    r = await bridge.client.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["error"] == "configured secrets cannot be read"
    assert set(body["secrets"]) == {"gitea[eu].token", "events.hmac_token", "badge_key"}
    assert str(token) in body["secrets"]["gitea[eu].token"]
    assert "flux-system/badge" in body["secrets"]["badge_key"]
    # Written, then ready (no restart needed); a blank file is not a secret.
    token.write_text(SECRET_VALUE)
    hmac.write_text("  \n")
    bridge.cluster.secrets[("flux-system", "badge")] = {"key": SECRET_VALUE.encode()}
    # A missing Secret is remembered briefly, as the Kubernetes backend does: let that pass.
    later = bridge.cluster.clock() + 60
    bridge.cluster.clock = lambda: later
    r = await bridge.client.get("/readyz")
    assert r.status_code == 503
    assert body["secrets"].keys() > r.json()["secrets"].keys() == {"events.hmac_token"}
    assert "is empty" in r.json()["secrets"]["events.hmac_token"]
    hmac.write_text(SECRET_VALUE)
    r = await bridge.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert SECRET_VALUE not in r.text


async def test_unusable_receivers_are_listed(bridge_factory: BridgeFactory) -> None:
    bridge = await bridge_factory()
    bridge.cluster.secrets[("flux-system", "gitea-token")] = {"token": b"   "}
    later = bridge.cluster.clock() + 60  # past the Secret cache, as on a real cluster
    bridge.cluster.clock = lambda: later
    receiver = bridge.cluster.store.get(ObjectKey("Receiver", "flux-system", "gitea"))
    assert receiver is not None
    bridge.cluster.apply(dict(receiver.raw))  # re-indexed with the blank token
    await until(lambda: bridge.parts.hooks.unusable() and not bridge.parts.hooks.indexing,
                what="the receiver re-indexed, unusable")
    r = await bridge.client.get("/readyz")
    assert r.status_code == 200  # the other Receivers still work
    assert r.json()["receivers_unusable"] == {"flux-system/gitea": "blank token"}


async def test_kinds_not_installed_are_reported_not_blocking(bridge_factory: BridgeFactory
                                                             ) -> None:
    bridge = await bridge_factory()
    r = await bridge.client.get("/readyz")
    assert r.status_code == 200 and "kinds_not_installed" not in r.json()
    # What KubeCluster reports when the image CRDs are not served (tests/flux/test_kube_backend.py).
    bridge.cluster.not_installed = ["ImagePolicy", "ImageRepository"]  # type: ignore[attr-defined]
    r = await bridge.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["kinds_not_installed"] == ["ImagePolicy", "ImageRepository"]
    metrics = (await bridge.client.get("/metrics")).text
    assert "gfb_kinds_not_installed 2.0" in metrics


async def test_kinds_not_permitted_are_reported_not_blocking(bridge_factory: BridgeFactory
                                                             ) -> None:
    bridge = await bridge_factory()
    # What KubeCluster reports when RBAC does not let it list the image kinds (403).
    bridge.cluster.not_permitted = ["ImageRepository"]  # type: ignore[attr-defined]
    r = await bridge.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["kinds_not_permitted"] == ["ImageRepository"]
    assert "kinds_not_installed" not in r.json()
    metrics = (await bridge.client.get("/metrics")).text
    assert "gfb_kinds_not_permitted 1.0" in metrics
