"""The pure checks: the two hook paths a token gives, and what makes doctor fail."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from receiver import signatures as sig
from receiver.doctor.checks import (
    access_findings,
    diagnose,
    hook_readings,
    problems,
    required_access,
)
from receiver.doctor.facts import AccessFacts, Facts, ReceiverFacts, TokenFacts
from receiver.push.hookindex import usable_token
from receiver.secret_files import read_secret_file


def facts_for(token: str) -> ReceiverFacts:
    return ReceiverFacts("ns", "r", "github", TokenFacts("ns/s", found=True, has_key=True,
                                                         value=token), matched=1)


@given(st.text(min_size=1, max_size=40))
def test_the_path_as_stored_is_flux_s_and_the_other_is_a_token_file_s(token: str) -> None:
    readings = hook_readings(facts_for(token))
    assert readings["as_stored"] == "/hook/" + sig.hook_digest(token, "r", "ns")
    assert ("without_newline" in readings) == token.endswith("\n")
    if token.endswith("\n"):
        # What `hook-url --token-file` computes from the Secret's bytes written to a file.
        assert readings["without_newline"] == "/hook/" + sig.hook_digest(token[:-1], "r", "ns")
        assert readings["without_newline"] != readings["as_stored"]


@given(st.text(min_size=1, max_size=40))
def test_doctor_fails_a_token_exactly_when_the_service_cannot_use_it_or_a_file_reads_it_apart(
        token: str) -> None:
    found = diagnose(Facts("test", receivers=(facts_for(token),)))
    assert bool(problems(found)) == (not usable_token(token) or token.endswith("\n"))


def test_a_token_file_reads_the_secret_without_its_newline(tmp_path: Path) -> None:
    (tmp_path / "token").write_bytes(b"abc\n")
    assert read_secret_file(tmp_path / "token") == "abc"


def test_a_denied_optional_grant_warns_and_a_required_one_fails() -> None:
    found = access_findings([
        AccessFacts("list", "image.toolkit.fluxcd.io", "imagepolicies", allowed=False,
                    optional=True, why="cache ImagePolicy objects"),
        AccessFacts("get", "", "secrets", "apps", allowed=False, why="read the Secrets"),
        AccessFacts("patch", "x", "y", allowed=None, detail="cannot ask the API server")])
    assert [(f.severity, f.check) for f in found] == [
        ("warn", "rbac-denied"), ("fail", "rbac-denied"), ("warn", "rbac-unchecked")]
    assert "get secrets in apps" in found[1].message


PLURALS = {"Canary": ("flagger.app", "canaries"), "Deployment": ("apps", "deployments"),
           "DaemonSet": ("apps", "daemonsets")}


def _plural(kind: str) -> tuple[str, str]:
    return PLURALS.get(kind, ("toolkit", kind.lower() + "s"))


def test_with_canaries_on_doctor_asks_for_the_canaries_and_their_workloads() -> None:
    def canary_needs(canaries: bool) -> set[tuple[str, str, str, str]]:
        needs = required_access(["apps", "web"], "flux-system", "lease", _plural, canaries)
        return {(a.verb, a.group, a.resource, a.namespace) for a in needs
                if a.group in ("flagger.app", "apps")}

    assert canary_needs(False) == set()
    assert canary_needs(True) == {
        (verb, group, resource, namespace) for verb in ("get", "list", "watch")
        for group, resource in PLURALS.values() for namespace in ("apps", "web")}
    # Denied, it fails doctor, naming the grant and the setting that needs it.
    needs = required_access(["apps"], "flux-system", "lease", _plural, True)
    answered = [replace(a, allowed=not (a.resource == "daemonsets" and a.verb == "watch"))
                for a in needs]
    found = access_findings(answered)
    assert [(f.severity, f.check) for f in found] == [("fail", "rbac-denied")]
    assert found[0].message.startswith("the bridge may not watch daemonsets.apps in apps")
    assert "statuses.canaries" in found[0].message
    assert problems(found)


def test_a_provider_whose_address_is_in_a_secret_is_not_called_missing() -> None:
    from receiver.doctor.checks import notification_findings
    from receiver.doctor.facts import AlertFacts, NotificationFacts, ProviderFacts

    hidden = NotificationFacts(providers=(ProviderFacts("ns", "p", "generic-hmac", "",
                                                        address_in_secret=True),),
                               alerts=(AlertFacts("ns", "a", "p"),))
    (finding,) = notification_findings(hidden, True, "")
    assert finding.severity == "warn" and "ns/p" in finding.message
    absent = NotificationFacts(providers=(ProviderFacts("ns", "p", "generic", "https://x/y"),))
    assert notification_findings(absent, True, "")[0].check == "no-provider"
