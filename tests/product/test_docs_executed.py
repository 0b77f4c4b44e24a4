"""The docs are executed: every shell block of README.md and docs/*.md runs against a live
`serve --manifests examples/fleet --simulate-flux`, or is named below with why it cannot run
here (a cluster, Gitea, a registry, minutes of benchmark). A run must exit 0 and print what the
block says it prints (`# <output>` lines, a prefix up to `…`), or what `EXPECT` names.

Blocks run in a scratch directory (with `examples`, `charts`, `.gitea` and `scripts` linked in,
the example tokens as files, a Git repository for `git rev-parse`), `/tmp/` rewritten into it,
the service's URLs (`http://127.0.0.1:8080`, `https://flux-bridge.example.com`) rewritten to the
live one. The run prints how many blocks ran and which were skipped, with the reasons.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver import signatures as sig
from tests.e2e.realk8s import ControlPlaneError, wait_until

ROOT = Path(__file__).resolve().parent.parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = re.compile(r"^( *)```(?:sh|bash|shell|console)\n(.*?)^\1```", re.S | re.M)
JSON = re.compile(r"^( *)```json\n(.*?)^\1```", re.S | re.M)
WEBHOOK_TOKEN = "example-webhook-token-change-me"  # examples/fleet/receivers.yaml
ACTIONS_TOKEN = "example-actions-token-change-me"
ACTIONS_HOOK = "/hook/" + sig.hook_digest(ACTIONS_TOKEN, "actions", "apps")
PUSH = {"ref": "refs/heads/main", "after": "5394cb7f48ab0b1c2d3e4f5a6b7c8d9e0f1a2b3c",
        "total_commits": 1,
        "commits": [{"id": "5394cb7f48ab0b1c2d3e4f5a6b7c8d9e0f1a2b3c", "added": [], "removed": [],
                     "modified": ["clusters/eu-west/apps/podinfo.yaml"]}],
        "repository": {"full_name": "platform/fleet",
                       "clone_url": "https://gitea.example.com/platform/fleet.git"}}

CLUSTER = "needs a Kubernetes cluster (kubectl, helm or the cluster's API)"
GITEA = "needs a Gitea (its API)"
BENCH = "a benchmark: minutes of CPU on an idle machine; its results are the tables around it"
# (page, text the block holds, why it does not run here). Each entry must match one block.
NOT_RUN: list[tuple[str, str, str]] = [
    ("README.md", "pip install -e . && gitea-flux-bridge serve",
     "installs the package and serves until stopped: this test's live server is that serve"),
    ("README.md", "scripts/build-image.sh --smoke",
     "builds the container image with podman as root: tests/product/test_image.py does"),
    ("README.md", "python -m pytest", "the whole test suite, this test included"),
    ("docs/benchmarks.md", "[--baseline before=DIR]", "a synopsis, not a command"),
    ("docs/benchmarks.md", "--baseline session-start=", BENCH),
    ("docs/benchmarks.md", "git worktree add --detach", BENCH + " (and two old checkouts)"),
    ("docs/benchmarks.md", "bench_latency --duration 10", BENCH),
    ("docs/benchmarks.md", "bench_latency --bridge-root", BENCH),
    ("docs/benchmarks.md", "--control-us 330 --probe", BENCH),
    ("docs/benchmarks.md", "# the afternoon's runs", BENCH),
    ("docs/benchmarks.md", "bench_memory", BENCH),
    ("docs/benchmarks.md", "bench_routing", BENCH),
    ("docs/benchmarks.md", "bench_events", BENCH),
    ("docs/benchmarks.md", "bench_vs_flux", BENCH),
    ("docs/benchmarks.md", "bench_tail", BENCH),
    ("docs/benchmarks.md", "bench_stages", "a synopsis of a benchmark: " + BENCH),
    ("docs/benchmarks.md", "bench_flood                    # 20 s", BENCH),
    ("docs/benchmarks.md", "bench_scaling", BENCH),
    ("docs/benchmarks.md", "--profile startup.collapsed", BENCH),
    ("docs/benchmarks.md", "--baseline main=../main", BENCH),
    ("docs/benchmarks.md", "--fractions 0.5 --probe", BENCH),
    ("docs/configuration.md", "kubectl -n flux-system create secret generic gitea-flux-bridge",
     CLUSTER),
    ("docs/flux-setup.md", "--set clusterName=eu-west", CLUSTER),
    ("docs/flux-setup.md", "gitea-flux-bridge serve --manifests examples/fleet",
     "serves until stopped: this test's live server is that serve"),
    ("docs/flux-setup.md", "create secret generic gitea-webhook-token", CLUSTER),
    ("docs/flux-setup.md", "--scheme generic-hmac", "needs a generic-hmac Receiver; "
     "examples/fleet has none"),
    ("docs/flux-setup.md", "get receiver gitea-push -o jsonpath", CLUSTER),
    ("docs/flux-setup.md", "hook-url --receiver flux-system/gitea-push", CLUSTER + " (it is run "
     "on manifests by tests/doctor/test_doctor.py)"),
    ("docs/flux-setup.md", "EVENTS_TOKEN=", CLUSTER),
    ("docs/flux-setup.md", "flux push artifact", "needs the flux CLI and an OCI registry"),
    ("docs/gitea-setup.md", "repos/platform/fleet/hooks", GITEA),
    ("docs/gitea-setup.md", "users/flux-bridge/tokens", GITEA),
    ("docs/gitea-setup.md", "--from-file=gitea-token=./gitea-token", CLUSTER),
    ("docs/migrating-from-notification-controller.md", "get provider gitea", CLUSTER),
    ("docs/multi-region.md", "--payload push-from-mirror.json",
     "names a region's configuration and a fleet repository's layout, which examples/ has not"),
    ("docs/operations.md", "exec deploy/gitea-flux-bridge", CLUSTER),
    ("docs/operations.md", "--as system:serviceaccount", CLUSTER + " (tests/e2e/"
     "test_doctor_rbac.py runs it against a real API server)"),
    ("docs/operations.md", "mkdir -p exported", CLUSTER),
    ("docs/releasing.md", "helm install gitea-flux-bridge oci://", CLUSTER + " and a registry"),
    ("docs/releasing.md", "podman build", "builds the container image (minutes, a registry)"),
    ("docs/releasing.md", "scripts/lock.sh", "rewrites requirements.lock from the package index"),
    ("docs/security.md", "openssl dgst -sha256 -hmac", "needs a generic-hmac Receiver; "
     "examples/fleet has none"),
]
# What a run must print, for blocks that say it in prose rather than in a `# ` line.
EXPECT: dict[tuple[str, str], str] = {
    # The 202 reply, naming the targets the prose names.
    ("README.md", "X-Gitea-Event: push"): '"kind":"GitRepository","namespace":"flux-system","name":"fleet"',
    ("README.md", "notify-flux/notify.sh"): "deployed: every target is Ready at 5394cb7f",
    ("docs/flux-setup.md", "plan --manifests examples/fleet"): '"targets"',
    # `d-1` is replaced by the id of a push the live service accepted (`Live.delivery`).
    ("docs/api.md", "deliveries/d-1\" -H"): '"outcome":"',
    # The wait ends on a final outcome (which one depends on the pushes other blocks made).
    ("docs/api.md", "deliveries/d-1?wait=600"): '"final": true',
    ("docs/gitea-setup.md", "FLUX_BRIDGE_WAIT=600"): "deployed: every target is Ready",
    ("docs/gitea-setup.md", "printf '%s' '{\"repository\""): '"receiver":"apps/actions"',
    ("docs/flux-setup.md", "--token-file token \\\n  --base-url"): (
        "/hook/" + sig.hook_digest(WEBHOOK_TOKEN, "gitea-push", "flux-system")),
}

# Files a block reads that hold something else there than the scratch directory's default
# (`token` is the webhook Receiver's token; docs/gitea-setup.md's `token` is the Actions one).
FILES: dict[tuple[str, str], dict[str, str]] = {
    ("docs/gitea-setup.md", "printf '%s' '{\"repository\""): {"token": ACTIONS_TOKEN},
}


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    text: str

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _dedent(body: str, indent: str) -> str:
    return "".join(line[len(indent):] if line.startswith(indent) else line
                   for line in body.splitlines(keepends=True))


def blocks(pattern: re.Pattern[str] = SHELL) -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in pattern.finditer(text):
            found.append(Block(str(page.relative_to(ROOT)), text[:m.start()].count("\n") + 1,
                               _dedent(m.group(2), m.group(1))))
    return found


def why_not_run(block: Block) -> str | None:
    for page, needle, reason in NOT_RUN:
        if page == block.page and needle in block.text:
            return reason
    return None


def expected_outputs(block: Block) -> list[str]:
    """`# <output>` lines after a command (up to `…`), and what EXPECT names for it."""
    said = [line[2:].split("…")[0].strip() for line in block.text.splitlines()
            if line.startswith("# http") or line.startswith("# /hook/")]
    said += [want for (page, needle), want in EXPECT.items()
             if page == block.page and needle in block.text]
    return said


# -- the live service and the scratch directory -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Live:
    url: str
    port: int
    workdir: Path
    env: dict[str, str]
    delivery: str  # the id of a push the live service accepted, for the blocks that read one


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    workdir = tmp_path_factory.mktemp("docs")
    for name in ("examples", "charts", ".gitea", "scripts", "benchmarks"):
        (workdir / name).symlink_to(ROOT / name)
    (workdir / "tmp").mkdir()
    (workdir / "token").write_text(WEBHOOK_TOKEN)
    (workdir / "actions-token").write_text(ACTIONS_TOKEN + "\n")  # as `echo` writes it
    (workdir / "badge-key").write_text("docs-test-badge-key\n")
    (workdir / "push.json").write_text(json.dumps(PUSH))
    git = ["git", "-c", "user.name=docs", "-c", "user.email=docs@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=workdir, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "docs"], cwd=workdir,
                   check=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    bindir = str(Path(sys.executable).parent)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("GFB_", "FLUX_BRIDGE"))},
           "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           # A block's own `serve` would take this port, which the live one holds already.
           "GFB_LISTEN__PORT": str(port),
           # What a Gitea Actions runner sets; and the names docs/gitea-setup.md assumes.
           "GITHUB_SERVER_URL": "https://gitea.example.com", "GITHUB_REPOSITORY": "teams/apps",
           "GITHUB_REF": "refs/heads/production", "GITHUB_SHA": PUSH["after"],
           "FLUX_BRIDGE_URL": url, "FLUX_HOOK_PATH": ACTIONS_HOOK}
    server = subprocess.Popen(
        [str(Path(bindir) / "gitea-flux-bridge"), "serve", "--manifests", "examples/fleet",
         "--simulate-flux", "--simulate-delay", "0.2", "--port", str(port)],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        def ready() -> bool:
            if server.poll() is not None:  # it died: say why at once
                raise ControlPlaneError("the live server exited: " + (
                    server.stderr.read().decode()[-2000:] if server.stderr else ""))
            return httpx.get(url + "/readyz", timeout=2).status_code == 200

        wait_until("the live server to answer /readyz 200", ready, timeout=60)
        reply = httpx.post(url + ACTIONS_HOOK, headers={
            "Authorization": f"Bearer {ACTIONS_TOKEN}", "Content-Type": "application/json"},
            json={"repository": "https://gitea.example.com/teams/apps",
                  "ref": "refs/heads/production", "sha": "a" * 40}, timeout=30)
        assert reply.status_code == 202, reply.text
        # $TOKEN in docs/api.md: a Receiver's token reads its deliveries.
        env["TOKEN"] = ACTIONS_TOKEN
        yield Live(url, port, workdir, env, reply.json()["delivery"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def runnable(block: Block, live: Live) -> str:
    text = block.text.replace("/tmp/", f"{live.workdir}/tmp/")
    for origin in ("http://127.0.0.1:8080", "https://flux-bridge.example.com"):
        text = text.replace(origin, live.url)
    return text.replace("/deliveries/d-1", f"/deliveries/{live.delivery}")


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("block", blocks(), ids=lambda b: b.id)
def test_the_block_runs_and_prints_what_the_docs_say(block: Block, live: Live) -> None:
    reason = why_not_run(block)
    if reason is not None:
        pytest.skip(f"{block.id}: {reason}")
    script = runnable(block, live)
    for (page, needle), files in FILES.items():
        if page == block.page and needle in block.text:
            for name, content in files.items():
                (live.workdir / name).write_text(content)
    process = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=live.workdir,
                               env=live.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=180)
    finally:
        # A block may leave a process in the background (`serve … &`): end its whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        (live.workdir / "token").write_text(WEBHOOK_TOKEN)
    assert process.returncode == 0, f"{block.id} exited {process.returncode}:\n{out}\n{err}"
    for want in expected_outputs(block):
        want = want.replace("https://flux-bridge.example.com", live.url)
        assert want in out + err, f"{block.id} did not print {want!r}:\n{out}\n{err}"


@pytest.mark.parametrize("block", blocks(JSON), ids=lambda b: b.id)
def test_every_json_block_is_json(block: Block) -> None:
    json.loads(block.text)


def test_every_block_runs_or_says_why_not(record_property: pytest.RecordProperty) -> None:
    shell = blocks()
    for page, needle, _ in NOT_RUN:
        matching = [b.id for b in shell if b.page == page and needle in b.text]
        assert len(matching) == 1, f"NOT_RUN entry {page} {needle!r} matches {matching}"
    for page, needle in [*EXPECT, *FILES]:
        assert any(b.page == page and needle in b.text for b in shell), (page, needle)
    skipped = [(b.id, why) for b in shell if (why := why_not_run(b)) is not None]
    ran = len(shell) - len(skipped)
    configs = sum(len(_configs(b)) for b in blocks(YAML))
    receivers = sum(len(_receivers(b)) for b in blocks(YAML))
    summary = (f"docs executed: {ran} of {len(shell)} shell blocks run against a live serve, "
               f"{len(skipped)} skipped; {len(blocks(JSON))} JSON blocks parsed, {configs} "
               f"configurations loaded, {receivers} Receivers checked\n"
               + "\n".join(f"  skipped {where}: {why}" for where, why in skipped))
    print("\n" + summary)
    record_property("summary", summary)
    assert ran >= 8


def _slug(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's, Gitea's) gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_to_a_section_finds_it() -> None:
    anchors: dict[Path, set[str]] = {}
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        seen: dict[str, int] = {}
        for heading in re.findall(r"^#+ (.*)$", text, re.M):
            slug = _slug(heading)
            anchors.setdefault(page, set()).add(slug if slug not in seen else
                                                f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    broken = []
    for page in PAGES:
        for target, anchor in re.findall(r"\]\(([^)\s#]*)#([^)\s]+)\)", page.read_text()):
            path = (page.parent / target).resolve() if target else page
            if path in anchors and anchor not in anchors[path]:
                broken.append(f"{page.relative_to(ROOT)}: {target}#{anchor}")
    assert broken == []


YAML = re.compile(r"^( *)```yaml\n(.*?)^\1```", re.S | re.M)
# Fragments of a configuration, with what the prose around them says the rest holds.
ASSUMED: dict[tuple[str, str], dict[str, object]] = {
    ("docs/multi-region.md", "# both regions (cluster_name differs)"): {"cluster_name": "eu-west"},
}


def _configs(block: Block) -> list[dict[str, object]]:
    """The bridge configurations a YAML block shows: a configuration file, or the chart
    values' `config` (with `clusterName`, which the chart turns into `cluster_name`)."""
    import yaml

    from receiver.config import Settings

    found: list[dict[str, object]] = []
    for doc in yaml.safe_load_all(block.text):
        if not isinstance(doc, dict) or "kind" in doc:
            continue
        if isinstance(doc.get("config"), dict):
            config = dict(doc["config"])
            if "clusterName" in doc:
                config["cluster_name"] = doc["clusterName"]
            found.append(config)
        elif set(doc) & set(Settings.model_fields):
            found.append(doc)  # a configuration file: every key must be one the bridge knows
    return found


def _receivers(block: Block) -> list[dict[str, Any]]:
    import yaml

    return [d for d in yaml.safe_load_all(block.text)
            if isinstance(d, dict) and d.get("kind") == "Receiver"]


@pytest.mark.parametrize("block", [b for b in blocks(YAML) if _configs(b)], ids=lambda b: b.id)
def test_every_configuration_the_docs_show_is_one_the_bridge_takes(block: Block) -> None:
    from receiver.config import ConfigError
    from receiver.config_load import load_settings

    assumed = {k: v for (page, needle), extra in ASSUMED.items()
               if page == block.page and needle in block.text for k, v in extra.items()}
    for config in _configs(block):
        try:
            load_settings(environ={}, overrides={**assumed, **config})
        except ConfigError as exc:
            raise AssertionError(f"{block.id}: {exc}") from None


@pytest.mark.parametrize("block", [b for b in blocks(YAML) if _receivers(b)],
                         ids=lambda b: b.id)
def test_every_receiver_the_docs_show_is_one_the_bridge_serves(block: Block) -> None:
    """A Receiver in the docs has a type the bridge serves and a Secret: `doctor`'s checks."""
    from receiver.doctor.checks import receiver_findings
    from receiver.doctor.facts import ReceiverFacts, TokenFacts

    for doc in _receivers(block):
        spec, meta = doc["spec"], doc["metadata"]
        facts = ReceiverFacts(meta.get("namespace", "default"), meta["name"], spec.get("type", ""),
                              TokenFacts(spec.get("secretRef", {}).get("name", ""), found=True,
                                         has_key=True, value="a-token"), matched=1)
        failed = [f.message for f in receiver_findings(facts) if f.severity == "fail"]
        assert failed == [], f"{block.id}: {failed}"
