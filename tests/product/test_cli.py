"""The commands, run as a user would run them."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from receiver import signatures as sig
from receiver.cli import EXIT_OK, EXIT_PAYLOAD, EXIT_USAGE, main
from tests import gitea_payloads as gp
from tests.conftest import FLEET

REPO = Path(__file__).parent.parent.parent


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_prints_targets_tracked_and_skipped(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    payload = tmp_path / "push.json"
    doc = gp.push("platform/fleet", "refs/heads/main",
                  [gp.commit("platform/fleet", "m", modified=["clusters/eu-west/monitoring/a.yaml"])])
    payload.write_bytes(gp.gitea_bytes(doc))
    code, out, _ = run(capsys, "plan", "--manifests", str(FLEET), "--payload", str(payload),
                       "--receiver", "flux-system/gitea")
    assert code == EXIT_OK
    plan = json.loads(out)
    assert plan["receiver"] == "flux-system/gitea"
    assert [(t["kind"], t["name"]) for t in plan["targets"]] == [
        ("GitRepository", "flux-system"), ("Kustomization", "monitoring")]
    assert set(plan["targets"][0]) == {"apiVersion", "kind", "namespace", "name", "reason"}
    assert {t["name"] for t in plan["skipped"]} >= {"infrastructure", "fleet-staging"}


def test_plan_needs_receiver_when_several(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = tmp_path / "p.json"
    payload.write_text("{}")
    code, _, err = run(capsys, "plan", "--manifests", str(FLEET), "--payload", str(payload))
    assert code == EXIT_USAGE and "--receiver" in err


def test_plan_bad_payload_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = tmp_path / "p.json"
    payload.write_text(json.dumps({"repository": {}, "ref": "main", "after": "a" * 40}))
    code, _, err = run(capsys, "plan", "--manifests", str(FLEET), "--payload", str(payload),
                       "--receiver", "flux-system/gitea")
    assert code == EXIT_PAYLOAD and "payload rejected" in err
    # A body that is not JSON is no push, not an error (as the service, as Flux's Receiver).
    payload.write_text("{not json")
    code, out, _ = run(capsys, "plan", "--manifests", str(FLEET), "--payload", str(payload),
                       "--receiver", "flux-system/gitea")
    assert code == EXIT_OK and json.loads(out)["note"] == "no push details: the body is not JSON"


def test_plan_bad_manifests(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yaml").write_text("kind: [unterminated")
    code, _, err = run(capsys, "plan", "--manifests", str(tmp_path), "--payload", "-")
    assert code == EXIT_USAGE and "bad.yaml" in err


def test_hook_url_matches_flux(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "t"
    token.write_text("gitea-secret-token")
    code, out, _ = run(capsys, "hook-url", "--name", "gitea", "--namespace", "flux-system",
                       "--token-file", str(token), "--base-url", "https://bridge.example.com/")
    assert code == EXIT_OK
    assert out.strip() == "https://bridge.example.com/hook/" + sig.hook_digest(
        "gitea-secret-token", "gitea", "flux-system")
    # `echo token > file` leaves a newline: every tool drops it, as the service does.
    token.write_text("gitea-secret-token\n")
    _, out, _ = run(capsys, "hook-url", "--name", "gitea", "--namespace", "flux-system",
                    "--token-file", str(token))
    assert out.strip() == "/hook/" + sig.hook_digest("gitea-secret-token", "gitea", "flux-system")


@pytest.mark.parametrize(("scheme", "header"), [
    ("timestamped", "X-Signature: t=1800000000,v1="), ("generic-hmac", "X-Signature: sha256="),
    ("gitea", "X-Gitea-Signature: "), ("hub", "X-Hub-Signature-256: sha256="),
])
def test_sign_prints_verifiable_headers(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        scheme: str, header: str) -> None:
    token, body = tmp_path / "t", tmp_path / "b"
    token.write_text("tok")
    body.write_bytes(b'{"a": 1}')
    code, out, _ = run(capsys, "sign", "--scheme", scheme, "--token-file", str(token),
                       "--body-file", str(body), "--timestamp", "1800000000")
    assert code == EXIT_OK
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert lines["Content-Type"] == "application/json"
    assert any(line.startswith(header) for line in out.splitlines())
    headers = {k.lower(): v for k, v in lines.items()}
    checks = {
        "timestamped": lambda: sig.verify_timestamped(headers["x-signature"], b'{"a": 1}', "tok",
                                                      1800000000).ok,
        "generic-hmac": lambda: sig.verify_generic_hmac(headers, b'{"a": 1}', "tok").ok,
        "gitea": lambda: sig.verify_gitea(headers, b'{"a": 1}', "tok").ok,
        "hub": lambda: sig.verify_gitea(headers, b'{"a": 1}', "tok").ok,
    }
    assert checks[scheme]()


def test_serve_rejects_a_bad_status_template_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("statuses: {context_template: 'flux/{cluster}/{commit}'}\n")
    proc = subprocess.run([sys.executable, "-m", "receiver.cli", "serve", "--config", str(config),
                           "--manifests", str(FLEET)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == EXIT_USAGE
    assert "statuses.context_template" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_rejects_bad_config_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("listen: {port: 99999}\nrate_limit: {burst: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "receiver.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == EXIT_USAGE
    assert "listen.port" in proc.stderr and "rate_limit.burst" in proc.stderr


def test_sign_read_prints_a_read_credential_only(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "t"
    token.write_text("tok")
    code, out, _ = run(capsys, "sign", "--scheme", "read", "--delivery", "d-1", "--token-file",
                       str(token), "--timestamp", "1800000000")
    assert code == EXIT_OK
    name, _, value = out.strip().partition(": ")
    assert name == "X-Signature"
    assert sig.verify_read(value, "d-1", "tok", 1800000000).ok
    assert not sig.verify_timestamped(value, b"", "tok", 1800000000).ok
    code, _, err = run(capsys, "sign", "--delivery", "d-1", "--token-file", str(token))
    assert code == EXIT_USAGE and "--scheme read" in err
    code, _, err = run(capsys, "sign", "--scheme", "read", "--token-file", str(token))
    assert code == EXIT_USAGE


# -- token files: one reader for every tool ---------------------------------------

NOTIFY = REPO / ".gitea" / "actions" / "notify-flux" / "notify.sh"


def notify_token_signature(token_file: Path, timestamp_check: str) -> bool:
    """Does notify-flux, reading `token_file`, sign as `timestamp_check`'s token would?"""
    env = {"PATH": "/usr/bin:/bin", "FLUX_BRIDGE_DRY_RUN": "1",
           "FLUX_BRIDGE_URL": "http://bridge.invalid", "FLUX_BRIDGE_HOOK": "/hook/abc",
           "FLUX_BRIDGE_TOKEN_FILE": str(token_file),
           "FLUX_BRIDGE_REPOSITORY": "https://gitea.example.com/teams/apps",
           "FLUX_BRIDGE_REF": "refs/heads/main", "FLUX_BRIDGE_SHA": "a" * 40}
    out = subprocess.run(["bash", str(NOTIFY)], env=env, capture_output=True, check=True,
                         timeout=60).stdout
    body, header, *_ = out.split(b"\n")
    value = header.decode().partition(": ")[2]
    return sig.verify_timestamped(value, body, timestamp_check, float(value[2:12])).ok


@pytest.mark.parametrize(("content", "token"), [
    (b"tok", "tok"),
    (b"tok\n", "tok"),  # echo tok > file
    (b"tok\n\n", "tok\n"),  # only one newline is dropped
    (b" tok ", " tok "),  # nothing else is trimmed
])
def test_every_tool_reads_a_token_file_the_same_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, token: str
) -> None:
    from receiver.secret_files import read_secret_file
    from receiver.status.badges import mint_badge_token

    path = tmp_path / "token"
    path.write_bytes(content)
    # The service's `{file: ...}` settings.
    assert read_secret_file(path) == token
    # hook-url
    _, out, _ = run(capsys, "hook-url", "--name", "n", "--namespace", "ns", "--token-file",
                    str(path))
    assert out.strip() == "/hook/" + sig.hook_digest(token, "n", "ns")
    # sign
    _, out, _ = run(capsys, "sign", "--token-file", str(path), "--timestamp", "1800000000")
    value = out.strip().partition(": ")[2]
    assert sig.verify_timestamped(value, b"", token, 1800000000).ok
    # badge-url: the badge the service would verify with the key it reads from the same file.
    _, out, _ = run(capsys, "badge-url", "--key-file", str(path), "--owner", "o", "--repo", "r",
                    "--branch", "main", "--base-url", "https://b")
    query = parse_qs(urlsplit(out.strip()).query)
    assert query["token"] == [mint_badge_token(token, "o", "r", "main")]
    # notify-flux
    assert notify_token_signature(path, token)


def test_token_file_dash_reads_standard_input(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from-stdin\n")))
    code, out, _ = run(capsys, "hook-url", "--name", "n", "--namespace", "ns",
                       "--token-file", "-")
    assert code == EXIT_OK
    assert out.strip() == "/hook/" + sig.hook_digest("from-stdin", "n", "ns")
    code, _, err = run(capsys, "sign", "--token-file", "-", "--body-file", "-")
    assert code == EXIT_USAGE and "standard input" in err


def test_an_unreadable_token_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "hook-url", "--name", "n", "--namespace", "ns", "--token-file",
                       str(tmp_path / "missing"))
    assert code == EXIT_USAGE and "cannot read token file" in err
    bad = tmp_path / "bad"
    bad.write_bytes(b"\xff\xfe")
    code, _, err = run(capsys, "hook-url", "--name", "n", "--namespace", "ns", "--token-file",
                       str(bad))
    assert code == EXIT_USAGE and "not UTF-8" in err


FILTERED_RECEIVER = """
apiVersion: notification.toolkit.fluxcd.io/v1
kind: Receiver
metadata: {name: filtered, namespace: flux-system}
spec:
  type: generic-hmac
  secretRef: {name: hmac-token}
  resourceFilter: 'req.env == "prod"'
  resources:
    - kind: GitRepository
      name: flux-system
"""


def test_plan_applies_the_resource_filter_as_the_service_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifests = tmp_path / "fleet"
    shutil.copytree(FLEET, manifests)
    (manifests / "filtered.yaml").write_text(FILTERED_RECEIVER)
    payload = tmp_path / "push.json"

    def plan(**fields: str) -> tuple[int, str, str]:
        payload.write_text(json.dumps({
            "repository": "https://gitea.example.com/platform/fleet", "ref": "refs/heads/main",
            "sha": "5" * 40, **fields}))
        return run(capsys, "plan", "--manifests", str(manifests), "--payload", str(payload),
                   "--receiver", "flux-system/filtered")

    code, out, _ = plan(env="prod")
    assert code == EXIT_OK and [t["name"] for t in json.loads(out)["targets"]] == ["flux-system"]
    code, out, _ = plan(env="staging")
    doc = json.loads(out)
    assert code == EXIT_OK and doc["targets"] == []
    assert {(s["name"], s["reason"]) for s in doc["skipped"]} >= {
        ("flux-system", "resourceFilter is false")}
    # A filter that reads what the request lacks fails it, as the service answers 422.
    code, _, err = plan()
    assert code == EXIT_PAYLOAD and "resourceFilter could not be evaluated" in err


# -- as a user types them: the real command in its own process -----------------------------------


def command(*argv: str, env: dict[str, str] | None = None, prelude: str = ""
            ) -> subprocess.CompletedProcess[str]:
    """`gitea-flux-bridge ARGV...` in a child process (`prelude`: Python run before it)."""
    code = f"import sys\n{prelude}\nfrom receiver.cli import main\nsys.exit(main())"
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("GFB_") and k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          cwd=REPO, env={**base, **(env or {})}, timeout=60, check=False)


def one_line_usage_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == EXIT_USAGE, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "[Errno" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize(("argv", "usage"), [
    (["serve", "--manifest", str(FLEET)], "--manifest"),
    (["hook-url", "--name", "n", "--namespace", "ns", "--token-file", "t", "--base", "b"],
     "--base"),
    (["sign", "--token-file", "t", "--body", "b"], "--body"),
    (["plan", "--manifests", str(FLEET), "--payload", "p", "--rec", "apps/actions"], "--rec"),
])
def test_an_abbreviated_option_is_refused_not_guessed(argv: list[str], usage: str) -> None:
    result = command(*argv)
    assert result.returncode == EXIT_USAGE, (result.stdout, result.stderr)
    assert f"unrecognized arguments: {usage}" in result.stderr
    assert "started" not in result.stdout + result.stderr


def test_a_file_argument_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    token = tmp_path / "token"
    token.write_text("tok")
    cases = {
        ("hook-url", "--name", "n", "--namespace", "ns", "--token-file", str(missing)):
            f"cannot read token file {missing}: No such file or directory",
        ("sign", "--token-file", str(missing)):
            f"cannot read token file {missing}: No such file or directory",
        ("sign", "--token-file", str(token), "--body-file", str(missing)):
            f"cannot read body file {missing}: No such file or directory",
        ("sign", "--token-file", str(tmp_path)):
            f"cannot read token file {tmp_path}: Is a directory",
        ("badge-url", "--key-file", str(missing), "--owner", "o", "--repo", "r",
         "--branch", "main", "--base-url", "https://b"):
            f"cannot read key file {missing}: No such file or directory",
        ("plan", "--manifests", str(FLEET), "--receiver", "apps/actions",
         "--payload", str(missing)):
            f"cannot read payload file {missing}: No such file or directory",
        ("serve", "--config", str(missing)):
            f"cannot read configuration file {missing}: No such file or directory",
    }
    for argv, message in cases.items():
        assert one_line_usage_error(command(*argv)) == f"gitea-flux-bridge: {message}", argv


def test_a_bad_environment_variable_is_named_without_its_value(tmp_path: Path) -> None:
    line = one_line_usage_error(command("serve", "--manifests", str(FLEET),
                                        env={"GFB_LOG_LEVEL": "s3cret-looking"}))
    assert "log_level (environment variable GFB_LOG_LEVEL)" in line, line
    assert "s3cret-looking" not in line
    line = one_line_usage_error(command("serve", "--manifests", str(FLEET),
                                        env={"GFB_LISTEN__PORTT": "9000"}))
    assert "listen.portt (environment variable GFB_LISTEN__PORTT): Extra inputs" in line, line
    # A flag wins over the variable: the error is the flag's, and says no variable.
    line = one_line_usage_error(command("serve", "--manifests", str(FLEET), "--port", "70000",
                                        env={"GFB_LISTEN__PORT": "9000"}))
    assert "listen.port:" in line and "environment" not in line, line
    missing = tmp_path / "config.yaml"
    line = one_line_usage_error(command("serve", env={"GFB_CONFIG": str(missing)}))
    assert f"{missing} (environment variable GFB_CONFIG): No such file" in line, line


# Without the `kube` extra: no Kubernetes client installed.
NO_KUBERNETES = "sys.modules['kubernetes'] = None"


@pytest.mark.parametrize("argv", [["serve"], ["doctor"],
                                  ["hook-url", "--receiver", "apps/actions"]])
def test_reading_a_cluster_without_the_kube_extra_names_the_extra(argv: list[str]) -> None:
    line = one_line_usage_error(command(*argv, prelude=NO_KUBERNETES))
    assert "pip install 'gitea-flux-bridge[kube]'" in line, line
    assert "kubernetes is not installed" in line, line


def test_the_demo_and_the_tools_need_no_kubernetes_client(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("example-actions-token-change-me")
    payload = tmp_path / "push.json"
    payload.write_text(json.dumps({"repository": "https://gitea.example.com/teams/apps",
                                   "ref": "refs/heads/production", "sha": "a" * 40}))
    result = command("plan", "--manifests", str(FLEET), "--receiver", "apps/actions",
                     "--payload", str(payload), prelude=NO_KUBERNETES)
    assert result.returncode == EXIT_OK, result.stderr
    assert "team-apps" in result.stdout
    result = command("hook-url", "--name", "actions", "--namespace", "apps", "--token-file",
                     str(token), prelude=NO_KUBERNETES)
    assert result.returncode == EXIT_OK and result.stdout.startswith("/hook/"), result.stderr
    # What `serve --manifests [--simulate-flux]` imports, without the client.
    loaded = subprocess.run([sys.executable, "-c", (
        f"import sys; {NO_KUBERNETES}\n"
        "import receiver.web.app, receiver.flux.memory, receiver.demo.simulate, uvicorn\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'kubernetes'))")],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "['kubernetes']"  # only the blocked entry itself
