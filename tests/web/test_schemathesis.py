"""schemathesis against a live `gitea-flux-bridge serve`, driven by the served OpenAPI document.

Every phase schemathesis has for this API runs: explicit examples, coverage (boundary values,
undeclared methods, missing headers), fuzzing (positive and negative data) and stateful (a 202's
link to its delivery). Checks: no 5xx, every status code, content type, header and JSON body as
documented, and 405 with `Allow` for an undeclared method. Budget: at most MAX_EXAMPLES cases per
operation and phase and MAX_SECONDS in all; the test prints how many cases ran.

Credentials: the hook and delivery operations carry the example `actions` Receiver's bearer
token, and half of the hook cases go to a real Receiver path (the `actions` one, or the `github`
one where the bearer does not count), so routing and the 202 are exercised, not only the 404.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from receiver.signatures import hook_digest
from tests.product.test_action_script import start_service, stop_service

ACTIONS_TOKEN = "example-actions-token-change-me"  # examples/fleet/receivers.yaml
GITEA_TOKEN = "example-webhook-token-change-me"
EVENTS_TOKEN = "schemathesis-events-token"
MAX_EXAMPLES = 25
MAX_SECONDS = 40
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance", "unsupported_method",
          "allow_header_conformance")


def _config(events_token: str) -> str:
    digests = [hook_digest(ACTIONS_TOKEN, "actions", "apps"),
               hook_digest(GITEA_TOKEN, "gitea-push", "flux-system")]
    return "\n".join([
        "[dictionaries.digests]",
        "values = " + json.dumps(digests),
        "",
        "[[operations]]",
        'include-operation-id = ["hook", "delivery"]',
        f'headers = {{ Authorization = "Bearer {ACTIONS_TOKEN}" }}',
        'parameters = { "path.digest" = { dictionary = "digests", probability = 0.5 } }',
        "",
        "[[operations]]",
        'include-operation-id = "event"',
        f'headers = {{ Authorization = "Bearer {events_token}" }}',
        "",
    ])


def test_schemathesis_finds_nothing_against_a_live_serve(
        tmp_path: Path, pytestconfig: pytest.Config) -> None:
    token_file = tmp_path / "events-token"
    token_file.write_text(EVENTS_TOKEN + "\n")
    service = start_service(tmp_path, env={
        "GFB_EVENTS__BEARER_TOKEN__FILE": str(token_file),
        # A followed delivery never settles on the in-memory cluster: keep `?wait` short.
        "GFB_DELIVERIES__MAX_WAIT_SECONDS": "1",
    })
    try:
        config = tmp_path / "schemathesis.toml"
        config.write_text(_config(EVENTS_TOKEN))
        report = tmp_path / "report.json"
        command = [
            sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
            "run", f"{service.base_url}/openapi.json",
            "--checks", ",".join(CHECKS),
            "--max-examples", str(MAX_EXAMPLES), "--max-time", str(MAX_SECONDS),
            "--workers", "1", "--request-timeout", "10",
            "--generation-database", "none", "--suppress-health-check", "all",
            "--report", "json", "--report-json-path", str(report),
        ]
        started = time.monotonic()
        run = subprocess.run(command, capture_output=True, text=True, timeout=MAX_SECONDS + 60,
                             cwd=tmp_path)
    finally:
        stop_service(service)
    seconds = time.monotonic() - started
    output = run.stdout[-20_000:] + run.stderr[-5_000:]
    assert run.returncode == 0, output
    cases = _case_count(report, run.stdout)
    _report(pytestconfig, f"schemathesis: {cases} cases in {seconds:.0f}s against a live serve")
    assert cases >= 200, output  # every operation was really exercised


def _report(config: pytest.Config, line: str) -> None:
    """A line in the terminal output (CI's log) even while output is captured."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + line)
    else:
        print(line)


def _case_count(report: Path, stdout: str) -> int:
    """Generated cases, from the JSON report (or the summary line if its shape changed)."""
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        data = None
    found = _find_int(data, "generated") if data is not None else None
    if found is not None:
        return found
    for line in stdout.splitlines():
        words = line.split()
        if "generated," in words:
            return int(words[words.index("generated,") - 1])
    pytest.fail("schemathesis reported no case count:\n" + stdout[-5_000:])


def _find_int(data: object, key: str) -> int | None:
    if isinstance(data, dict):
        if isinstance(data.get(key), int):
            return int(data[key])
        values: list[object] = list(data.values())
    elif isinstance(data, list):
        values = list(data)
    else:
        return None
    for value in values:
        found = _find_int(value, key)
        if found is not None:
            return found
    return None
