"""The pure checks: the two hook paths a token gives, and what makes doctor fail."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from receiver import signatures as sig
from receiver.config import read_secret_file
from receiver.doctor.checks import access_findings, diagnose, hook_readings, problems
from receiver.doctor.facts import AccessFacts, Facts, ReceiverFacts, TokenFacts
from receiver.push.hookindex import usable_token


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
