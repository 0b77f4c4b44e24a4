"""Flagger as a real test peer (built by `scripts/testbin.sh flagger`), and the least of a kubelet
it needs.

- `install_flagger_crds`: Canary, MetricTemplate and AlertProvider from Flagger's own module
  (`artifacts/flagger/crd.yaml`), read at run time.
- `FlaggerProcess`: `flagger -mesh-provider kubernetes` (blue/green without a mesh) watching one
  namespace, with a short control loop and an unreachable metrics server (analyses without
  metrics never query it).
- `ReadyReplicas`: what the test plays instead of kube-controller-manager and the kubelet, and
  nothing more: for every Deployment in the namespace whose status lags its spec, it writes,
  through the `status` subresource, `observedGeneration` = `metadata.generation` and
  `replicas` = `updatedReplicas` = `readyReplicas` = `availableReplicas` = `spec.replicas`.
  No Pods, no ReplicaSets, no conditions. That is all Flagger reads to call a Deployment ready.
- `CheckServer`: the analysis' `rollout` webhook, served by the test: 200 while `passing`, 500
  otherwise, so a passing and a failing canary are both Flagger's own decisions.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.e2e.e2e_harness import HarnessError, _EnvProcess, _http_ok, child_env, module_dir
from tests.e2e.realk8s import ControlPlane, ControlPlaneError, free_port, wait_until

FLAGGER = "flagger"


def install_flagger_crds(plane: ControlPlane) -> None:
    path = module_dir(FLAGGER) / "artifacts" / "flagger" / "crd.yaml"
    if not path.is_file():
        raise HarnessError(f"no {path.name} in Flagger's module")
    plane.install_crds([d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)])


class FlaggerProcess:
    def __init__(self, bin_dir: Path, kubeconfig: Path, namespace: str, workdir: Path, *,
                 startup_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.startup_timeout = startup_timeout
        dead_metrics = f"http://127.0.0.1:{free_port()}"  # nothing listens: never queried
        self.process = _EnvProcess(FLAGGER, [
            str(bin_dir / FLAGGER), f"-kubeconfig={kubeconfig}", "-mesh-provider=kubernetes",
            f"-namespace={namespace}", f"-port={self.port}", f"-metrics-server={dead_metrics}",
            "-control-loop-interval=2s", "-log-level=info", "-enable-leader-election=false",
            "-enable-config-tracking=false",
        ], workdir / "flagger.log", workdir, child_env(HOME=str(workdir)))

    def start(self) -> FlaggerProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process.start()
        wait_until("flagger /healthz", self._ready, self.startup_timeout, interval=0.2,
                   on_timeout=self.tail)
        return self

    def _ready(self) -> bool:
        if self.process.exited() is not None:
            raise HarnessError(f"flagger exited with code {self.process.exited()}\n{self.tail()}")
        return _http_ok(f"http://127.0.0.1:{self.port}/healthz")

    def stop(self) -> None:
        self.process.stop(grace=10.0)

    def tail(self, lines: int = 40) -> str:
        return self.process.tail(lines)


class ReadyReplicas:
    """Marks the namespace's Deployments' replicas ready (module docstring), on a thread."""

    def __init__(self, plane: ControlPlane, namespace: str, interval: float = 0.3) -> None:
        self.plane = plane
        self.path = f"/apis/apps/v1/namespaces/{namespace}/deployments"
        self.interval = interval
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ready-replicas", daemon=True)

    def start(self) -> ReadyReplicas:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(ControlPlaneError, httpx.HTTPError):
                for deployment in self.plane.request("GET", self.path).get("items") or []:
                    self._settle(deployment)
            self._stop.wait(self.interval)  # a stand-in controller's resync period

    def _settle(self, deployment: dict[str, Any]) -> None:
        meta, spec = deployment["metadata"], deployment.get("spec") or {}
        replicas = spec.get("replicas", 1)
        want = {"observedGeneration": meta.get("generation", 1), "replicas": replicas,
                "updatedReplicas": replicas, "readyReplicas": replicas,
                "availableReplicas": replicas}
        status = deployment.get("status") or {}
        if all(status.get(k, 0) == v for k, v in want.items()):
            return
        body = {**deployment, "status": want}
        # A conflict (Flagger changed it meanwhile) is settled on the next round.
        self.plane.request("PUT", f"{self.path}/{meta['name']}/status", body, ok=(200, 409))
        self.writes += 1


class CheckServer(http.server.ThreadingHTTPServer):
    """The analysis' `rollout` webhook: 200 while `passing`, else 500 with a reason."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _CheckHandler)
        self.passing = True
        self.calls: list[tuple[float, bool]] = []  # (when, answered pass)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/check"

    def start(self) -> CheckServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _CheckHandler(http.server.BaseHTTPRequestHandler):
    server: CheckServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        passing = self.server.passing
        self.server.calls.append((time.time(), passing))
        body = json.dumps({"ok": passing} if passing else {"error": "error rate 12% > 1%"})
        self.send_response(200 if passing else 500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())
