"""The local demo: `serve --manifests DIR --simulate-flux` marks annotated objects reconciled
at the pushed commit, so the notify-flux action's wait ends `ready` without a cluster. Run as
the README's quickstart runs it: the command as a subprocess, the action's script against it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import tests.product.test_action_script as action
from receiver import signatures as sig
from tests.product.test_action_script import start_service

ROOT = Path(__file__).resolve().parent.parent.parent
NOTIFY = ROOT / ".gitea" / "actions" / "notify-flux" / "notify.sh"
SHA = "5394cb7f48ab0b1c2d3e4f5a6b7c8d9e0f1a2b3c"
ACTIONS_TOKEN = "example-actions-token-change-me"  # examples/fleet/receivers.yaml


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from receiver.cli import main; sys.exit(main())",
            *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GFB_", "FLUX_BRIDGE_"))}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    # The same start as every served test: examples/fleet, a free port, waits for /readyz.
    service = start_service(tmp_path, "--simulate-flux", "--simulate-delay", "0.2")
    try:
        yield service.base_url, service.process, service.log
    finally:
        if service.process.poll() is None:
            service.process.kill()
            service.process.wait()


def test_a_push_goes_from_in_progress_to_ready_with_the_actions_wait(
    demo: tuple[str, subprocess.Popen[bytes], Path], tmp_path: Path
) -> None:
    url, process, log_path = demo
    ready = httpx.get(f"{url}/readyz", timeout=2).json()
    assert "simulated" in ready["simulation"]
    token = tmp_path / "token"
    token.write_text(ACTIONS_TOKEN)
    hook = subprocess.run(
        _cli("hook-url", "--name", "actions", "--namespace", "apps", "--token-file", str(token)),
        cwd=ROOT, env=_env(), capture_output=True, text=True, check=True).stdout.strip()
    env = _env() | {
        "FLUX_BRIDGE_URL": url, "FLUX_BRIDGE_HOOK": hook, "FLUX_BRIDGE_TOKEN_FILE": str(token),
        "FLUX_BRIDGE_REPOSITORY": "https://gitea.example.com/teams/apps",
        "FLUX_BRIDGE_REF": "refs/heads/production", "FLUX_BRIDGE_SHA": SHA,
        "FLUX_BRIDGE_WAIT": "60"}
    notify = subprocess.run(["bash", str(NOTIFY)], env=env, capture_output=True, text=True,
                            timeout=90, cwd=tmp_path)
    assert notify.returncode == 0, notify.stdout + notify.stderr
    assert "outcome: ready" in notify.stderr
    assert f"deployed: every target is Ready at {SHA}" in notify.stderr
    assert "Kustomization apps/team-apps: ready" in notify.stderr
    # The progress went through a state before ready.
    assert "progress: in_progress" in notify.stderr

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    simulated = [line for line in lines if line["msg"].startswith("simulated Flux")]
    assert [line["msg"] for line in simulated] == [
        "simulated Flux: source fetched", "simulated Flux: applied"]
    assert all(line["simulation"] is True for line in simulated)
    assert simulated[0]["revision"] == f"production@sha1:{SHA}"
    assert any(line["msg"].startswith("Flux is simulated") for line in lines)
    # A routine shutdown is clean: no error lines, nothing under uvicorn.error.
    assert not [line for line in lines if line["level"] in ("error", "critical")]
    assert not [line for line in lines if line["logger"] == "uvicorn.error"]
    assert "Application shutdown complete." in [line["msg"] for line in lines]


def test_simulation_needs_manifests() -> None:
    result = subprocess.run(_cli("serve", "--simulate-flux"), cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--simulate-flux needs --manifests" in result.stderr + result.stdout


GITEA_APPS_TOKEN = "gitea-apps-token-for-this-test"
SECOND_RECEIVER = f"""
# Gitea's own push webhook for the same repository: the setup that has both.
apiVersion: notification.toolkit.fluxcd.io/v1
kind: Receiver
metadata: {{name: gitea-apps, namespace: apps}}
spec:
  type: github
  events: [push]
  secretRef: {{name: gitea-apps-token}}
  resources:
    - kind: GitRepository
      name: team-apps
---
apiVersion: v1
kind: Secret
metadata: {{name: gitea-apps-token, namespace: apps}}
stringData: {{token: {GITEA_APPS_TOKEN}}}
"""


def test_the_webhook_for_the_same_commit_does_not_make_the_wait_say_deployed_early(
        tmp_path: Path) -> None:
    """The notify step pushes S and waits; Gitea's webhook for the same S arrives through a
    second Receiver while Flux has not fetched anything. The wait must end only after
    (simulated) Flux fetched and applied S: it once said "deployed" 0.4 s later."""
    manifests = tmp_path / "manifests"
    shutil.copytree(ROOT / "examples" / "fleet", manifests)
    (manifests / "second-receiver.yaml").write_text(SECOND_RECEIVER)
    service = action.start_service(tmp_path, "--simulate-flux", "--simulate-delay", "2",
                                   manifests=manifests)
    try:
        token = tmp_path / "token"
        token.write_text(ACTIONS_TOKEN)
        hook = subprocess.run(
            _cli("hook-url", "--name", "actions", "--namespace", "apps", "--token-file",
                 str(token)), cwd=ROOT, env=_env(), capture_output=True, text=True,
            check=True).stdout.strip()
        env = _env() | {
            "FLUX_BRIDGE_URL": service.base_url, "FLUX_BRIDGE_HOOK": hook,
            "FLUX_BRIDGE_TOKEN_FILE": str(token),
            "FLUX_BRIDGE_REPOSITORY": "https://gitea.example.com/teams/apps",
            "FLUX_BRIDGE_REF": "refs/heads/production", "FLUX_BRIDGE_SHA": SHA,
            "FLUX_BRIDGE_WAIT": "60"}
        notify = subprocess.Popen(["bash", str(NOTIFY)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        assert notify.stdout is not None
        accepted = json.loads(notify.stdout.readline())  # the 202 reply, before the wait
        assert accepted["commit"] == SHA
        body = json.dumps({
            "ref": "refs/heads/production", "before": "0" * 40, "after": SHA,
            "total_commits": 1, "commits": [{"id": SHA, "added": [], "removed": [],
                                             "modified": ["apps/web.yaml"]}],
            "repository": {"full_name": "teams/apps",
                           "clone_url": "https://gitea.example.com/teams/apps.git"}}).encode()
        second = httpx.post(
            service.base_url + "/hook/" + sig.hook_digest(GITEA_APPS_TOKEN, "gitea-apps", "apps"),
            content=body, timeout=10, headers={
                "Content-Type": "application/json", "X-Gitea-Event": "push",
                "X-GitHub-Event": "push", "X-Gitea-Delivery": "second-receiver-1",
                "X-Hub-Signature-256": "sha256=" + sig.hmac_hex("sha256", GITEA_APPS_TOKEN,
                                                                body)})
        assert second.status_code == 202, second.text
        out, err = notify.communicate(timeout=90)
        # Read at the moment the wait ended: what had simulated Flux done by then?
        lines = [json.loads(line) for line in service.log.read_text().splitlines()
                 if line.startswith("{")]
        assert notify.returncode == 0, out + err
        assert f"deployed: every target is Ready at {SHA}" in err
        fetched = [line for line in lines if line["msg"] == "simulated Flux: source fetched"
                   and SHA in line.get("revision", "")]
        applied = [line for line in lines if line["msg"] == "simulated Flux: applied"
                   and line.get("object") == "Kustomization/apps/team-apps"]
        assert fetched and applied, "the wait said deployed before Flux fetched and applied"
    finally:
        action.stop_service(service)
