"""The container image, built from the Containerfile by `scripts/build-image.sh` (a Debian base
made by mmdebstrap, wheels from PyPI; no image registry), run the way the chart runs it, and
pushed to the real Gitea's container registry, from where the chart's rendered reference pulls
exactly the image that was built.

The pod the chart renders (`helm template`, the real helm) gives the user, the read-only root
filesystem, the dropped capabilities, the port and the writable /tmp; podman runs the image with
those on the example fleet (`serve --manifests`, no Kubernetes). podman, mmdebstrap and runc are
Debian's packages (`.ci/run` installs them); where they are missing these tests fail with that
reason.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import receiver
from tests.e2e.e2e_harness import CHART, ROOT, Gitea, e2e_peers, ensure_binaries
from tests.e2e.realk8s import ControlPlaneError, free_port, wait_until

SCRIPT = ROOT / "scripts" / "build-image.sh"
FLEET = ROOT / "examples" / "fleet"
OWNER = "platform"
RENDER = ("--namespace", "flux-system", "--set", "clusterName=eu-west")


def _script(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, check=False)


@dataclass(frozen=True)
class Podman:
    """podman with the arguments this host needs (the build script's `--print-podman`)."""

    global_args: tuple[str, ...]
    run_args: tuple[str, ...]

    def __call__(self, *args: str, ok: bool = True, timeout: float = 300
                 ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["podman", *self.global_args, *args], capture_output=True,
                                text=True, timeout=timeout, check=False)
        if ok:
            assert result.returncode == 0, (f"podman {' '.join(args)}: exit {result.returncode}"
                                            f"\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        return result


@dataclass(frozen=True)
class Built:
    ref: str
    image_id: str
    podman: Podman


@pytest.fixture(scope="module")
def built() -> Built:
    if shutil.which("podman") is None or shutil.which("mmdebstrap") is None:
        pytest.fail("podman and mmdebstrap are not installed (the image is built with them; "
                    "Debian: apt-get install podman mmdebstrap runc)", pytrace=False)
    lines = _script("--print-podman").stdout.splitlines()
    podman = Podman(tuple(lines[0].split()), tuple(lines[1].split()))
    started = time.monotonic()
    build = _script()
    assert build.returncode == 0, f"build-image.sh: exit {build.returncode}\n{build.stderr[-4000:]}"
    ref = build.stdout.splitlines()[-1]
    print(f"image built (or found cached) in {time.monotonic() - started:.1f}s: "
          f"{build.stderr.strip().splitlines()[-1]}")
    image_id = podman("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip()
    return Built(ref, image_id, podman)


@pytest.fixture(scope="module")
def helm() -> Path:
    try:
        return ensure_binaries(("helm",)) / "helm"
    except ControlPlaneError as exc:
        pytest.fail(f"cannot build helm: {exc}", pytrace=False)


def _deployment_container(helm: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run([str(helm), "template", "bridge", str(CHART), *RENDER, *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if isinstance(d, dict)]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    container["_volumes"] = {v["name"]: v for v in pod.get("volumes", [])}
    return dict(container)


def _run_args(container: dict[str, Any], port: int) -> list[str]:
    """`podman run` arguments for the chart's container spec, as a kubelet would apply them."""
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0
    args = ["--user", f"{sc['runAsUser']}:{sc['runAsGroup']}"]
    args += [f"--cap-drop={cap}" for cap in sc["capabilities"]["drop"]]
    if not sc["allowPrivilegeEscalation"]:
        args += ["--security-opt", "no-new-privileges"]
    if sc["readOnlyRootFilesystem"]:
        args += ["--read-only", "--read-only-tmpfs=false"]
    for mount in container["volumeMounts"]:
        volume = container["_volumes"][mount["name"]]
        if "emptyDir" in volume:  # the writable scratch space the pod gets
            size = volume["emptyDir"]["sizeLimit"]  # Mi/Gi: tmpfs says m/g
            size = size.replace("Mi", "m").replace("Gi", "g")
            args += ["--tmpfs", f"{mount['mountPath']}:size={size}"]
    (http,) = [p for p in container["ports"] if p["name"] == "http"]
    args += ["--publish", f"127.0.0.1:{port}:{http['containerPort']}"]
    args += ["--entrypoint", container["command"][0]]
    return args


@dataclass
class Running:
    name: str
    url: str
    seconds_to_ready: float
    ready: dict[str, Any]


@pytest.fixture(scope="module")
def running(built: Built, helm: Path) -> Iterator[Running]:
    container = _deployment_container(helm)
    port = free_port()
    name = f"gfb-image-test-{os.getpid()}"
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    built.podman("run", "--detach", "--name", name, *built.podman.run_args,
                 *_run_args(container, port), "--volume", f"{FLEET}:/srv/fleet:ro",
                 built.ref, "serve", "--manifests", "/srv/fleet")
    try:
        def ready() -> dict[str, Any] | None:
            with httpx.Client(trust_env=False, timeout=2.0) as client:
                reply = client.get(f"{url}/readyz")
            return reply.json() if reply.status_code == 200 else None
        state = wait_until("the image's /readyz", ready, timeout=120,
                           on_timeout=lambda: built.podman("logs", name, ok=False).stderr[-3000:])
        seconds = time.monotonic() - started
        print(f"image {built.ref}: ready {seconds:.2f}s after podman run")
        yield Running(name, url, seconds, state)
    finally:
        built.podman("rm", "--force", name, ok=False)


def _fleet_receivers() -> int:
    docs = [d for f in sorted(FLEET.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]
    return sum(1 for d in docs if isinstance(d, dict) and d.get("kind") == "Receiver")


@pytest.mark.realk8s
def test_the_image_serves_the_example_fleet_as_the_chart_runs_it(running: Running) -> None:
    assert running.ready["status"] == "ready", running.ready
    assert running.ready["receivers"] == _fleet_receivers() > 0, running.ready


@pytest.mark.realk8s
def test_the_service_runs_as_the_charts_user_and_the_image_says_so(
        built: Built, helm: Path, running: Running) -> None:
    sc = _deployment_container(helm)["securityContext"]
    pid = built.podman("inspect", "--format", "{{.State.Pid}}", running.name).stdout.strip()
    status = Path(f"/proc/{pid}/status").read_text()
    ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines()
           if line.startswith(("Uid:", "Gid:"))}
    assert ids["Uid"] == [str(sc["runAsUser"])] * 4, ids
    assert ids["Gid"] == [str(sc["runAsGroup"])] * 4, ids
    # Without the pod's runAsUser (a plain `docker run`, or runAsNonRoot alone) the image's own
    # USER applies: the same numeric, non-root user.
    user = built.podman("image", "inspect", "--format", "{{.Config.User}}", built.ref).stdout
    assert user.strip() == f"{sc['runAsUser']}:{sc['runAsGroup']}"


@pytest.mark.realk8s
def test_the_root_filesystem_is_read_only_and_tmp_is_writable(built: Built,
                                                             running: Running) -> None:
    probe = ("import sys\n"
             "for path in sys.argv[1:]:\n"
             "    try:\n"
             "        open(path, 'w').close(); print(path, 'written')\n"
             "    except OSError as exc:\n"
             "        print(path, exc.strerror)\n")
    out = built.podman("exec", running.name, "python3", "-c", probe, "/opt/venv/probe",
                       "/etc/probe", "/tmp/probe").stdout.splitlines()
    assert out == ["/opt/venv/probe Read-only file system", "/etc/probe Read-only file system",
                   "/tmp/probe written"]


@pytest.mark.realk8s
def test_the_image_is_the_checked_out_version(built: Built) -> None:
    version = built.podman("run", "--rm", *built.podman.run_args, built.ref, "--version").stdout
    assert version.strip() == receiver.__version__
    labels = json.loads(built.podman("image", "inspect", "--format", "{{json .Labels}}",
                                     built.ref).stdout)
    assert labels["org.opencontainers.image.version"] == receiver.__version__


# -- the registry ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gitea(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gitea]:
    bin_dir, static_root = e2e_peers(("gitea",))
    assert static_root is not None
    workdir = tmp_path_factory.mktemp("image-registry")
    server = Gitea(bin_dir / "gitea", static_root, workdir=workdir / "gitea")
    server.workdir.mkdir()
    server.start()
    try:
        server.create_org(OWNER)
        yield server
    finally:
        server.close()


@pytest.mark.e2e
def test_pushed_to_gitea_the_charts_reference_pulls_the_built_image(
        built: Built, helm: Path, gitea: Gitea, tmp_path: Path) -> None:
    host = f"127.0.0.1:{gitea.port}"
    repository = f"{host}/{OWNER}/gitea-flux-bridge"
    # Credentials in a file, not on a command line (an error message would show them).
    authfile = tmp_path / "auth.json"
    basic = base64.b64encode(f"{gitea.admin}:{gitea.token}".encode()).decode()
    authfile.write_text(json.dumps({"auths": {host: {"auth": basic}}}))
    auth = ("--tls-verify=false", "--authfile", str(authfile))
    _push_and_pull(built, helm, gitea, repository, tmp_path, auth)


def _push_and_pull(built: Built, helm: Path, gitea: Gitea, repository: str, tmp_path: Path,
                   auth: tuple[str, ...]) -> None:
    digest_file = tmp_path / "digest"
    built.podman("push", *auth, "--digestfile", str(digest_file), built.ref,
                 f"{repository}:{receiver.__version__}")
    digest = digest_file.read_text().strip()
    assert digest.startswith("sha256:")

    packages = gitea.api("GET", f"/packages/{OWNER}", params={"type": "container"})
    assert ("gitea-flux-bridge", receiver.__version__) in {
        (p["name"], p["version"]) for p in packages}

    # The chart pinned to what was pushed: its Deployment names the digest...
    image = _deployment_container(helm, "--set", f"image.repository={repository}",
                                  "--set", f"image.digest={digest}")["image"]
    assert image == f"{repository}@{digest}"
    # ... and pulling that reference from Gitea, into an empty store of the test's own (as a
    # node would), gives the very image that was built: the same ID, the config's digest.
    # (podman wants a run root of at most 50 characters: a short directory of its own.)
    with tempfile.TemporaryDirectory(prefix="gfb-pull-", ignore_cleanup_errors=True) as scratch:
        store = ("--root", f"{scratch}/store", "--runroot", f"{scratch}/run")
        built.podman(*store, "pull", *auth, image)
        pulled = built.podman(*store, "image", "inspect", "--format", "{{.Id}}", image).stdout
    assert pulled.strip() == built.image_id
