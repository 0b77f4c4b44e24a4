"""`doctor` against a real Gitea: a token without the write:repository scope is named (asked
without posting anything), a missing webhook and one to the Receiver's path are told apart, and
the repository has no status afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from receiver import signatures as sig
from receiver.config_load import load_settings
from receiver.doctor.checks import Finding, diagnose
from receiver.doctor.gather import gather, notification_facts_from
from receiver.flux.memory import MemoryCluster, load_documents
from receiver.flux.store import ObjectStore
from receiver.web.app import url_normaliser
from tests.e2e.e2e_harness import Gitea, e2e_peers

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]
TOKEN, BRIDGE = "doctor-webhook-token", "http://bridge.test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def gitea() -> Iterator[Gitea]:
    bin_dir, static_root = e2e_peers(("gitea",))
    assert static_root is not None
    server = Gitea(bin_dir / "gitea", static_root).start()
    try:
        server.create_org("platform")
        server.create_repo("platform", "fleet")
        yield server
    finally:
        server.stop(remove=True)


def fleet(directory: Path, gitea: Gitea) -> Path:
    directory.mkdir()
    docs: list[dict[str, Any]] = [
        {"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
         "metadata": {"name": "gitea", "namespace": "flux-system"},
         "spec": {"type": "github", "secretRef": {"name": "webhook-token"},
                  "resources": [{"kind": "GitRepository", "name": "fleet"}]}},
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "webhook-token", "namespace": "flux-system"},
         "stringData": {"token": TOKEN}},
        {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
         "metadata": {"name": "fleet", "namespace": "flux-system"},
         "spec": {"url": gitea.clone_url("platform", "fleet"), "interval": "1m",
                  "ref": {"branch": "main"}}},
        {"apiVersion": "notification.toolkit.fluxcd.io/v1beta3", "kind": "Provider",
         "metadata": {"name": "bridge", "namespace": "flux-system"},
         "spec": {"type": "generic-hmac", "address": f"{BRIDGE}/events"}},
        {"apiVersion": "notification.toolkit.fluxcd.io/v1beta3", "kind": "Alert",
         "metadata": {"name": "bridge", "namespace": "flux-system"},
         "spec": {"providerRef": {"name": "bridge"},
                  "eventSources": [{"kind": "Kustomization", "name": "*"}]}}]
    (directory / "fleet.yaml").write_text(yaml.safe_dump_all(docs))
    return directory


async def doctor(gitea: Gitea, directory: Path, token: str, tmp_path: Path) -> list[Finding]:
    token_file = tmp_path / "gitea-token"
    token_file.write_text(token + "\n")
    settings = load_settings(environ={}, overrides={"gitea": [
        {"name": "local", "url": gitea.url, "token": {"file": str(token_file)}}]})
    cluster = MemoryCluster.from_directory(ObjectStore(url_normaliser(settings)), directory)
    facts = await gather(settings, cluster, source="manifests", base_url=BRIDGE,
                         notifications=notification_facts_from(load_documents(directory)))
    return diagnose(facts)


def checks(findings: list[Finding], severity: str = "fail") -> dict[str, str]:
    return {f.check: f.message for f in findings if f.severity == severity}


async def test_doctor_reads_gitea_and_writes_nothing(gitea: Gitea, tmp_path: Path) -> None:
    directory = fleet(tmp_path / "m", gitea)
    read_only = gitea.create_token("doctor-read", ["read:repository"])
    found = checks(await doctor(gitea, directory, read_only, tmp_path))
    assert "write:repository" in found["status-permission"]

    writer = gitea.create_token("doctor-write", ["write:repository"])
    findings = await doctor(gitea, directory, writer, tmp_path)
    assert set(checks(findings)) == {"webhook-missing"}
    assert {"status-permission", "gitea-auth", "gitea-reachable"} <= set(checks(findings, "ok"))

    path = "/hook/" + sig.hook_digest(TOKEN, "gitea", "flux-system")
    gitea.create_hook("platform", "fleet", BRIDGE + path, TOKEN)
    findings = await doctor(gitea, directory, writer, tmp_path)
    assert checks(findings) == {} and "webhook" in checks(findings, "ok")

    # The write probe posted nothing: no status on the branch's commit, nor on any other.
    head = gitea.api("GET", "/repos/platform/fleet/branches/main")["commit"]["id"]
    assert gitea.statuses("platform", "fleet", head) == []
    assert gitea.statuses("platform", "fleet", "0" * 40) == []
