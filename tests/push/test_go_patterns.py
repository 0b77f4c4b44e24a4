"""Every pattern Flux evaluates with Go's regexp is evaluated by RE2 here: Go's syntax, and time
linear in the text (a pushed version is the pusher's choice)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from receiver.push.package_routing import oci_ref_match
from tests.conftest import FIXTURES, BridgeFactory, make_settings, send_package_event
from tests.loopprobe import probing

SEMVER = ">=0.0.0-0"
PAYLOAD = FIXTURES / "payloads" / "gitea-package-container.json"
TOKEN = "registry-secret-token"
NS = "flux-system"
# Exponential for a backtracking engine on digits that end in a mismatch.
CATASTROPHIC = r"^(\d+\.?)+$"


@pytest.mark.parametrize(("pattern", "version", "taken"), [
    ("-rc", "v1.4.0-rc.1", True),
    (r"^v[[:digit:]]\.", "v1.4.0", True),  # a POSIX class, as Go reads it
    (r"^v\Q1.4\E", "v1.4.0", True),  # Go's literal quoting
    (r"^v\pN", "v1.4.0", True),  # a Unicode class
    (r"^v1(?=\.)", "v1.4.0", False),  # lookahead: Go refuses the pattern, so does Flux
    (r"^(a)\1", "aa1.0.0", False),  # a backreference, likewise
    ("[", "v1.4.0", False),
])
def test_semver_filter_reads_as_go(pattern: str, version: str, taken: bool) -> None:
    taken_now, reason = oci_ref_match({"semver": SEMVER, "semverFilter": pattern}, version)
    assert taken_now is taken, reason
    if pattern in ("[", r"^v1(?=\.)", r"^(a)\1"):
        assert reason.startswith("invalid semverFilter")


def _manifests(tmp_path: Path) -> Path:
    receiver = {"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
                "metadata": {"name": "registry", "namespace": NS},
                "spec": {"type": "github", "events": ["package"],
                         "secretRef": {"name": "registry-token"},
                         "resources": [{"kind": "OCIRepository", "name": "apps"}]}}
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": "registry-token", "namespace": NS},
              "stringData": {"token": TOKEN}}
    source = {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "OCIRepository",
              "metadata": {"name": "apps", "namespace": NS},
              "spec": {"url": "oci://gitea.example.com/platform/manifests/apps",
                       "interval": "5m",
                       "ref": {"semver": SEMVER, "semverFilter": CATASTROPHIC}}}
    (tmp_path / "oci.yaml").write_text("\n---\n".join(json.dumps(d) for d in (
        receiver, secret, source)))
    return tmp_path


def _event(version: str) -> bytes:
    doc: dict[str, Any] = json.loads(PAYLOAD.read_text())
    doc["package"]["version"] = version
    return json.dumps(doc).encode()


@pytest.mark.anyio
async def test_a_hostile_version_against_a_backtracking_filter_does_not_hold_the_loop(
        bridge_factory: BridgeFactory, tmp_path: Path) -> None:
    bridge = await bridge_factory(make_settings(), _manifests(tmp_path))
    # First use pays once for what is loaded and compiled lazily (on a fresh clone, bytecode
    # too): that is not what is measured here.
    await send_package_event(bridge, "registry", TOKEN, _event("0.0.1"))
    replies = []
    async with probing(bridge.client) as probe:
        for digits in (20, 22, 24):
            replies.append(await send_package_event(
                bridge, "registry", TOKEN, _event("1" * digits + "!")))
            await probe.next()
        taken = await send_package_event(bridge, "registry", TOKEN, _event("1.2.3"))
    # Refused by the filter, without a patch; a version it matches is taken.
    assert [r["targets"] for r in replies] == [[], [], []]
    assert [s["reason"] for s in replies[-1]["skipped"]] == [
        f"semver {SEMVER} with semverFilter {CATASTROPHIC} does not take {'1' * 24}!"]
    assert [t["name"] for t in taken["targets"]] == ["apps"]
    # Python's re took 0.15, 0.5 and 2 s on these; RE2 takes microseconds.
    assert probe.worst < 0.25, probe.latencies
