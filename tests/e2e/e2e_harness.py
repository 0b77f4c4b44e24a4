"""Real Gitea, real Flux controllers and the bridge as processes, for the end-to-end loop.

Builds on `tests.e2e.realk8s` (etcd + kube-apiserver, the admin kubeconfig, `Process`):

- `Gitea`: a throwaway work directory, an `app.ini` for HTTP on a free 127.0.0.1 port with
  SQLite, the admin user and an access token made with Gitea's own CLI, and the REST calls the
  tests need (organisation, repository, commits through the contents API, webhooks, commit
  statuses). `stop()` / `start()` keep the data, so Gitea can be taken away and brought back.
- `FluxControllers`: source-controller, kustomize-controller and notification-controller (and,
  for the modules that ask, helm-controller) against the API server with the admin kubeconfig,
  every address on loopback, leader election off; the source CRDs the fixtures lack are
  installed from source-controller's module, the HelmRelease CRD from helm-controller's.
- `BridgeProcess`: `python -m receiver.cli serve --config <file>` with `KUBECONFIG`.

Every process runs in its own process group with its output in a log file (`Process`), and
every address is 127.0.0.1. Binaries come from `scripts/testbin.sh`'s cache; a missing one is
built by that script, and a build that fails is an error, never a skip.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import functools
import getpass
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.realk8s import (
    CORE_BINARIES,
    ROOT,
    TESTBIN_SCRIPT,
    ControlPlane,
    ControlPlaneError,
    Process,
    free_port,
    wait_until,
)
from tests.e2e.realk8s import ensure_binaries as realk8s_ensure_binaries

FLUX_BINARIES = ("source-controller", "kustomize-controller", "notification-controller")
HELM_CONTROLLER = "helm-controller"  # started only by the modules that install charts
E2E_BINARIES = (*CORE_BINARIES, *FLUX_BINARIES, "gitea")
# Source kinds source-controller reconciles unconditionally that tests/fixtures/crds lacks.
EXTRA_SOURCE_CRDS = ("buckets", "externalartifacts", "helmcharts", "helmrepositories")


class HarnessError(ControlPlaneError):
    """A real component could not be built, started or used."""


# -- binaries and module dirs ----------------------------------------------------------------------


def ensure_binaries(names: Sequence[str] = E2E_BINARIES) -> Path:
    """The testbin dir with every one of `names`, built by testbin.sh when missing."""
    return realk8s_ensure_binaries(names)


def e2e_peers(names: Sequence[str] = E2E_BINARIES, *, gitea: bool = True
              ) -> tuple[Path, Path | None]:
    """(testbin dir, Gitea's static root or None) for a whole-loop module.

    Fails the module when `.ci/run` reports the peers could not be built within its budget (a
    cold cache on a slow machine: failing fast with the reason, instead of building them again
    inside the test run until CI's limit), and when a build fails outright.
    """
    unavailable = os.environ.get("GFBTEST_E2E_UNAVAILABLE")
    if unavailable:
        pytest.fail(f"Flux controllers / Gitea unavailable: {unavailable}", pytrace=False)
    try:
        bin_dir = ensure_binaries(names)
        static_root = gitea_static_root() if gitea else None
    except (ControlPlaneError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"cannot build the real components: {exc}", pytrace=False)
    return bin_dir, static_root


def gitea_static_root() -> Path:
    """Gitea's STATIC_ROOT_PATH: with its web frontend built (`scripts/gitea-frontend.sh`) when
    it was, else the module source, whose pages have no style and no JavaScript."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gitea-frontend.sh"), "--print-dir"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    built = Path(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else None
    return built if built is not None and built.is_dir() else module_dir("gitea")


def module_dir(component: str) -> Path:
    """A component's Go module source dir (`scripts/testbin.sh --moddir`)."""
    out = subprocess.run(["bash", str(TESTBIN_SCRIPT), "--moddir", component],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    path = Path(out.stdout.strip()) if out.returncode == 0 else None
    if path is None or not path.is_dir():
        raise HarnessError(f"`scripts/testbin.sh --moddir {component}` failed "
                           f"(exit {out.returncode}):\n{out.stderr[-3000:]}")
    return path


def install_source_crds(plane: ControlPlane) -> list[str]:
    """Install source-controller's CRDs that `tests/fixtures/crds` lacks, read at run time from
    its module (`config/crd/bases`). Returns the plurals installed."""
    bases = module_dir("source-controller") / "config" / "crd" / "bases"
    docs: list[dict[str, Any]] = []
    for plural in EXTRA_SOURCE_CRDS:
        path = bases / f"source.toolkit.fluxcd.io_{plural}.yaml"
        if not path.is_file():
            raise HarnessError(f"no CRD {path.name} in {bases}")
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict))
    plane.install_crds(docs)
    return list(EXTRA_SOURCE_CRDS)


def install_helm_crds(plane: ControlPlane) -> None:
    """Install the HelmRelease CRD from helm-controller's module (`config/crd/bases`), replacing
    the fixture copy when the two differ: helm-controller writes the status its own CRD
    declares."""
    path = (module_dir(HELM_CONTROLLER) / "config" / "crd" / "bases"
            / "helm.toolkit.fluxcd.io_helmreleases.yaml")
    if not path.is_file():
        raise HarnessError(f"no CRD {path.name} in helm-controller's module")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    for doc in docs:
        found = plane.request("GET", f"{crds}/{doc['metadata']['name']}", ok=(200, 404))
        if found and found.get("spec", {}).get("versions") != doc["spec"]["versions"]:
            replaced = {**doc, "metadata": {**doc["metadata"], "resourceVersion":
                                            found["metadata"]["resourceVersion"]}}
            plane.request("PUT", f"{crds}/{doc['metadata']['name']}", replaced)
    plane.install_crds(docs)


CHART = ROOT / "charts" / "gitea-flux-bridge"
_RBAC_PATHS = {
    "ServiceAccount": "/api/v1/namespaces/{namespace}/serviceaccounts",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
}


def chart_service_account(plane: ControlPlane, release: str, namespace: str,
                          *helm_args: str) -> tuple[str, str]:
    """Render the project's chart with the real helm, apply its ServiceAccount and RBAC, and
    return (the ServiceAccount's user name, a token for it): the bridge then runs with exactly
    the permissions the chart grants."""
    command = [str(plane.bin_dir / "helm"), "template", release, str(CHART),
               "--namespace", namespace, "--set", "clusterName=e2e", *helm_args]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=child_env(HOME=str(plane.workdir)), check=False)
    if out.returncode != 0:
        raise HarnessError(f"{' '.join(command)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    docs = [d for d in yaml.safe_load_all(out.stdout) if isinstance(d, dict)]
    rbac = [d for d in docs if d.get("kind") in _RBAC_PATHS]
    accounts = [d["metadata"]["name"] for d in rbac if d["kind"] == "ServiceAccount"]
    if len(accounts) != 1:
        raise HarnessError(f"the chart rendered {len(accounts)} ServiceAccounts, not one")
    for doc in rbac:
        ns = doc["metadata"].get("namespace") or namespace
        plane.ensure_namespace(ns)
        plane.request("POST", _RBAC_PATHS[doc["kind"]].format(namespace=ns), doc, ok=(201, 409))
    user = f"system:serviceaccount:{namespace}:{accounts[0]}"
    return user, plane.service_account_token(namespace, accounts[0])


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: no in-cluster config, no proxy for loopback."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


class _EnvProcess(Process):
    """`Process` with its own environment (the base class inherits ours)."""

    def __init__(self, name: str, args: Sequence[str], log: Path, cwd: Path,
                 env: Mapping[str, str]) -> None:
        super().__init__(name, args, log, cwd)
        self.env = dict(env)

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.args)}\n".encode())
            out.flush()
            self._popen = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.cwd, env=self.env, start_new_session=True)

    def signal_group(self, sig: signal.Signals) -> None:
        if self.pid is not None:
            os.killpg(self.pid, sig)


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _http_ok(url: str) -> bool:
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        return client.get(url).status_code == 200


# -- Gitea -------------------------------------------------------------------------------------------


class GiteaError(HarnessError):
    pass


class Gitea:
    """A throwaway Gitea on 127.0.0.1 with SQLite, an admin user and an access token."""

    admin = "gfb-admin"  # "admin" is a reserved user name in Gitea

    def __init__(self, binary: Path, static_root: Path, *, workdir: Path | None = None,
                 startup_timeout: float = 120.0) -> None:
        self.binary = binary
        self.static_root = static_root
        self.startup_timeout = startup_timeout
        self._owns_workdir = workdir is None
        self.workdir = (workdir or Path(tempfile.mkdtemp(prefix="gfb-gitea-"))).resolve()
        self.ini = self.workdir / "app.ini"
        self.port = 0
        self.password = secrets.token_urlsafe(18)
        self.token = ""
        self.process: _EnvProcess | None = None
        self.timings: dict[str, float] = {}
        self._client: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def clone_url(self, owner: str, repo: str) -> str:
        return f"{self.url}/{owner}/{repo}.git"

    # -- lifecycle ---------------------------------------------------------------------------------

    def _write_ini(self) -> None:
        data = self.workdir / "data"
        root_line = "I_AM_BEING_UNSAFE_RUNNING_AS_ROOT = true\n" if os.geteuid() == 0 else ""
        self.ini.write_text(f"""\
APP_NAME  = gfb-e2e
RUN_MODE  = prod
RUN_USER  = {getpass.getuser()}
WORK_PATH = {self.workdir}
{root_line}
[server]
PROTOCOL         = http
HTTP_ADDR        = 127.0.0.1
HTTP_PORT        = {self.port}
ROOT_URL         = {self.url}/
LOCAL_ROOT_URL   = {self.url}/
DISABLE_SSH      = true
START_SSH_SERVER = false
LFS_START_SERVER = false
OFFLINE_MODE     = true
STATIC_ROOT_PATH = {self.static_root}
APP_DATA_PATH    = {data}

[database]
DB_TYPE = sqlite3
PATH    = {data}/gitea.db
SQLITE_JOURNAL_MODE = WAL

[repository]
ROOT           = {data}/repos
DEFAULT_BRANCH = main

[repository.signing]
SIGNING_KEY = none

[security]
INSTALL_LOCK = true
SECRET_KEY   = {secrets.token_urlsafe(32)}

[oauth2]
ENABLED = false

[service]
DISABLE_REGISTRATION = true

[mailer]
ENABLED = false

[session]
PROVIDER = memory

[webhook]
ALLOWED_HOST_LIST = loopback
DELIVER_TIMEOUT   = 10

; A commit's push (and so its webhook tasks) is processed within the API call that made it,
; as in Gitea's own integration tests: a webhook created later never sees an earlier commit.
[queue.push_update]
TYPE = immediate

; The package registry (OCI charts and images: tests/product/test_release_oci.py); on by default, said
; here so the release test does not depend on a default.
[packages]
ENABLED = true

[cron]
ENABLED = false

[log]
MODE  = console
LEVEL = Info
logger.router.MODE =
""")

    def _cli(self, *args: str, timeout: float = 180.0) -> str:
        command = [str(self.binary), "--config", str(self.ini), "--work-path", str(self.workdir),
                   *args]
        out = subprocess.run(command, capture_output=True, text=True, cwd=self.workdir,
                             env=self._env(), timeout=timeout, check=False)
        if out.returncode != 0:
            shown = " ".join(a if not a.startswith("--password") else "--password=***"
                             for a in args)
            raise GiteaError(f"`gitea {shown}` failed (exit {out.returncode}):\n"
                             f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out.stdout

    def _env(self) -> dict[str, str]:
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        return child_env(HOME=str(home), GITEA_WORK_DIR=str(self.workdir),
                         USER=getpass.getuser())

    def start(self) -> Gitea:
        """First call: write app.ini, migrate, make the admin and its token, start the server.
        Later calls (after `stop()`): start the server again on the same port and data."""
        atexit.register(self.stop)
        started = time.monotonic()
        first = not self.ini.exists()
        try:
            if first:
                self.port = free_port()
                self._write_ini()
                self._cli("migrate")
                self.timings["migrate"] = time.monotonic() - started
                self._cli("admin", "user", "create", "--username", self.admin,
                          f"--password={self.password}", "--email", "gfb-admin@example.com",
                          "--admin", "--must-change-password=false")
                # Scope "all": repositories, organisations, statuses and write:package (the
                # release test pushes a chart to the package registry).
                out = self._cli("admin", "user", "generate-access-token", "-u", self.admin,
                                "-t", "e2e", "--scopes", "all", "--raw")
                # Gitea's console log shares stdout: the token is the line that is only hex.
                found = [line for line in out.split() if re.fullmatch(r"[0-9a-f]{40,64}", line)]
                if not found:
                    raise GiteaError(f"generate-access-token printed no token:\n{out[-2000:]}")
                self.token = found[-1]
                self.timings["admin"] = time.monotonic() - started - self.timings["migrate"]
            self.process = _EnvProcess(
                "gitea", [str(self.binary), "web", "--config", str(self.ini),
                          "--work-path", str(self.workdir)],
                self.workdir / "gitea.log", self.workdir, self._env())
            self.process.start()
            web = time.monotonic()
            wait_until("gitea /api/v1/version", self._answers, self.startup_timeout,
                       interval=0.2, on_timeout=self.tail)
            self.timings["web"] = time.monotonic() - web
        except BaseException:
            self.stop(remove=first)
            raise
        self.timings["start" if first else "restart"] = time.monotonic() - started
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.exited() is not None:
            raise GiteaError(f"gitea exited with code {self.process.exited()}\n{self.tail()}")
        return _http_ok(f"{self.url}/api/v1/version")

    def stop(self, *, remove: bool = False) -> None:
        """Stop the server (SIGTERM, then SIGKILL); with `remove`, delete the work dir."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process is not None:
            self.process.stop(grace=15.0)
        if remove:
            atexit.unregister(self.stop)
            if self._owns_workdir and not os.environ.get("GFBTEST_E2E_KEEP"):
                shutil.rmtree(self.workdir, ignore_errors=True)

    def close(self) -> None:
        self.stop(remove=True)

    def restart(self) -> float:
        started = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - started

    def tail(self, lines: int = 60) -> str:
        return self.process.tail(lines) if self.process is not None else "(gitea not started)"

    # -- REST --------------------------------------------------------------------------------------

    def http(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(
                base_url=f"{self.url}/api/v1", timeout=30.0, trust_env=False,
                headers={"Authorization": f"token {self.token}", "Accept": "application/json"})
        return self._client

    def api(self, method: str, path: str, body: Any = None, *, ok: Iterable[int] = (200, 201),
            params: Mapping[str, Any] | None = None) -> Any:
        response = self.http().request(method, path, json=body, params=params)
        if response.status_code not in set(ok):
            raise GiteaError(f"{method} {path}: HTTP {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    def version(self) -> str:
        return str(self.api("GET", "/version")["version"])

    def create_org(self, name: str, *, visibility: str = "public") -> None:
        self.api("POST", "/orgs", {"username": name, "visibility": visibility}, ok=(201, 422))

    def create_token(self, name: str, scopes: Sequence[str]) -> str:
        """Another access token of the admin with only these scopes (e.g. `read:package`).
        Gitea creates tokens only for a request authenticated with the password."""
        with httpx.Client(base_url=f"{self.url}/api/v1", timeout=30.0, trust_env=False) as client:
            response = client.post(f"/users/{self.admin}/tokens",
                                   json={"name": name, "scopes": list(scopes)},
                                   auth=(self.admin, self.password))
        if response.status_code != 201:
            raise GiteaError(f"creating token {name}: HTTP {response.status_code}: "
                             f"{response.text[:2000]}")
        return str(response.json()["sha1"])

    def create_repo(self, owner: str, name: str, *, private: bool = True) -> dict[str, Any]:
        path = f"/orgs/{owner}/repos" if owner != self.admin else "/user/repos"
        repo: dict[str, Any] = self.api("POST", path, {
            "name": name, "auto_init": True, "default_branch": "main", "private": private,
            "readme": "Default"})
        return repo

    def file_sha(self, owner: str, repo: str, path: str, ref: str = "main") -> str | None:
        found = self.api("GET", f"/repos/{owner}/{repo}/contents/{path}", params={"ref": ref},
                         ok=(200, 404))
        return str(found["sha"]) if isinstance(found, dict) and found.get("sha") else None

    def commit_files(self, owner: str, repo: str, files: Mapping[str, str | None], message: str,
                     branch: str = "main", *, new_branch: str | None = None) -> str:
        """One commit writing (text) or deleting (None) each path; returns its sha. With
        `new_branch`, the commit starts that branch from `branch`."""
        operations = []
        for path, content in files.items():
            if content is None:
                sha = self.file_sha(owner, repo, path, branch)
                if sha is None:
                    raise GiteaError(f"cannot delete {path}: not in {owner}/{repo}@{branch}")
                operations.append({"operation": "delete", "path": path, "sha": sha})
            else:
                operations.append({"operation": "upload", "path": path,
                                   "content": base64.b64encode(content.encode()).decode()})
        body: dict[str, Any] = {"branch": branch, "message": message, "files": operations}
        if new_branch:
            body["new_branch"] = new_branch
        answer = self.api("POST", f"/repos/{owner}/{repo}/contents", body)
        return str(answer["commit"]["sha"])

    def create_hook(self, owner: str, repo: str, url: str, secret: str, *,
                    events: Sequence[str] = ("push",)) -> int:
        hook = self.api("POST", f"/repos/{owner}/{repo}/hooks", {
            "type": "gitea", "active": True, "events": list(events), "branch_filter": "*",
            "config": {"url": url, "content_type": "json", "secret": secret}})
        return int(hook["id"])

    def create_org_hook(self, org: str, url: str, secret: str, *,
                        events: Sequence[str] = ("package",)) -> int:
        """An organisation webhook: Gitea sends `package` events to the owner's webhooks (a
        repository's only when the package is linked to it)."""
        hook = self.api("POST", f"/orgs/{org}/hooks", {
            "type": "gitea", "active": True, "events": list(events),
            "config": {"url": url, "content_type": "json", "secret": secret}})
        return int(hook["id"])

    def set_hook_active(self, owner: str, repo: str, hook_id: int, active: bool, *,
                        events: Sequence[str] = ("push",)) -> None:
        """Turn a webhook on or off. Gitea's edit resets the hook's events to `push` unless
        they are given, so a hook made with other events must pass them again."""
        self.api("PATCH", f"/repos/{owner}/{repo}/hooks/{hook_id}",
                 {"active": active, "events": list(events)})

    def statuses(self, owner: str, repo: str, sha: str) -> list[dict[str, Any]]:
        """Every status of a commit (all of them, not only the latest per context), oldest
        first."""
        found = self.api("GET", f"/repos/{owner}/{repo}/statuses/{sha}",
                         params={"limit": 50, "sort": "oldest"})
        items = [s for s in found or [] if isinstance(s, dict)]
        return sorted(items, key=lambda s: int(s.get("id", 0)))


# -- Flux controllers --------------------------------------------------------------------------------


class FluxControllers:
    """source-, kustomize-, notification- (and helm-) controller against the API server, on
    loopback."""

    def __init__(self, bin_dir: Path, kubeconfig: Path, *, workdir: Path | None = None,
                 startup_timeout: float = 120.0, log_level: str = "info") -> None:
        self.bin_dir = bin_dir
        self.kubeconfig = kubeconfig
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self._owns_workdir = workdir is None
        self.workdir = (workdir or Path(tempfile.mkdtemp(prefix="gfb-flux-"))).resolve()
        self.storage = self.workdir / "artifacts"
        self.storage_port = self.nc_events_port = self.nc_receiver_port = 0
        self.health: dict[str, int] = {}
        self.processes: dict[str, _EnvProcess] = {}
        self.timings: dict[str, float] = {}

    @property
    def events_url(self) -> str:
        """Where source- and kustomize-controller post their events (NC's event server)."""
        return f"http://127.0.0.1:{self.nc_events_port}/"

    @property
    def receiver_url(self) -> str:
        """notification-controller's own webhook receiver (`/hook/<digest>`)."""
        return f"http://127.0.0.1:{self.nc_receiver_port}"

    def _args(self, name: str) -> list[str]:
        health = self.health[name]
        args = [str(self.bin_dir / name), f"--log-level={self.log_level}", "--log-encoding=json",
                "--metrics-addr=0", f"--health-addr=127.0.0.1:{health}",
                "--watch-all-namespaces=true"]
        if name == "source-controller":
            args += [f"--storage-path={self.storage}",
                     f"--storage-addr=127.0.0.1:{self.storage_port}",
                     f"--storage-adv-addr=127.0.0.1:{self.storage_port}",
                     f"--events-addr={self.events_url}"]
        elif name == "kustomize-controller":
            args += [f"--events-addr={self.events_url}", "--no-remote-bases=true"]
        elif name == HELM_CONTROLLER:
            # It fetches charts from source-controller's storage (`--storage-adv-addr`) and
            # installs them with the admin kubeconfig, as its cluster-admin binding does.
            args += [f"--events-addr={self.events_url}"]
        else:
            args += [f"--events-addr=127.0.0.1:{self.nc_events_port}",
                     f"--receiverAddr=127.0.0.1:{self.nc_receiver_port}"]
        return args

    def start(self, names: Sequence[str] = FLUX_BINARIES) -> FluxControllers:
        """Start `names` (notification-controller first: the others send it events)."""
        atexit.register(self.stop)
        self.storage.mkdir(parents=True, exist_ok=True)
        ports: set[int] = set()

        def port() -> int:
            while (p := free_port()) in ports:
                pass
            ports.add(p)
            return p

        self.storage_port, self.nc_events_port, self.nc_receiver_port = port(), port(), port()
        env = child_env(KUBECONFIG=str(self.kubeconfig), RUNTIME_NAMESPACE="flux-system",
                        HOME=str(self.workdir))
        order = sorted(names, key=lambda n: n != "notification-controller")
        try:
            for name in order:
                self.health[name] = port()
                proc = _EnvProcess(name, self._args(name), self.workdir / f"{name}.log",
                                   self.workdir, env)
                started = time.monotonic()
                proc.start()
                self.processes[name] = proc
                wait_until(f"{name} /readyz", functools.partial(self._ready, name),
                           self.startup_timeout, interval=0.2,
                           on_timeout=functools.partial(proc.tail, 60))
                self.timings[name] = time.monotonic() - started
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self, name: str) -> bool:
        proc = self.processes[name]
        if proc.exited() is not None:
            raise HarnessError(f"{name} exited with code {proc.exited()}\n{proc.tail(80)}")
        return _http_ok(f"http://127.0.0.1:{self.health[name]}/readyz")

    def pid(self, name: str) -> int:
        pid = self.processes[name].pid
        assert pid is not None, f"{name} is not running"
        return pid

    def pause(self, name: str) -> None:
        """Freeze a controller (SIGSTOP): it stays connected but acts on nothing."""
        self.processes[name].signal_group(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        self.processes[name].signal_group(signal.SIGCONT)

    def stop(self) -> None:
        atexit.unregister(self.stop)
        for proc in reversed(list(self.processes.values())):
            with contextlib.suppress(ProcessLookupError):
                proc.signal_group(signal.SIGCONT)  # a paused one must be able to exit
            proc.stop(grace=10.0)
        if self._owns_workdir and not os.environ.get("GFBTEST_E2E_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self, lines: int = 40) -> str:
        return "\n".join(p.tail(lines) for p in self.processes.values())


# -- the bridge -------------------------------------------------------------------------------------


class BridgeProcess:
    """`python -m receiver.cli serve --config <file>` against the API server (KUBECONFIG)."""

    def __init__(self, config: Mapping[str, Any], kubeconfig: Path, workdir: Path, *,
                 port: int | None = None, startup_timeout: float = 60.0) -> None:
        self.port = port or free_port()
        self.config = {**config, "listen": {"host": "127.0.0.1", "port": self.port}}
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.startup_timeout = startup_timeout
        self.config_file = workdir / "bridge.yaml"
        self.process: _EnvProcess | None = None
        self.timings: dict[str, float] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None and self.process.pid is not None
        return self.process.pid

    def start(self, min_receivers: int = 0) -> BridgeProcess:
        atexit.register(self.stop)
        self.config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))
        env = child_env(KUBECONFIG=str(self.kubeconfig), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env.pop("POD_NAMESPACE", None)
        # GFB_* is the bridge's configuration namespace: test knobs must not reach it.
        for name in [n for n in env if n.startswith("GFB_")]:
            del env[name]
        self.process = _EnvProcess(
            "bridge", [os.environ.get("GFBTEST_E2E_PYTHON", _python()), "-m", "receiver.cli",
                       "serve", "--config", str(self.config_file)],
            self.log, ROOT, env)
        started = time.monotonic()
        self.process.start()
        try:
            wait_until("the bridge's /readyz", lambda: self._ready(min_receivers),
                       self.startup_timeout, interval=0.2, on_timeout=self.tail)
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - started
        return self

    def _ready(self, min_receivers: int) -> bool:
        assert self.process is not None
        if self.process.exited() is not None:
            raise HarnessError(f"the bridge exited with code {self.process.exited()}\n"
                               f"{self.tail()}")
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            response = client.get(f"{self.url}/readyz")
        return response.status_code == 200 and response.json().get("receivers", 0) >= min_receivers

    def wait_receivers(self, count: int, timeout: float = 30.0) -> None:
        wait_until(f"the bridge to index {count} Receivers", lambda: self._ready(count), timeout,
                   interval=0.2, on_timeout=self.tail)

    def records(self, message: str) -> list[dict[str, Any]]:
        """The bridge's JSON log records with this message, oldest first; `unix` is added (the
        record's time as a unix timestamp)."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []
        found = []
        needle = json.dumps(message)
        for line in lines:
            if needle not in line:
                continue
            with contextlib.suppress(ValueError, KeyError):
                record = json.loads(line)
                if record.get("msg") == message:
                    stamp = datetime.fromisoformat(str(record["ts"]).replace("Z", "+00:00"))
                    found.append({**record, "unix": stamp.timestamp()})
        return found

    def accepted(self, sha: str) -> list[dict[str, Any]]:
        """The bridge's "push accepted" log records for commit `sha` (oldest first)."""
        return [r for r in self.records("push accepted") if r.get("commit") == sha]

    @property
    def log(self) -> Path:
        return self.workdir / "bridge.log"

    def metrics(self) -> str:
        with httpx.Client(trust_env=False, timeout=10.0) as client:
            return client.get(f"{self.url}/metrics").text

    def ready(self) -> bool:
        """/readyz answers 200 right now (False when it answers otherwise or not at all)."""
        try:
            with httpx.Client(trust_env=False, timeout=2.0) as client:
                return client.get(f"{self.url}/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the bridge's process group (SIGTERM: what a pod's deletion sends)."""
        assert self.process is not None, "not started"
        self.process.signal_group(sig)

    def kill(self) -> None:
        """SIGKILL, no grace (a node lost, an OOM kill); reaped by `stop()`."""
        self.signal(signal.SIGKILL)

    def exited(self) -> int | None:
        return self.process.exited() if self.process is not None else None

    def stop(self) -> None:
        atexit.unregister(self.stop)
        if self.process is not None:
            self.process.stop(grace=25.0)

    def tail(self, lines: int = 60) -> str:
        return self.process.tail(lines) if self.process is not None else "(bridge not started)"


def _python() -> str:
    import sys

    return sys.executable


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """Sum of the samples of `name` (exact) whose labels include `labels`, from /metrics text."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        found = dict(_labels(rest.rstrip("}"))) if rest else {}
        if all(found.get(k) == v for k, v in (labels or {}).items()):
            total += float(value)
    return total


def _labels(text: str) -> Iterable[tuple[str, str]]:
    while text:
        key, _, rest = text.partition('="')
        value, _, text = rest.partition('"')
        yield key.strip(", "), value
        text = text.lstrip(",")
