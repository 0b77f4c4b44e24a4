"""`doctor` names every silent failure a new user meets, and what it says is what the service
does: the hook path it calls dead answers 404, the one it calls live annotates the objects.

Each test builds a small fleet of manifests (a Receiver, its Secret, a GitRepository on a
configured Gitea), breaks one thing, and runs doctor as a user does (`main([...])`, or `gather`
with the fake Gitea's transport); the service checks run the real app on the same manifests.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from receiver import signatures as sig
from receiver.cli import main
from receiver.config import Settings
from receiver.config_load import load_settings
from receiver.doctor.checks import Finding, diagnose
from receiver.doctor.gather import gather, notification_facts_from
from receiver.flux.memory import MemoryCluster, load_documents
from receiver.flux.objects import RECONCILE_ANNOTATION, ObjectKey
from receiver.flux.store import ObjectStore
from receiver.web.app import create_app, url_normaliser
from tests import gitea_payloads as gp
from tests.fakegitea import FakeGitea, gitea_transport

NS, NAME = "flux-system", "gitea"
TOKEN = "s3cret-webhook-token"
GITEA = "https://gitea.example.com"
pytestmark = pytest.mark.anyio


def receiver(*, kind: str = "GitRepository", name: str = "fleet", type_: str = "github",
             secret: str = "webhook-token") -> dict[str, Any]:  # noqa: S107
    return {"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {"type": type_, "secretRef": {"name": secret},
                     "resources": [{"kind": kind, "name": name}]}}


def secret(raw: bytes, name: str = "webhook-token") -> dict[str, Any]:
    """A Secret as the API server keeps it: `data`, base64 of the exact bytes."""
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": NS},
            "data": {"token": base64.b64encode(raw).decode()}}


SOURCE = {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
          "metadata": {"name": "fleet", "namespace": NS},
          "spec": {"url": f"{GITEA}/platform/fleet.git", "interval": "1m",
                   "ref": {"branch": "main"}}}
PROVIDER = {"apiVersion": "notification.toolkit.fluxcd.io/v1beta3", "kind": "Provider",
            "metadata": {"name": "bridge", "namespace": NS},
            "spec": {"type": "generic-hmac", "address": "http://bridge.test/events"}}
ALERT = {"apiVersion": "notification.toolkit.fluxcd.io/v1beta3", "kind": "Alert",
         "metadata": {"name": "bridge", "namespace": NS},
         "spec": {"providerRef": {"name": "bridge"},
                  "eventSources": [{"kind": "Kustomization", "name": "*"}]}}


def fleet(directory: Path, *docs: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fleet.yaml").write_text(yaml.safe_dump_all(docs))
    return directory


def healthy(directory: Path, *, token: bytes = TOKEN.encode(), **changes: Any) -> Path:
    return fleet(directory, receiver(**changes), secret(token), SOURCE, PROVIDER, ALERT)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["doctor", "--output", "json", *argv])
    return code, json.loads(capsys.readouterr().out)


def named(report: dict[str, Any], check: str) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["check"] == check]


# -- what the service does with the paths doctor names ----------------------------------------


async def push_to(directory: Path, path: str, token: str) -> tuple[int, str | None]:
    """A signed Gitea push to `path` on the service running on these manifests: (HTTP status,
    the GitRepository's requestedAt afterwards)."""
    settings = load_settings(environ={})
    cluster = MemoryCluster.from_directory(ObjectStore(url_normaliser(settings)), directory)
    app = create_app(settings, cluster)
    body = gp.gitea_bytes(gp.push("platform/fleet"))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bridge.test") as client:
        reply = await client.post(path, content=body, headers={
            "Content-Type": "application/json", "X-Gitea-Event": "push",
            "X-GitHub-Event": "push", "X-Gitea-Delivery": "d-1",
            "X-Gitea-Signature": sig.hmac_hex("sha256", token, body)})
    obj = cluster.store.get(ObjectKey("GitRepository", NS, "fleet"))
    assert obj is not None
    return reply.status_code, obj.annotations.get(RECONCILE_ANNOTATION)


def pushed(directory: Path, path: str, token: str) -> tuple[int, str | None]:
    return asyncio.run(push_to(directory, path, token))


# -- Receivers -------------------------------------------------------------------------------


def test_a_token_ending_in_a_newline_is_named_with_the_hook_url_of_each_reading(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `kubectl create secret generic --from-file=token=FILE` keeps the file's newline.
    directory = healthy(tmp_path / "m", token=(TOKEN + "\n").encode())
    code, report = run(capsys, "--manifests", str(directory))
    assert code == 1 and report["problems"] == 1
    (finding,) = named(report, "token-trailing-newline")
    stored, stripped = (finding["detail"]["hook_url"],
                        finding["detail"]["hook_url_without_newline"])
    assert stored == "/hook/" + sig.hook_digest(TOKEN + "\n", NAME, NS) != stripped

    # The chart NOTES' recipe (decode the Secret into a file, hook-url --token-file) drops the
    # newline: it gives the path doctor calls dead.
    token_file = tmp_path / "token"
    token_file.write_bytes(base64.b64decode(secret((TOKEN + "\n").encode())["data"]["token"]))
    assert main(["hook-url", "--name", NAME, "--namespace", NS,
                 "--token-file", str(token_file)]) == 0
    assert capsys.readouterr().out.strip() == stripped

    # hook-url --receiver reads the Secret as Flux does, and says why the other path differs.
    assert main(["hook-url", "--receiver", f"{NS}/{NAME}", "--manifests", str(directory)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == stored and "newline" in out.err and stripped in out.err

    # And the service agrees with doctor: the stripped path is a 404 that annotates nothing,
    # the stored one reconciles (signed with the token as stored, as Gitea would be set up).
    assert pushed(directory, stripped, TOKEN + "\n") == (404, None)
    status, requested = pushed(directory, stored, TOKEN + "\n")
    assert status == 202 and requested


@pytest.mark.parametrize(("raw", "check"), [(b" \n", "token-blank"), (None, "token-missing")])
def test_a_blank_or_missing_token_is_named_and_its_path_is_dead(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes | None,
        check: str) -> None:
    docs = [receiver(), SOURCE, PROVIDER, ALERT] + ([secret(raw)] if raw is not None else [])
    directory = fleet(tmp_path / "m", *docs)
    code, report = run(capsys, "--manifests", str(directory))
    assert code == 1 and len(named(report, check)) == 1
    token = raw.decode() if raw is not None else ""
    assert pushed(directory, "/hook/" + sig.hook_digest(token, NAME, NS), token) == (
        404, None)
    assert main(["hook-url", "--receiver", f"{NS}/{NAME}", "--manifests", str(directory)]) == 1


def test_an_unsupported_receiver_type_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = healthy(tmp_path / "m", type_="gitlab")
    code, report = run(capsys, "--manifests", str(directory))
    (finding,) = named(report, "type-unsupported")
    assert code == 1 and "gitlab" in finding["message"] and "404" in finding["message"]
    assert pushed(directory, "/hook/" + sig.hook_digest(TOKEN, NAME, NS), TOKEN) == (
        404, None)


def test_resources_that_match_nothing_are_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = healthy(tmp_path / "m", name="flet")  # a typo in the object's name
    code, report = run(capsys, "--manifests", str(directory))
    (finding,) = named(report, "no-targets")
    assert code == 1 and "targets: []" in finding["message"] and "flet" in finding["message"]
    # The service takes the push (202) and reconciles nothing: that is the silence.
    assert pushed(directory, "/hook/" + sig.hook_digest(TOKEN, NAME, NS), TOKEN) == (
        202, None)


def test_a_healthy_fleet_exits_0_and_says_what_it_checked(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run(capsys, "--manifests", str(healthy(tmp_path / "m")))
    assert code == 0 and report["problems"] == 0
    (token,) = named(report, "token")
    assert token["detail"]["hook_url"] == "/hook/" + sig.hook_digest(TOKEN, NAME, NS)
    assert named(report, "targets")[0]["message"] == "1 object(s) listed"
    main(["doctor", "--manifests", str(tmp_path / "m")])
    assert capsys.readouterr().out.splitlines()[-1] == "no problems found"


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--manifests", str(tmp_path / "absent")]) == 2
    assert main(["hook-url", "--receiver", "no-slash"]) == 2
    assert main(["hook-url", "--receiver", f"{NS}/{NAME}", "--name", NAME]) == 2
    assert main(["hook-url", "--name", NAME]) == 2
    assert "gitea-flux-bridge:" in capsys.readouterr().err


# -- settings, Gitea and the way back --------------------------------------------------------


def settings_for(tmp_path: Path, *, token_file: Path | None = None,
                 **overrides: Any) -> Settings:
    if token_file is None:
        token_file = tmp_path / "gitea-token"
        token_file.write_text("gitea-token\n")
    return load_settings(environ={}, overrides={"gitea": [
        {"name": "main", "url": GITEA, "token": {"file": str(token_file)},
         "hosts": ["gitea.example.com", "gitea-http.gitea.svc:3000"]}], **overrides})


async def doctor_with_gitea(settings: Settings, directory: Path, fake: FakeGitea,
                            base_url: str = "") -> list[Finding]:
    cluster = MemoryCluster.from_directory(ObjectStore(url_normaliser(settings)), directory)
    transport, _ = gitea_transport({"gitea.example.com": fake})
    facts = await gather(settings, cluster, source="manifests", base_url=base_url,
                         notifications=notification_facts_from(load_documents(directory)),
                         gitea_transport=transport)
    # Every request doctor made is one Gitea's API defines, but for its write probe: a
    # create-status request whose body is deliberately not JSON (Gitea answers 422, posting
    # nothing, when the token could post).
    assert [p for p in fake.problems if not p.endswith("statuses/{sha}: body is not JSON")] == []
    assert fake.posts == []  # doctor never posts a status
    return diagnose(facts)


def checks(findings: list[Finding], severity: str = "fail") -> dict[str, str]:
    return {f.check: f.message for f in findings if f.severity == severity}


async def test_missing_webhook_and_one_to_another_path_are_named(tmp_path: Path) -> None:
    directory = healthy(tmp_path / "m", token=(TOKEN + "\n").encode())
    settings = settings_for(tmp_path)
    fake = FakeGitea(token="gitea-token")
    assert "webhook-missing" in checks(await doctor_with_gitea(settings, directory, fake))

    # The webhook made from the NOTES recipe: the path without the newline.
    stripped = "/hook/" + sig.hook_digest(TOKEN, NAME, NS)
    fake.add_hook("platform", "fleet", "http://bridge.test" + stripped)
    found = checks(await doctor_with_gitea(settings, directory, fake, "http://bridge.test"))
    assert stripped in found["webhook-newline"]

    fake.hooks.clear()
    fake.add_hook("platform", "fleet", "http://bridge.test/hook/" + "0" * 64)
    found = checks(await doctor_with_gitea(settings, directory, fake))
    assert "/hook/" + "0" * 64 in found["webhook-missing"]

    stored = "/hook/" + sig.hook_digest(TOKEN + "\n", NAME, NS)
    fake.add_hook("platform", "fleet", "http://bridge.test" + stored)
    findings = await doctor_with_gitea(settings, directory, fake, "http://bridge.test")
    assert "webhook" in checks(findings, "ok")
    assert set(checks(findings)) == {"token-trailing-newline"}


async def test_an_organisation_webhook_counts(tmp_path: Path) -> None:
    fake = FakeGitea(token="gitea-token")
    fake.add_hook("platform", "fleet", "http://bridge.test/hook/" + sig.hook_digest(
        TOKEN, NAME, NS), org=True)
    findings = await doctor_with_gitea(settings_for(tmp_path), healthy(tmp_path / "m"), fake,
                                       "http://bridge.test")
    assert checks(findings) == {} and "webhook" in checks(findings, "ok")


async def test_hooks_that_cannot_be_listed_are_a_warning_not_a_verdict(tmp_path: Path) -> None:
    fake = FakeGitea(token="gitea-token", not_admin={("platform", "fleet")})
    findings = await doctor_with_gitea(settings_for(tmp_path), healthy(tmp_path / "m"), fake)
    assert "webhook-unchecked" in checks(findings, "warn") and checks(findings) == {}


async def test_a_gitea_token_without_write_access_is_named(tmp_path: Path) -> None:
    fake = FakeGitea(token="gitea-token", read_only={("platform", "fleet")})
    fake.add_hook("platform", "fleet", "http://x/hook/" + sig.hook_digest(TOKEN, NAME, NS))
    found = checks(await doctor_with_gitea(settings_for(tmp_path), healthy(tmp_path / "m"), fake))
    assert set(found) == {"status-permission"} and "write" in found["status-permission"]


async def test_a_gitea_token_without_the_write_scope_is_named(tmp_path: Path) -> None:
    fake = FakeGitea(token="gitea-token", scopes={"read:repository"})
    fake.add_hook("platform", "fleet", "http://x/hook/" + sig.hook_digest(TOKEN, NAME, NS))
    findings = await doctor_with_gitea(settings_for(tmp_path), healthy(tmp_path / "m"), fake)
    found = checks(findings)
    assert set(found) == {"status-permission"} and "write:repository" in found[
        "status-permission"]
    # A token without read:user still authenticates: the bridge does not need that scope.
    assert "gitea-auth" in checks(findings, "ok")


async def test_a_refused_gitea_token_and_an_unreachable_gitea_are_named(tmp_path: Path) -> None:
    directory, settings = healthy(tmp_path / "m"), settings_for(tmp_path)
    found = checks(await doctor_with_gitea(settings, directory, FakeGitea(token="other")))
    assert set(found) == {"gitea-auth"} and "401" in found["gitea-auth"]

    fake = FakeGitea(token="gitea-token")
    fake.version = None
    fake.fail = [httpx.ConnectError("refused")] * 3
    cluster = MemoryCluster.from_directory(ObjectStore(url_normaliser(settings)), directory)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    facts = await gather(settings, cluster, source="manifests",
                         notifications=notification_facts_from(load_documents(directory)),
                         gitea_transport=httpx.MockTransport(refuse))
    found = checks(diagnose(facts))
    assert set(found) == {"gitea-unreachable"} and GITEA in found["gitea-unreachable"]


async def test_a_missing_secret_file_is_named(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, token_file=tmp_path / "not-mounted")
    found = checks(await doctor_with_gitea(settings, healthy(tmp_path / "m"),
                                           FakeGitea(token="gitea-token")))
    assert "not-mounted" in found["secret-unreadable"] and "/readyz" in found[
        "secret-unreadable"]
    assert "not-mounted" in found["gitea-token"]


async def test_no_alert_forwarding_to_events_is_named(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    fake = FakeGitea(token="gitea-token")
    fake.add_hook("platform", "fleet",
                  "http://bridge.test/hook/" + sig.hook_digest(TOKEN, NAME, NS))
    alone = fleet(tmp_path / "a", receiver(), secret(TOKEN.encode()), SOURCE)
    assert set(checks(await doctor_with_gitea(settings, alone, fake))) == {"no-provider"}
    unused = fleet(tmp_path / "b", receiver(), secret(TOKEN.encode()), SOURCE, PROVIDER)
    assert set(checks(await doctor_with_gitea(settings, unused, fake))) == {"no-alert"}
    elsewhere = fleet(tmp_path / "c", receiver(), secret(TOKEN.encode()), SOURCE, PROVIDER, ALERT)
    # Told where the bridge is, doctor holds the Provider (and the webhook) to that address.
    assert "no-provider" in checks(await doctor_with_gitea(settings, elsewhere, fake,
                                                           "http://bridge.example.com"))
    assert checks(await doctor_with_gitea(settings, elsewhere, fake, "http://bridge.test")) == {}


async def test_a_source_on_an_unaliased_host_is_named_and_its_pushes_match_nothing(
        tmp_path: Path) -> None:
    """A GitRepository pulling through the in-cluster Service: Gitea's pushes name the public
    URL, which nothing maps to it."""
    inside = {**SOURCE, "spec": {**SOURCE["spec"],
                                 "url": "http://gitea-http.gitea.svc:3000/platform/fleet.git"}}
    directory = fleet(tmp_path / "m", receiver(), secret(TOKEN.encode()), inside, PROVIDER, ALERT)
    fake = FakeGitea(token="gitea-token")
    fake.add_hook("platform", "fleet", "http://x/hook/" + sig.hook_digest(TOKEN, NAME, NS))
    found = checks(await doctor_with_gitea(settings_for(tmp_path), directory, fake))
    assert set(found) == {"push-unmatched"} and "host_aliases" in found["push-unmatched"]
    # The service agrees: the push is taken and reconciles nothing.
    assert await push_to(directory, "/hook/" + sig.hook_digest(TOKEN, NAME, NS), TOKEN) == (
        202, None)

    aliased = settings_for(tmp_path, host_aliases={
        "gitea-http.gitea.svc:3000": "gitea.example.com"})
    assert checks(await doctor_with_gitea(aliased, directory, fake)) == {}


async def test_a_source_no_gitea_instance_serves_is_a_warning(tmp_path: Path) -> None:
    elsewhere = {**SOURCE, "spec": {**SOURCE["spec"],
                                    "url": "https://github.com/platform/fleet.git"}}
    directory = fleet(tmp_path / "m", receiver(), secret(TOKEN.encode()), elsewhere,
                      PROVIDER, ALERT)
    findings = await doctor_with_gitea(settings_for(tmp_path), directory,
                                       FakeGitea(token="gitea-token"))
    assert "github.com/platform/fleet" in checks(findings, "warn")["source-unserved"]
