"""The notify-flux action's script, run with bash against the real service (and a scripted peer).

The service runs as a subprocess on the in-memory cluster of examples/fleet, exactly as
`gitea-flux-bridge serve --manifests examples/fleet` does; the script is given only environment
variables, as the composite action (or a user outside Actions) gives it.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from receiver import signatures

ROOT = Path(__file__).resolve().parent.parent.parent
ACTION_DIR = ROOT / ".gitea" / "actions" / "notify-flux"
NOTIFY = ACTION_DIR / "notify.sh"
FLEET = ROOT / "examples" / "fleet"
TOKEN = "example-actions-token-change-me"  # the `actions` Receiver's token in examples/fleet
REPOSITORY = "https://gitea.example.com/teams/apps"
REF = "refs/heads/production"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def random_sha() -> str:
    # A fresh commit per run: two identical bodies signed in the same second are one signature,
    # and the bridge accepts each signature once.
    return secrets.token_hex(20)


def hook_path(tmp_path: Path) -> str:
    token_file = tmp_path / "actions-token"
    token_file.write_text(TOKEN)  # raw, as Flux hashes it
    out = subprocess.run(
        [sys.executable, "-m", "receiver.cli", "hook-url", "--name", "actions",
         "--namespace", "apps", "--token-file", str(token_file)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )
    return out.stdout.strip()


# -- the real service --------------------------------------------------------------------------


class Service:
    def __init__(self, base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.base_url = base_url
        self.process = process
        self.log = log

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        response = httpx.get(self.base_url + path, headers=headers or {}, timeout=10)
        return response.status_code, response.content

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include `labels`."""
        _, body = self.get("/metrics")
        total = 0.0
        for line in body.decode().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            sample, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in sample for k, v in labels.items()):
                total += float(value)
        return total



def start_service(tmp: Path, *extra: str, env: dict[str, str] | None = None,
                  manifests: Path = FLEET) -> Service:
    """The service on a free port. No drain unless asked for (`--drain-seconds` or env): a
    test's SIGTERM then stops it at once."""
    port = free_port()
    log = tmp / f"service-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "receiver.cli", "serve", "--manifests", str(manifests),
             "--port", str(port), *extra],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "GFB_SHUTDOWN__DRAIN_SECONDS": "0", **(env or {})},
        )
    service = Service(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"service exited with {process.returncode}: {log.read_text()}")
        try:
            status, _ = service.get("/readyz")
        except httpx.TransportError:
            status = 0
        if status == 200:
            return service
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"service not ready within 30 s: {log.read_text()}")


def stop_service(service: Service) -> None:
    service.process.terminate()
    try:
        service.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        service.process.kill()
        service.process.wait()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("bridge"))
    yield svc
    stop_service(svc)


# -- running the script ------------------------------------------------------------------------


def run_notify(env: dict[str, str], *, timeout: float = 60,
               bash_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    base = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR", "LANG") if k in os.environ}
    return subprocess.run(
        ["bash", *bash_args, str(NOTIFY)], env={**base, **env}, capture_output=True, text=True,
        timeout=timeout, cwd=ROOT,
    )


def actions_env(base_url: str, hook: str, **extra: str) -> dict[str, str]:
    """What the workflow environment plus the action's inputs give the script."""
    return {
        "GITHUB_SERVER_URL": "https://gitea.example.com",
        "GITHUB_REPOSITORY": "teams/apps",
        "GITHUB_REF": REF,
        "GITHUB_SHA": random_sha(),
        "FLUX_BRIDGE_URL": base_url,
        "FLUX_BRIDGE_HOOK": hook,
        "FLUX_BRIDGE_TOKEN": TOKEN,
        **extra,
    }


def first_json(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("{"):
            doc: dict[str, Any] = json.loads(line)
            return doc
    raise AssertionError(f"no JSON reply in {stdout!r}")


def target_names(reply: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(t["kind"], t["namespace"], t["name"]) for t in reply["targets"]}


# -- against the real service ------------------------------------------------------------------


def test_push_is_accepted_and_reply_lists_targets(service: Service, tmp_path: Path) -> None:
    outputs = tmp_path / "github-output"
    outputs.touch()
    env = actions_env(service.base_url, hook_path(tmp_path), GITHUB_OUTPUT=str(outputs))
    result = run_notify(env)
    assert result.returncode == 0, result.stderr
    reply = first_json(result.stdout)
    assert reply["commit"] == env["GITHUB_SHA"]
    assert reply["ref"] == REF
    assert reply["receiver"] == "apps/actions"
    assert target_names(reply) == {("GitRepository", "apps", "team-apps"),
                                   ("Kustomization", "apps", "team-apps")}
    # The human summary names each target with its state.
    assert re.search(r"GitRepository apps/team-apps: (queued|annotated)", result.stderr)
    assert "Kustomization apps/team-apps: queued" in result.stderr
    # The action's outputs.
    written = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert written == {"delivery": reply["delivery"], "outcome": "accepted"}
    # The delivery exists on the service and is readable with the token.
    status, body = service.get(f"/deliveries/{reply['delivery']}",
                               {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    assert json.loads(body)["commit"] == env["GITHUB_SHA"]
    assert TOKEN not in result.stdout + result.stderr


def test_hook_as_full_url_or_bare_digest(service: Service, tmp_path: Path) -> None:
    path = hook_path(tmp_path)
    full = run_notify(actions_env("", service.base_url + path))
    assert full.returncode == 0, full.stderr
    bare = run_notify(actions_env(service.base_url + "/", path.removeprefix("/hook/")))
    assert bare.returncode == 0, bare.stderr


def test_wrong_token_fails_and_annotates_nothing(tmp_path: Path) -> None:
    # A service of its own: no earlier push can still be annotating (consumer grace periods,
    # coalescing windows), so "nothing annotated" needs no pause to be true.
    service = start_service(tmp_path)
    try:
        env = actions_env(service.base_url, hook_path(tmp_path),
                          FLUX_BRIDGE_TOKEN="not-the-token")
        result = run_notify(env)
        assert result.returncode == 3
        assert "401" in result.stderr
        assert first_json(result.stdout) == {"error": "unauthorized"}
        assert "not-the-token" not in result.stdout + result.stderr
        # Every annotation follows an accepted delivery, and a delivery is counted before its
        # reply is sent: none accepted means none annotated, now or later.
        assert service.metric("gfb_hook_requests_total", receiver="apps/actions",
                              outcome="accepted") == 0
        assert service.metric("gfb_hook_requests_total", receiver="apps/actions",
                              outcome="unauthorized") == 1
        assert service.metric("gfb_targets_annotated_total") == 0
    finally:
        stop_service(service)


def test_unknown_hook_path_fails(service: Service, tmp_path: Path) -> None:
    result = run_notify(actions_env(service.base_url, "/hook/" + "0" * 64))
    assert result.returncode == 3
    assert "404" in result.stderr


def test_wait_runs_out_on_the_memory_cluster(service: Service, tmp_path: Path) -> None:
    # Nothing in the in-memory cluster ever reports the pushed revision: the wait runs out.
    outputs = tmp_path / "github-output"
    env = actions_env(service.base_url, hook_path(tmp_path), FLUX_BRIDGE_WAIT="2",
                      GITHUB_OUTPUT=str(outputs))
    started = time.monotonic()
    result = run_notify(env)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert 1.5 < elapsed < 20
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["targets"]  # the 202 reply
    progress = lines[1:]
    assert progress, result.stdout
    assert all(p["outcome"] == "in_progress" for p in progress)
    assert progress[-1].get("timeout") is True
    assert "ran out" in result.stderr
    assert "in_progress" in result.stderr
    written = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert written["outcome"] == "in_progress"
    assert TOKEN not in result.stdout + result.stderr


PATHS = [
    'deploy/with space/app "quoted".yaml',
    "deploy/back\\slash\\n-not-a-newline.yaml",
    "deploy/tab\there.yaml",
    "deploy/ünïcödé/€.yaml",
    "deploy/ctl\x01char.yaml",
    "deploy/{braces}[brackets],comma:colon.yaml",
]


def test_paths_are_json_escaped_and_accepted(service: Service, tmp_path: Path) -> None:
    hook = hook_path(tmp_path)
    # All together: the service accepts the body (202).
    env = actions_env(service.base_url, hook, FLUX_BRIDGE_PATHS="\n".join(PATHS) + "\n\n")
    result = run_notify(env)
    assert result.returncode == 0, result.stderr
    assert "(6 changed paths)" in result.stderr
    # One at a time: the service decoded each path exactly (its reason quotes the path).
    for path in PATHS:
        result = run_notify(actions_env(service.base_url, hook, FLUX_BRIDGE_PATHS=path + "\n"))
        assert result.returncode == 0, result.stderr
        reply = first_json(result.stdout)
        kustomization = next(t for t in reply["targets"] if t["kind"] == "Kustomization")
        assert kustomization["reason"] == f"changed files under its path: {path}"


def test_paths_outside_every_consumer_still_reconcile_the_source(
    service: Service, tmp_path: Path
) -> None:
    env = actions_env(service.base_url, hook_path(tmp_path), FLUX_BRIDGE_PATHS="README.md")
    result = run_notify(env)
    assert result.returncode == 0, result.stderr
    reply = first_json(result.stdout)
    assert ("GitRepository", "apps", "team-apps") in target_names(reply)


def test_push_for_another_branch_matches_nothing(service: Service, tmp_path: Path) -> None:
    env = actions_env(service.base_url, hook_path(tmp_path), GITHUB_REF="refs/heads/feature/x")
    result = run_notify(env)
    assert result.returncode == 0, result.stderr
    reply = first_json(result.stdout)
    assert reply["targets"] == []


# -- the script alone --------------------------------------------------------------------------


def dry_run(**env: str) -> tuple[bytes, str]:
    base = {k: os.environ[k] for k in ("PATH", "HOME", "TMPDIR") if k in os.environ}
    full = {
        **base,
        "FLUX_BRIDGE_DRY_RUN": "1",
        "FLUX_BRIDGE_URL": "http://bridge.invalid",
        "FLUX_BRIDGE_HOOK": "/hook/abc",
        "FLUX_BRIDGE_TOKEN": TOKEN,
        "FLUX_BRIDGE_REPOSITORY": REPOSITORY,
        "FLUX_BRIDGE_REF": REF,
        "FLUX_BRIDGE_SHA": "a" * 40,
        **env,
    }
    out = subprocess.run(["bash", str(NOTIFY)], env=full, capture_output=True, check=True)
    body, header, *_ = out.stdout.split(b"\n")
    return body, header.decode()


@pytest.mark.parametrize("token", [
    TOKEN,
    "6\\y%",  # bytes that XOR to NUL / '%' with the HMAC pads
    "k" * 64,  # exactly one block
    "k" * 65,  # longer than a block: hashed first
    "é€ ünicode ☃",
    "\x01\x7f\\\\ quotes ' \" and $dollars `ticks`",
])
def test_signature_is_rfc2104_hmac_sha256(token: str) -> None:
    body, header = dry_run(FLUX_BRIDGE_TOKEN=token)
    name, _, value = header.partition(": ")
    assert name == "X-Signature"
    parsed = signatures.parse_timestamped(value)
    assert parsed is not None
    timestamp, (given,) = parsed
    assert abs(timestamp - time.time()) < 10
    expected = hmac.new(token.encode(), str(timestamp).encode() + b"." + body,
                        hashlib.sha256).hexdigest()
    assert given == expected
    assert signatures.verify_timestamped(value, body, token, time.time()).ok


def test_body_from_the_workflow_environment() -> None:
    body, _ = dry_run(
        FLUX_BRIDGE_REPOSITORY="", FLUX_BRIDGE_REF="", FLUX_BRIDGE_SHA="",
        GITHUB_SERVER_URL="https://gitea.example.com/", GITHUB_REPOSITORY="teams/apps",
        GITHUB_REF="refs/tags/v1.2.3", GITHUB_SHA="b" * 64,
    )
    assert json.loads(body) == {"repository": "https://gitea.example.com/teams/apps",
                                "ref": "refs/tags/v1.2.3", "sha": "b" * 64}


def test_paths_split_on_newlines_or_spaces() -> None:
    body, _ = dry_run(FLUX_BRIDGE_PATHS="a.yaml  b/c.yaml\td.yaml")
    assert json.loads(body)["paths"] == ["a.yaml", "b/c.yaml", "d.yaml"]
    body, _ = dry_run(FLUX_BRIDGE_PATHS="with space.yaml\r\nother.yaml\n")
    assert json.loads(body)["paths"] == ["with space.yaml", "other.yaml"]
    body, _ = dry_run(FLUX_BRIDGE_PATHS="   ")
    assert "paths" not in json.loads(body)


def test_every_control_character_is_escaped() -> None:
    weird = "".join(chr(c) for c in range(1, 32)) + '"\\/\x7f é'
    body, _ = dry_run(FLUX_BRIDGE_REF=weird)
    assert all(b >= 0x20 for b in body), body
    assert json.loads(body)["ref"] == weird


def test_token_from_file_and_never_traced(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token-value\n")
    body, header = dry_run(FLUX_BRIDGE_TOKEN="", FLUX_BRIDGE_TOKEN_FILE=str(token_file))
    assert signatures.verify_timestamped(header.partition(": ")[2], body, "file-token-value",
                                         time.time()).ok
    # Even under `bash -x` the token never reaches the output.
    result = run_notify({
        "FLUX_BRIDGE_DRY_RUN": "1", "FLUX_BRIDGE_URL": "http://bridge.invalid",
        "FLUX_BRIDGE_HOOK": "/hook/abc", "FLUX_BRIDGE_TOKEN": "traced-token-value",
        "FLUX_BRIDGE_REPOSITORY": REPOSITORY, "FLUX_BRIDGE_REF": REF,
        "FLUX_BRIDGE_SHA": "c" * 40,
    }, bash_args=("-x",))
    assert result.returncode == 0
    assert "traced-token-value" not in result.stdout + result.stderr


@pytest.mark.parametrize(("env", "message"), [
    ({"FLUX_BRIDGE_TOKEN": ""}, "no token"),
    ({"FLUX_BRIDGE_HOOK": ""}, "no hook path"),
    ({"FLUX_BRIDGE_URL": "bridge.example.com"}, "base URL"),
    ({"FLUX_BRIDGE_WAIT": "soon"}, "wait-seconds"),
    ({"FLUX_BRIDGE_WAIT": "-1"}, "wait-seconds"),
    ({"GITHUB_SHA": "abc"}, "full commit id"),
    ({"GITHUB_REF": ""}, "no ref"),
    ({"GITHUB_REPOSITORY": ""}, "no repository"),
])
def test_bad_configuration_exits_2(env: dict[str, str], message: str) -> None:
    full = actions_env("http://127.0.0.1:9", "/hook/abc", **env)
    result = run_notify(full)
    assert result.returncode == 2
    assert message in result.stderr


def test_unreachable_bridge_exits_3() -> None:
    env = actions_env(f"http://127.0.0.1:{free_port()}", "/hook/abc", FLUX_BRIDGE_RETRIES="1")
    result = run_notify(env)
    assert result.returncode == 3
    assert "could not reach" in result.stderr


# -- against a scripted peer: the outcomes the in-memory cluster never reaches ---------------------


# In a scripted reply: the connection drops here, before the body promised is complete.
CUT: dict[str, Any] = {"cut": "here"}
# A scripted status: the connection closes without any reply.
NO_REPLY = 0


class ScriptedBridge(http.server.ThreadingHTTPServer):
    """Answers the hook with 202 and each GET /deliveries with the next scripted reply.

    Every request's timestamped signature is checked with the project's own verifier.
    """

    def __init__(self, replies: list[tuple[int, list[dict[str, Any]]]],
                 hook_status: list[int] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.replies = replies
        self.hook_status = hook_status or []
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, signature ok)
        self.bodies: list[bytes] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ScriptedBridge

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _check(self, body: bytes | None) -> bool:
        """A push's signature over `body`, or (`None`) a read's of delivery d-1."""
        header = self.headers.get("X-Signature", "")
        if body is None:
            verdict = signatures.verify_read(header, "d-1", TOKEN, time.time())
            # A read credential is never a push one.
            assert not signatures.verify_timestamped(header, b"", TOKEN, time.time()).ok
        else:
            verdict = signatures.verify_timestamped(header, body, TOKEN, time.time())
        self.server.requests.append((self.command, self.path, verdict.ok))
        return verdict.ok

    def _send(self, status: int, lines: list[dict[str, Any]], *, pause: float = 0.0) -> None:
        if status == NO_REPLY:
            self.close_connection = True
            return
        self.send_response(status)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Connection", "close")
        if CUT in lines:
            self.send_header("Content-Length", "1000000")  # more than will ever come
        self.end_headers()
        for doc in lines:
            if doc is CUT:
                self.wfile.write(b'{"delivery": "d-1", "outco')
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(json.dumps(doc).encode() + b"\n")
            self.wfile.flush()
            time.sleep(pause)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.bodies.append(body)
        if not self._check(body):
            self._send(401, [{"error": "unauthorized"}])
            return
        if self.server.hook_status:
            status = self.server.hook_status.pop(0)
            if status != 202:
                self._send(status, [{"error": "busy"}])
                return
        self._send(202, [{"delivery": "d-1", "commit": "x", "ref": REF, "receiver": "apps/actions",
                          "targets": [_target("queued")], "tracked": [], "skipped": []}])

    def do_GET(self) -> None:
        if not self._check(None) or not self.path.startswith("/deliveries/d-1?wait="):
            self._send(404, [{"error": "no such delivery"}])
            return
        status, lines = self.server.replies.pop(0) if self.server.replies else (404, [])
        self._send(status, lines, pause=0.05)


def _target(state: str, detail: dict[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                           "namespace": "apps", "name": "team-apps", "reason": "touched",
                           "role": "annotate", "state": state}
    if detail:
        out["detail"] = detail
    return out


def _progress(outcome: str, final: bool, state: str, **detail: str) -> dict[str, Any]:
    return {"delivery": "d-1", "outcome": outcome, "final": final,
            "targets": [_target(state, detail or None)]}


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedBridge]]:
    servers: list[ScriptedBridge] = []

    def make(replies: list[tuple[int, list[dict[str, Any]]]], **kwargs: Any) -> ScriptedBridge:
        server = ScriptedBridge(replies, **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def test_wait_succeeds_when_ready(scripted: Callable[..., ScriptedBridge],
                                  tmp_path: Path) -> None:
    bridge = scripted([(200, [_progress("in_progress", False, "annotated"),
                              _progress("in_progress", False, "progressing"),
                              _progress("ready", True, "ready")])])
    outputs = tmp_path / "out"
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT="30",
                                    GITHUB_OUTPUT=str(outputs)))
    assert result.returncode == 0, result.stderr
    assert "deployed" in result.stderr
    assert "Kustomization apps/team-apps: ready" in result.stderr
    assert [r[2] for r in bridge.requests] == [True, True]
    assert re.fullmatch(r"/deliveries/d-1\?wait=(29|30)", bridge.requests[1][1])
    written = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert written == {"delivery": "d-1", "outcome": "ready"}


@pytest.mark.parametrize("outcome", ["failed", "timed_out"])
def test_wait_fails_when_the_deploy_does(scripted: Callable[..., ScriptedBridge],
                                         outcome: str) -> None:
    bridge = scripted([(200, [_progress("in_progress", False, "annotated"),
                              _progress(outcome, True, outcome, reason="HealthCheckFailed",
                                        message="deployment/app not ready")])])
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT="30"))
    assert result.returncode == 1
    assert f"deployment {outcome}" in result.stderr
    assert "deployment/app not ready" in result.stderr


LATER_SHA = "2222222222222222222222222222222222222222"


def _superseded() -> dict[str, Any]:
    line = _progress("superseded", True, "skipped", reason="Superseded",
                     message=f"Flux went to {LATER_SHA[:12]} after a later push")
    line["supersededBy"] = LATER_SHA
    line["targets"][0]["supersededBy"] = LATER_SHA
    return line


def test_a_superseded_deployment_fails_the_step_unless_the_workflow_accepts_it(
        scripted: Callable[..., ScriptedBridge], tmp_path: Path) -> None:
    # Final, but Flux never reported this commit: a gate must not read it as "deployed".
    bridge = scripted([(200, [_progress("in_progress", False, "annotated"), _superseded()])])
    outputs = tmp_path / "out"
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT="30",
                                    GITHUB_OUTPUT=str(outputs)))
    assert result.returncode == 4, result.stderr
    assert "deployed" not in result.stderr.replace("was deployed", "")
    assert f"superseded: Flux went to {LATER_SHA}" in result.stderr
    written = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert written["outcome"] == "superseded"

    accepting = scripted([(200, [_superseded()])])
    result = run_notify(actions_env(accepting.url, "/hook/x", FLUX_BRIDGE_WAIT="30",
                                    FLUX_BRIDGE_ACCEPT_SUPERSEDED="true"))
    assert result.returncode == 0, result.stderr
    assert "accepted: accept-superseded is true" in result.stderr
    assert "deployed: every target" not in result.stderr


def _with_canary(line: dict[str, Any], state: str, **detail: str) -> dict[str, Any]:
    canary = {"apiVersion": "flagger.app/v1beta1", "kind": "Canary", "namespace": "apps",
              "name": "web", "role": "canary", "state": state}
    if detail:
        canary["detail"] = detail
    return {**line, "targets": [*line["targets"], canary]}


def test_the_wait_follows_canaries_when_asked_and_fails_on_a_rollback(
        scripted: Callable[..., ScriptedBridge]) -> None:
    # Manifests applied (the Kustomization is ready), the canary still analysing, then rolled
    # back: the step fails on the rollback, not at "applied".
    bridge = scripted([(200, [
        _with_canary(_progress("in_progress", False, "ready"), "reconciling",
                     reason="Progressing", message="weight 20%"),
        _with_canary(_progress("failed", True, "ready"), "failed", reason="RolledBack",
                     message="the canary was rolled back")])])
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT="30",
                                    FLUX_BRIDGE_WAIT_CANARIES="true"))
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(r"/deliveries/d-1\?wait=(29|30)&canaries=true", bridge.requests[1][1])
    assert "Canary apps/web: reconciling (Progressing): weight 20%" in result.stderr
    assert "Canary apps/web: failed (RolledBack): the canary was rolled back" in result.stderr
    assert "deployment failed" in result.stderr


def test_a_promoted_canary_ends_the_wait_deployed(scripted: Callable[..., ScriptedBridge]) -> None:
    bridge = scripted([(200, [_with_canary(_progress("ready", True, "ready"), "ready",
                                           reason="Promoted")])])
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT="30",
                                    FLUX_BRIDGE_WAIT_CANARIES="true"))
    assert result.returncode == 0, result.stderr
    assert "every canary promoted (1)" in result.stderr


def test_a_delivery_no_canary_follows_is_not_called_promoted(
        scripted: Callable[..., ScriptedBridge]) -> None:
    """Asked to wait for canaries, a delivery whose workloads have none: deployed, and said
    plainly that no canary followed it (never "every canary promoted")."""
    bridge = scripted([(200, [_progress("ready", True, "ready")])])
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT="30",
                                    FLUX_BRIDGE_WAIT_CANARIES="true"))
    assert result.returncode == 0, result.stderr
    assert "no Flagger canary follows it" in result.stderr
    assert "canary promoted" not in result.stderr


def test_without_the_input_the_wait_does_not_ask_for_canaries(
        scripted: Callable[..., ScriptedBridge]) -> None:
    bridge = scripted([(200, [_progress("ready", True, "ready")])])
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT="30"))
    assert result.returncode == 0, result.stderr
    assert "canaries" not in bridge.requests[1][1]
    bad = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT_CANARIES="maybe"))
    assert bad.returncode == 2 and "must be true or false" in bad.stderr


def test_accept_superseded_must_be_true_or_false() -> None:
    result = run_notify(actions_env("http://127.0.0.1:9", "/hook/x",
                                    FLUX_BRIDGE_ACCEPT_SUPERSEDED="yes please"))
    assert result.returncode == 2
    assert "must be true or false" in result.stderr


def test_wait_stops_at_the_first_failure_even_before_every_target_settles(
    scripted: Callable[..., ScriptedBridge]
) -> None:
    # The server ends the stream when one target failed while another still runs
    # (outcome failed, final false): the step must fail at once, not poll until the deadline.
    bridge = scripted([(200, [_progress("in_progress", False, "annotated"),
                              _progress("failed", False, "failed", reason="BuildFailed",
                                        message="kustomize build failed")])])
    started = time.monotonic()
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT="30"))
    assert result.returncode == 1
    assert "deployment failed" in result.stderr
    assert time.monotonic() - started < 15
    assert len([r for r in bridge.requests if r[0] == "GET"]) == 1


def test_wait_follows_again_after_a_server_side_timeout(
    scripted: Callable[..., ScriptedBridge]
) -> None:
    # The server caps ?wait= (deliveries.max_wait_seconds): a timeout line with time left on
    # the client's clock means ask again, freshly signed.
    bridge = scripted([
        (200, [_progress("in_progress", False, "annotated"),
               {"delivery": "d-1", "timeout": True, "outcome": "in_progress"}]),
        (503, [{"error": "caches are not synced yet"}]),
        (404, [{"error": "no such delivery"}]),  # another replica answered
        (200, [_progress("ready", True, "ready")]),
    ])
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT="60"))
    assert result.returncode == 0, result.stderr
    gets = [r for r in bridge.requests if r[0] == "GET"]
    assert len(gets) == 4
    assert all(ok for _, _, ok in gets)
    assert "HTTP 503" in result.stderr
    assert "not found on the replica that answered" in result.stderr


def test_a_draining_replica_sends_the_client_elsewhere(
    scripted: Callable[..., ScriptedBridge], tmp_path: Path
) -> None:
    # The replica following the delivery starts draining: its stream ends with the retry line
    # long before the wait is up. The next ask (through the same URL: the Service sends it to
    # another replica) sees the deployment through to ready.
    bridge = scripted([
        (200, [_progress("in_progress", False, "annotated"),
               {"delivery": "d-1", "retry": True, "reason": "draining"}]),
        (200, [_progress("in_progress", False, "progressing"), _progress("ready", True, "ready")]),
    ])
    outputs = tmp_path / "out"
    started = time.monotonic()
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT="120",
                                    GITHUB_OUTPUT=str(outputs)))
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    assert "going away (draining); asking again" in result.stderr
    assert "deployed" in result.stderr
    gets = [r for r in bridge.requests if r[0] == "GET"]
    assert len(gets) == 2 and all(ok for _, _, ok in gets)
    assert all(re.fullmatch(r"/deliveries/d-1\?wait=1[12][0-9]", path) for _, path, _ in gets)
    written = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
    assert written == {"delivery": "d-1", "outcome": "ready"}


@pytest.mark.parametrize(("broken", "message"), [
    # dropped mid-stream: curl reports the body cut short (exit 18)
    ([(200, [_progress("in_progress", False, "annotated"), CUT])],
     "the stream ended early (curl exit 18); asking again"),
    # closed before any reply (exit 52)
    ([(NO_REPLY, [])], "could not follow the delivery (HTTP none, curl exit 52)"),
    ([(503, [{"error": "draining"}]), (NO_REPLY, [])], "could not follow the delivery (HTTP 503"),
])
def test_a_dropped_connection_is_asked_again(
    scripted: Callable[..., ScriptedBridge], broken: list[tuple[int, list[dict[str, Any]]]],
    message: str,
) -> None:
    bridge = scripted([*broken, (200, [_progress("ready", True, "ready")])])
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT="120"))
    assert result.returncode == 0, result.stderr
    assert "deployed" in result.stderr
    assert message in result.stderr
    gets = [r for r in bridge.requests if r[0] == "GET"]
    assert len(gets) == len(broken) + 1 and all(ok for _, _, ok in gets)


def test_retry_lines_until_the_wait_runs_out_end_like_a_wait_that_ran_out(
    scripted: Callable[..., ScriptedBridge]
) -> None:
    retry = (200, [_progress("in_progress", False, "annotated"),
                   {"delivery": "d-1", "retry": True, "reason": "draining"}])
    bridge = scripted([retry] * 50)
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_WAIT="3"))
    assert result.returncode == 1
    assert "the wait of 3s ran out; outcome so far: in_progress" in result.stderr


def test_busy_bridge_is_retried_with_a_fresh_signature(
    scripted: Callable[..., ScriptedBridge]
) -> None:
    bridge = scripted([], hook_status=[503])
    result = run_notify(actions_env(bridge.url, "/hook/x", FLUX_BRIDGE_RETRIES="2"))
    assert result.returncode == 0, result.stderr
    posts = [r for r in bridge.requests if r[0] == "POST"]
    assert len(posts) == 2 and all(ok for _, _, ok in posts)
    assert bridge.bodies[0] == bridge.bodies[1]


# -- the action and workflow files ---------------------------------------------------------------


def test_action_metadata() -> None:
    action = yaml.safe_load((ACTION_DIR / "action.yml").read_text())
    assert set(action["inputs"]) >= {"url", "hook-path", "token", "paths", "wait-seconds"}
    assert action["inputs"]["wait-seconds"]["default"] == "0"
    assert action["runs"]["using"] == "composite"
    (step,) = action["runs"]["steps"]
    assert step["shell"] == "bash"
    assert "notify.sh" in step["run"]
    # Inputs reach the script as environment variables only, never spliced into its text.
    assert "inputs." not in step["run"]
    assert step["env"]["FLUX_BRIDGE_TOKEN"] == "${{ inputs.token }}"
    assert step["env"]["FLUX_BRIDGE_WAIT"] == "${{ inputs.wait-seconds }}"
    assert action["inputs"]["wait-for-canaries"]["default"] == "false"
    assert step["env"]["FLUX_BRIDGE_WAIT_CANARIES"] == "${{ inputs.wait-for-canaries }}"
    assert set(action["outputs"]) == {"delivery", "outcome"}


def test_ci_workflow_runs_the_project_tests() -> None:
    workflow = yaml.safe_load((ROOT / ".gitea" / "workflows" / "ci.yml").read_text())
    (job,) = workflow["jobs"].values()
    steps = job["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("actions/checkout@") for u in uses)
    python = next(s for s in steps if s.get("uses", "").startswith("actions/setup-python@"))
    assert str(python["with"]["python-version"]) == "3.11"
    assert any(s.get("run", "").strip() == "bash .ci/run" for s in steps)


def test_example_workflow_uses_the_signed_action() -> None:
    text = (ROOT / "examples" / "gitea-actions" / "deploy.yml").read_text()
    workflow = yaml.safe_load(text)
    steps = workflow["jobs"]["deploy"]["steps"]
    notify = steps[-1]
    assert notify["uses"].split("@")[0].endswith(".gitea/actions/notify-flux")
    assert notify["with"]["token"] == "${{ secrets.FLUX_RECEIVER_TOKEN }}"
    assert int(notify["with"]["wait-seconds"]) > 0
    # No unsigned curl step remains outside the comments.
    assert not any("curl" in s.get("run", "") for s in steps)


def test_shellcheck_is_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        # .ci/run installs it, so in CI a missing shellcheck is a failure, not a skip.
        assert not os.environ.get("CI"), "shellcheck must be installed in CI"
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run([shellcheck, "--severity=style", str(NOTIFY)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
