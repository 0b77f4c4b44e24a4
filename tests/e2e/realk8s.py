"""A real etcd + kube-apiserver on loopback for the tests, like controller-runtime's envtest.

`ControlPlane` starts etcd (own data dir, free client and peer ports, `--unsafe-no-fsync`) and
kube-apiserver (RBAC on, a static admin token in `system:masters`, ServiceAccount tokens signed
with a key made here, self-generated serving certificates whose written `.crt` is the client's
CA), waits for `/readyz`, writes an admin kubeconfig and installs the Flux CRDs from
`tests/fixtures/crds`. Everything lives in one temporary directory, each process in its own
process group; `stop()` kills the groups and removes the directory. Logs go to files in that
directory and their tails are part of every startup error (GFBTEST_KEEP=1 keeps the
directory, logs included, for a post-mortem). With `audit_policy` (see `audit_policy()`), the
API server writes an audit log that `count_patches()` reads: who patched which object, how often.

The binaries come from the cache `scripts/testbin.sh` builds into (`--print-dir`); when one is
missing, `ensure_binaries()` runs `scripts/testbin.sh` to build them. A build that fails is
an error, never a skip.

Use it from a test module with::

    from tests.e2e.realk8s import control_plane  # noqa: F401  (the module-scoped fixture)
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import kubernetes
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent.parent
CRD_DIR = ROOT / "tests" / "fixtures" / "crds"
TESTBIN_SCRIPT = ROOT / "scripts" / "testbin.sh"
CORE_BINARIES = ("etcd", "kube-apiserver", "helm")
ADMIN_USER = "realk8s-admin"

T = TypeVar("T")
log = logging.getLogger(__name__)


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or used."""


# -- binaries -------------------------------------------------------------------------------------


def testbin_dir() -> Path:
    """The cache dir `scripts/testbin.sh` builds into (honours GFBTEST_BIN)."""
    out = subprocess.run(["bash", str(TESTBIN_SCRIPT), "--print-dir"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        raise ControlPlaneError(f"`scripts/testbin.sh --print-dir` failed:\n{out.stderr[-2000:]}")
    return Path(out.stdout.strip())


def ensure_binaries(names: Sequence[str] = CORE_BINARIES, *, build_timeout: float = 4 * 3600
                    ) -> Path:
    """The testbin dir with `names` in it; builds the missing ones with testbin.sh."""
    directory = testbin_dir()
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        # Pinned builds from the Go modules; the script reuses whatever is cached already.
        build = subprocess.run(["bash", str(TESTBIN_SCRIPT), *missing], capture_output=True,
                               text=True, cwd=ROOT, timeout=build_timeout, check=False)
        still = [n for n in names if not (directory / n).is_file()]
        if build.returncode != 0 or still:
            raise ControlPlaneError(
                f"{', '.join(missing)} missing from {directory} and `scripts/testbin.sh "
                f"{' '.join(missing)}` could not build them (exit {build.returncode}):\n"
                f"{build.stdout[-3000:]}\n{build.stderr[-5000:]}")
    return directory


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(what: str, check: Callable[[], T | None], timeout: float,
               interval: float = 0.1, on_timeout: Callable[[], str] | None = None) -> T:
    """Call `check` until it returns something other than None (or False); then return it."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            result = check()
        except ControlPlaneError:
            raise
        except Exception as exc:  # not up yet: connection refused, TLS not ready, ...
            last_error = f"{type(exc).__name__}: {exc}"
            result = None
        if result is not None and result is not False:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            extra = on_timeout() if on_timeout is not None else ""
            raise ControlPlaneError(f"timed out after {timeout:g}s waiting for {what}{detail}"
                                    + (f"\n{extra}" if extra else ""))
        time.sleep(interval)


# -- processes ------------------------------------------------------------------------------------


class Process:
    """One child in its own process group, its output appended to a log file."""

    def __init__(self, name: str, args: Sequence[str], log: Path, cwd: Path) -> None:
        self.name = name
        self.args = list(args)
        self.log = log
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.args)}\n".encode())
            out.flush()
            self._popen = subprocess.Popen(  # our own pinned binaries
                self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=self.cwd, start_new_session=True)

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    def exited(self) -> int | None:
        """The exit code if the process has ended, else None."""
        return None if self._popen is None else self._popen.poll()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; then reap the child.

        The group is killed once more while the exited leader is still a zombie (its pid, and
        so the group id, cannot have been reused yet), so nothing it started outlives it.
        """
        popen, self._popen = self._popen, None
        if popen is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, sig)
            if _wait_exited(popen.pid, wait):
                break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return f"--- {self.name}: no log at {self.log}"
        body = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of {self.log}:\n{body}"


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait until the child `pid` has exited, without reaping it: its pidfd becomes readable
    when it exits (the wait is the kernel's, not a poll)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already reaped
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


# -- the control plane ----------------------------------------------------------------------------


class ControlPlane:
    """etcd + kube-apiserver on 127.0.0.1 with RBAC, an admin token and the Flux CRDs."""

    def __init__(self, bin_dir: Path, *, workdir: Path | None = None, crd_dir: Path = CRD_DIR,
                 startup_timeout: float = 90.0,
                 audit_policy: Mapping[str, Any] | None = None) -> None:
        self.bin_dir = bin_dir
        self.audit_policy = dict(audit_policy) if audit_policy is not None else None
        self.crd_dir = crd_dir
        self.startup_timeout = startup_timeout
        self._owns_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gfb-realk8s-"))
        self.cert_dir = self.workdir / "certs"
        self.kubeconfig = self.workdir / "kubeconfig.yaml"
        self.admin_token = secrets.token_hex(24)
        self.etcd_port = self.etcd_peer_port = self.port = 0
        self.etcd: Process | None = None
        self.apiserver: Process | None = None
        self.timings: dict[str, float] = {}
        self._clients: list[Any] = []
        self._http: httpx.Client | None = None

    # -- addresses ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The serving certificate kube-apiserver generated, followed by its CA."""
        return self.cert_dir / "apiserver.crt"

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        started = time.monotonic()
        atexit.register(self.stop)
        try:
            self._start_etcd()
            self.timings["etcd"] = time.monotonic() - started
            self._write_credentials()
            self.port = free_port()
            self._start_apiserver()
            self.timings["kube-apiserver"] = time.monotonic() - started - self.timings["etcd"]
            self.write_kubeconfig(self.kubeconfig, self.admin_token)
            crds_started = time.monotonic()
            self.install_crds(load_yaml_dir(self.crd_dir))
            self.timings["crds"] = time.monotonic() - crds_started
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - started

    def stop(self) -> None:
        """Kill both process groups, close our clients, remove the temporary directory."""
        atexit.unregister(self.stop)
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        if self._http is not None:
            self._http.close()
            self._http = None
        for proc in (self.apiserver, self.etcd):
            if proc is not None:
                proc.stop()
        if self._owns_workdir and not os.environ.get("GFBTEST_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart_apiserver(self) -> float:
        """Stop kube-apiserver (SIGTERM, graceful) and start it again on the same port, with
        the same etcd, certificates and keys (tokens stay valid).

        Returns the seconds from the stop until /readyz answered 200 again.
        """
        assert self.apiserver is not None, "not started"
        started = time.monotonic()
        self.apiserver.stop(grace=15.0)
        if self._http is not None:  # its pooled connections died with the server
            self._http.close()
            self._http = None
        self._start_apiserver(fresh=False)
        return time.monotonic() - started

    def logs(self) -> str:
        return "\n".join(p.tail() for p in (self.etcd, self.apiserver) if p is not None)

    # -- etcd ----------------------------------------------------------------------------------------

    def _start_etcd(self) -> None:
        self.etcd_port = free_port()
        self.etcd_peer_port = free_port()
        while self.etcd_peer_port == self.etcd_port:
            self.etcd_peer_port = free_port()
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self.etcd = Process("etcd", [
            str(self.bin_dir / "etcd"),
            "--name=realk8s",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=realk8s={peer}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ], self.workdir / "etcd.log", self.workdir)
        self.etcd.start()

        def healthy() -> bool:
            self._check_alive(self.etcd)
            response = httpx.get(f"{client}/health", timeout=2.0)
            return response.status_code == 200 and response.json().get("health") == "true"

        wait_until("etcd /health", healthy, self.startup_timeout, on_timeout=self.logs)

    # -- kube-apiserver -----------------------------------------------------------------------------

    def _write_credentials(self) -> None:
        self.cert_dir.mkdir(mode=0o700, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        (self.workdir / "sa.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (self.workdir / "sa.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        # token,user,uid,"group1,group2"
        (self.workdir / "tokens.csv").write_text(
            f'{self.admin_token},{ADMIN_USER},{ADMIN_USER}-uid,"system:masters"\n')
        for name in ("sa.key", "tokens.csv"):
            (self.workdir / name).chmod(0o600)

    def _apiserver_args(self) -> list[str]:
        return [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--advertise-address=127.0.0.1",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={self.cert_dir}",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--allow-privileged=true",
            "--disable-admission-plugins=ServiceAccount",
            "--authorization-mode=RBAC",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            f"--service-account-issuer=https://127.0.0.1:{self.port}/",
            f"--service-account-key-file={self.workdir / 'sa.pub'}",
            f"--service-account-signing-key-file={self.workdir / 'sa.key'}",
            # On SIGTERM, end open watches after 2s instead of holding them until the HTTP
            # server's shutdown timeout (60s): clients see the stream end and reconnect.
            "--shutdown-watch-termination-grace-period=2s",
            *self._audit_args(),
        ]

    # -- audit log ----------------------------------------------------------------------------------

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def _audit_args(self) -> list[str]:
        if self.audit_policy is None:
            return []
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(self.audit_policy, sort_keys=False))
        # Blocking: an event is in the file before the API server answers the request, so a
        # test reads every request that has been answered. No rotation.
        return [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json", "--audit-log-mode=blocking",
                "--audit-log-maxsize=0", "--audit-log-maxbackup=0"]

    def audit_events(self) -> list[dict[str, Any]]:
        """Every complete audit event written so far (ResponseComplete or Panic stage), oldest
        first. Needs `audit_policy`."""
        if self.audit_policy is None:
            raise ControlPlaneError("the control plane runs without an audit policy")
        try:
            text = self.audit_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        events = []
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:  # the line being written right now
                continue
            if isinstance(event, dict) and event.get("stage") in ("ResponseComplete", "Panic"):
                events.append(event)
        return events

    def requests_on(self, verbs: Iterable[str], *, group: str, resource: str, namespace: str,
                    name: str, subresource: str = "", user: str | None = None
                    ) -> list[dict[str, Any]]:
        """The audit events of `verbs` requests on one object (by `user`, or anyone), answered
        whatever the answer, oldest first."""
        wanted = set(verbs)
        found = []
        for event in self.audit_events():
            ref = event.get("objectRef") or {}
            if (event.get("verb") in wanted
                    and (user is None or (event.get("user") or {}).get("username") == user)
                    and ref.get("apiGroup", "") == group and ref.get("resource") == resource
                    and ref.get("namespace", "") == namespace and ref.get("name") == name
                    and ref.get("subresource", "") == subresource):
                found.append(event)
        return found

    def count_requests(self, verb: str, *, user: str, group: str, resource: str, namespace: str,
                       name: str, subresource: str = "") -> int:
        """How many `verb` requests `user` made on one object (answered, whatever the answer),
        from the audit log."""
        return len(self.requests_on((verb,), user=user, group=group, resource=resource,
                                    namespace=namespace, name=name, subresource=subresource))

    def count_patches(self, user: str, group: str, resource: str, namespace: str, name: str
                      ) -> int:
        """PATCH requests by `user` on the object itself (not its status), from the audit log."""
        return self.count_requests("patch", user=user, group=group, resource=resource,
                                   namespace=namespace, name=name)

    def _start_apiserver(self, *, fresh: bool = True) -> None:
        if fresh or self.apiserver is None:
            self.apiserver = Process("kube-apiserver", self._apiserver_args(),
                                     self.workdir / "kube-apiserver.log", self.workdir)
        apiserver = self.apiserver
        apiserver.start()
        context: list[ssl.SSLContext] = []

        def ready() -> bool:
            self._check_alive(apiserver)
            if not context:
                if not self.ca_file.is_file():  # written by kube-apiserver once it starts
                    return False
                context.append(ssl.create_default_context(cafile=str(self.ca_file)))
            response = httpx.get(f"{self.url}/readyz", verify=context[0], timeout=5.0)
            return response.status_code == 200

        wait_until("kube-apiserver /readyz", ready, self.startup_timeout, interval=0.2,
                   on_timeout=self.logs)

    def _check_alive(self, proc: Process | None) -> None:
        if proc is None:
            return
        code = proc.exited()
        if code is not None:
            raise ControlPlaneError(f"{proc.name} exited with code {code}\n{proc.tail(60)}")

    def write_kubeconfig(self, path: Path, token: str, *, user: str = ADMIN_USER) -> Path:
        """A kubeconfig for `token` (server, the CA file, the bearer token)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "realk8s", "cluster": {
                "server": self.url, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "realk8s", "context": {"cluster": "realk8s", "user": user}}],
            "current-context": "realk8s",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    # -- clients ------------------------------------------------------------------------------------

    def api_client(self, token: str | None = None, *, pool_maxsize: int = 32
                   ) -> kubernetes.client.ApiClient:
        """A `kubernetes` ApiClient for `token` (default: the admin's), verifying the CA.

        Closed by `stop()`; closing it earlier is fine.
        """
        config = kubernetes.client.Configuration()
        config.host = self.url
        config.ssl_ca_cert = str(self.ca_file)
        config.verify_ssl = True
        # "authorization" is the key every client generation reads the bearer token from.
        config.api_key = {"authorization": token or self.admin_token}
        config.api_key_prefix = {"authorization": "Bearer"}
        config.connection_pool_maxsize = pool_maxsize
        client = kubernetes.client.ApiClient(config)
        self._clients.append(client)
        return client

    def http(self) -> httpx.Client:
        """A plain HTTP client for the API server as admin (JSON in, JSON out)."""
        if self._http is None:
            self._http = httpx.Client(
                base_url=self.url, timeout=30.0,
                verify=ssl.create_default_context(cafile=str(self.ca_file)),
                headers={"Authorization": f"Bearer {self.admin_token}",
                         "Accept": "application/json"})
        return self._http

    def request(self, method: str, path: str, body: Any = None, *,
                params: Mapping[str, str] | None = None, token: str | None = None,
                content_type: str = "application/json", ok: Iterable[int] = (200, 201)
                ) -> dict[str, Any]:
        """One REST call; raises ControlPlaneError unless the status is in `ok`."""
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        content = None if body is None else (
            body if isinstance(body, bytes) else _json_bytes(body))
        response = self.http().request(method, path, content=content, params=params,
                                       headers=headers)
        if response.status_code not in set(ok):
            raise ControlPlaneError(
                f"{method} {path}: HTTP {response.status_code}: {response.text[:2000]}")
        if not response.content:
            return {}
        data = response.json()
        return data if isinstance(data, dict) else {"items": data}

    # -- objects ------------------------------------------------------------------------------------

    def install_crds(self, docs: Iterable[Mapping[str, Any]], timeout: float = 60.0) -> None:
        """Create the CustomResourceDefinitions (existing ones are left) and wait until every
        one is Established and its resource is served."""
        names = []
        for doc in docs:
            if doc.get("kind") != "CustomResourceDefinition":
                continue
            self.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc,
                         ok=(201, 409))
            names.append(doc["metadata"]["name"])
        for name in names:
            crd = wait_until(f"CRD {name} to be Established",
                             functools.partial(self._established, name), timeout)
            group = crd["spec"]["group"]
            plural = crd["spec"]["names"]["plural"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    # Established can precede the group showing up in discovery by a moment.
                    wait_until(f"{group}/{version['name']} {plural} to be served",
                               functools.partial(self._serves, group, version["name"], plural),
                               timeout)

    def _established(self, name: str) -> dict[str, Any] | None:
        crd = self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
        conditions = (crd.get("status") or {}).get("conditions") or []
        if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
            return crd
        return None

    def _serves(self, group: str, version: str, plural: str) -> bool:
        body = self.request("GET", f"/apis/{group}/{version}", ok=(200, 404))
        return any(r.get("name") == plural for r in body.get("resources") or [])

    def ensure_namespace(self, *names: str) -> None:
        for name in names:
            self.request("POST", "/api/v1/namespaces",
                         {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
                         ok=(201, 409))

    def service_account_token(self, namespace: str, name: str, *,
                              expiration_seconds: int = 3600) -> str:
        """A token for the ServiceAccount from the TokenRequest API (the SA must exist)."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [], "expirationSeconds": expiration_seconds}}
        answer = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token", body)
        token = (answer.get("status") or {}).get("token")
        if not isinstance(token, str) or not token:
            raise ControlPlaneError(f"TokenRequest for {namespace}/{name} returned no token")
        return token


FLUX_GROUPS = ("source.toolkit.fluxcd.io", "kustomize.toolkit.fluxcd.io",
               "helm.toolkit.fluxcd.io", "notification.toolkit.fluxcd.io",
               "image.toolkit.fluxcd.io")


def audit_policy(groups: Sequence[str] = FLUX_GROUPS, verbs: Sequence[str] = ("patch", "update"),
                 bodies: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """An audit.k8s.io/v1 Policy: `verbs` on the resources of `groups` at Metadata level (who,
    what, which object, the answer; no bodies), nothing else. `bodies` (group -> resources,
    e.g. `"kustomizations/status"`) are logged at Request level instead: the request body too,
    for a test that reads what was written (a status history, the marks a patch added)."""
    rules: list[dict[str, Any]] = []
    if bodies:
        rules.append({"level": "Request", "verbs": list(verbs),
                      "resources": [{"group": g, "resources": list(r)}
                                    for g, r in bodies.items()]})
    rules += [{"level": "Metadata", "verbs": list(verbs),
               "resources": [{"group": g} for g in groups]},
              {"level": "None"}]
    return {"apiVersion": "audit.k8s.io/v1", "kind": "Policy",
            "omitStages": ["RequestReceived"], "rules": rules}


def _json_bytes(body: Any) -> bytes:
    return json.dumps(body).encode()


def load_yaml_dir(directory: Path) -> list[dict[str, Any]]:
    """Every YAML document of every *.yaml file in `directory` (sorted by file name)."""
    docs: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                docs.append(doc)
    if not docs:
        raise ControlPlaneError(f"no YAML documents in {directory}")
    return docs


# -- the pytest fixture ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def control_plane() -> Iterator[ControlPlane]:
    """etcd + kube-apiserver + the Flux CRDs, started once per test module."""
    try:
        bin_dir = ensure_binaries()
    except (ControlPlaneError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"cannot build the real test binaries: {exc}", pytrace=False)
    plane = ControlPlane(bin_dir)
    try:
        plane.start()
    except ControlPlaneError as exc:
        pytest.fail(f"the control plane did not start: {exc}", pytrace=False)
    log.info("control plane up at %s in %s", plane.url,
             ", ".join(f"{k} {v:.1f}s" for k, v in plane.timings.items()))
    try:
        yield plane
    finally:
        plane.stop()
