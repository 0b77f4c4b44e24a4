"""Start-up against a real kube-apiserver: seconds from `serve` to the first `/readyz` 200.

One etcd + kube-apiserver (`tests.e2e.realk8s`; etcd's data on a tmpfs when `/dev/shm` exists)
with the Flux CRDs the bridge caches. The script fills it with a mix of Flux objects across
namespaces, in blocks of 100 per namespace slice: 20 GitRepositories, 5 OCIRepositories,
54 Kustomizations, 20 HelmReleases (chartRef to an OCIRepository) and one Receiver (with its
token Secret; Secrets are not counted as objects) listing its slice's GitRepositories and
Kustomizations through `name: "*"` + `matchLabels`. Each object then gets a status as its
controller would write it (Ready condition; sources an artifact revision; consumers the last
applied revision) unless `--no-status`. No Kustomization inventory: real ones are larger.

For each size (ascending; objects are added to reach the next one), `--starts` times:
`python -m receiver.cli serve` (what the `gitea-flux-bridge` command runs) with an admin
kubeconfig, `/readyz` polled every 50 ms from the moment the process is spawned; the wall time
to the first 200 and VmRSS at that moment. Medians are printed. The bridge runs with the
environment its container image sets (the Containerfile's `ENV`, but `GFB_*` and `PATH`: e.g.
`MALLOC_ARENA_MAX`) and its modules compiled, as the image ships it; `--python` names the
interpreter (a virtualenv with only `requirements.lock` installed has the image's packages;
the test extras add about 4 MB). `--baseline NAME=DIR` starts another checkout too, taking
turns with this one against the same objects.

`--idle-sizes N,...` then starts notification-controller (the real binary from the test binaries'
cache, all namespaces) and the bridge side by side against the same API server and objects
(each checkout's bridge in turn beside the same notification-controller), waits until both are
ready and `--settle` seconds more, and reads both VmRSS `--readings` times, `--interval`
seconds apart (medians).

`--profile FILE` runs one more start of the largest size under `py-spy record` (collapsed
stacks, 100 Hz) and prints the heaviest frames up to ready; its timing is not counted.

    python -m benchmarks.bench_startup --sizes 12000,120000 --starts 3 --idle-sizes 12000 \
        --python rt/bin/python --baseline main=../main
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.e2e.e2e_harness import FluxControllers, child_env, rss_kib
from tests.e2e.realk8s import ROOT, ControlPlane, ensure_binaries, free_port

BLOCK = 100  # objects per slice: the mix below
PER_NAMESPACE = 300
MIX = (("GitRepository", 20), ("OCIRepository", 5), ("Kustomization", 54),
       ("HelmRelease", 20), ("Receiver", 1))
API = {"GitRepository": ("source.toolkit.fluxcd.io/v1", "gitrepositories"),
       "OCIRepository": ("source.toolkit.fluxcd.io/v1", "ocirepositories"),
       "Kustomization": ("kustomize.toolkit.fluxcd.io/v1", "kustomizations"),
       "HelmRelease": ("helm.toolkit.fluxcd.io/v2", "helmreleases"),
       "Receiver": ("notification.toolkit.fluxcd.io/v1", "receivers")}
MERGE_PATCH = "application/merge-patch+json"
STAMP = "2026-12-07T10:00:00Z"
DIGEST = "sha256:" + "0" * 64


# -- the objects ------------------------------------------------------------------------------------


def namespace_of(block: int) -> str:
    return f"tenant-{block * BLOCK // PER_NAMESPACE:04d}"


def block_objects(block: int) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(object, status or None) for slice `block`: the mix, names unique in the namespace."""
    ns, b = namespace_of(block), f"b{block}"
    label = {"bench/slice": b}
    sha = f"{block:08x}" + "ab" * 16
    out: list[tuple[dict[str, Any], dict[str, Any] | None]] = []

    def meta(name: str) -> dict[str, Any]:
        return {"name": name, "namespace": ns, "labels": dict(label)}

    def ready(revision: str, extra: dict[str, Any]) -> dict[str, Any]:
        return {"observedGeneration": 1, **extra,
                "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded",
                                "message": f"Applied revision: {revision}",
                                "lastTransitionTime": STAMP, "observedGeneration": 1}]}

    for i in range(20):
        name = f"{b}-repo-{i}"
        revision = f"main@sha1:{sha}"
        artifact = {"revision": revision, "digest": DIGEST, "lastUpdateTime": STAMP,
                    "path": f"gitrepository/{ns}/{name}/{sha}.tar.gz",
                    "url": f"http://source-controller.flux-system.svc/gitrepository/{ns}/{name}/"
                           f"{sha}.tar.gz", "size": 40960}
        out.append(({"apiVersion": API["GitRepository"][0], "kind": "GitRepository",
                     "metadata": meta(name),
                     "spec": {"interval": "10m", "ref": {"branch": "main"},
                              "url": f"https://gitea.bench.example/org-{block % 50}/{name}.git"}},
                    ready(revision, {"artifact": artifact})))
    for i in range(5):
        name = f"{b}-chart-{i}"
        out.append(({"apiVersion": API["OCIRepository"][0], "kind": "OCIRepository",
                     "metadata": meta(name),
                     "spec": {"interval": "10m", "ref": {"semver": ">=1.0.0"},
                              "url": f"oci://registry.bench.example/charts/{name}"}},
                    ready(f"1.2.3@{DIGEST}", {"artifact": {
                        "revision": f"1.2.3@{DIGEST}", "digest": DIGEST,
                        "lastUpdateTime": STAMP, "path": f"ocirepository/{ns}/{name}/x.tar.gz",
                        "url": f"http://source-controller.flux-system.svc/ocirepository/{ns}/"
                               f"{name}/x.tar.gz"}})))
    for i in range(54):
        name = f"{b}-ks-{i}"
        out.append(({"apiVersion": API["Kustomization"][0], "kind": "Kustomization",
                     "metadata": meta(name),
                     "spec": {"interval": "10m", "prune": True, "path": f"./apps/app-{i}/prod",
                              "sourceRef": {"kind": "GitRepository", "name": f"{b}-repo-{i % 20}"}}},
                    ready(f"main@sha1:{sha}", {"lastAppliedRevision": f"main@sha1:{sha}",
                                                "lastAttemptedRevision": f"main@sha1:{sha}"})))
    for i in range(20):
        name = f"{b}-hr-{i}"
        out.append(({"apiVersion": API["HelmRelease"][0], "kind": "HelmRelease",
                     "metadata": meta(name),
                     "spec": {"interval": "10m", "releaseName": name,
                              "chartRef": {"kind": "OCIRepository", "name": f"{b}-chart-{i % 5}"},
                              "values": {"replicaCount": 2, "image": {"tag": "1.2.3"}}}},
                    ready("1.2.3", {"lastAttemptedRevision": "1.2.3",
                                     "lastAttemptedConfigDigest": DIGEST})))
    out.append(({"apiVersion": API["Receiver"][0], "kind": "Receiver", "metadata": meta(f"{b}-hook"),
                 "spec": {"type": "github", "secretRef": {"name": f"{b}-hook"}, "resources": [
                     {"kind": "GitRepository", "name": "*", "matchLabels": dict(label)},
                     {"apiVersion": API["Kustomization"][0], "kind": "Kustomization",
                      "name": "*", "matchLabels": dict(label)}]}}, None))
    return out


def path_of(obj: dict[str, Any]) -> str:
    version, plural = API[obj["kind"]]
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    return f"/apis/{version}/namespaces/{ns}/{plural}/{name}"


class Filler:
    """Creates the slices with `workers` threads, each with its own HTTP/1.1 connection."""

    def __init__(self, plane: ControlPlane, workers: int, with_status: bool) -> None:
        self.plane = plane
        self.workers = workers
        self.with_status = with_status
        self.blocks = 0
        self.counts: Counter[str] = Counter()
        self._local = threading.local()

    def _client(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(
                base_url=self.plane.url, timeout=60.0, verify=str(self.plane.ca_file),
                headers={"Authorization": f"Bearer {self.plane.admin_token}"})
            self._local.client = client
        return client

    def _call(self, method: str, path: str, body: dict[str, Any], content_type: str,
              ok: tuple[int, ...]) -> None:
        data = json.dumps(body).encode()
        for attempt in range(5):
            response = self._client().request(method, path, content=data,
                                              headers={"Content-Type": content_type})
            if response.status_code in ok:
                return
            if response.status_code not in (429, 500, 503, 504) or attempt == 4:
                raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:500]}")
            time.sleep(0.5 * (attempt + 1))

    def _create(self, item: tuple[dict[str, Any], dict[str, Any] | None]) -> None:
        obj, status = item
        path = path_of(obj)
        self._call("POST", path.rsplit("/", 1)[0], obj, "application/json", (201, 409))
        if status is not None and self.with_status:
            self._call("PATCH", path + "/status", {"status": status}, MERGE_PATCH, (200,))

    def fill_to(self, size: int) -> float:
        """Add slices until `size` Flux objects exist; returns the seconds it took."""
        started = time.monotonic()
        target = size // BLOCK
        new = range(self.blocks, target)
        self.plane.ensure_namespace(*sorted({namespace_of(b) for b in new}))
        for b in new:
            secret = {"apiVersion": "v1", "kind": "Secret",
                      "metadata": {"name": f"b{b}-hook", "namespace": namespace_of(b)},
                      "stringData": {"token": f"bench-token-{b}"}}
            self.plane.request("POST", f"/api/v1/namespaces/{namespace_of(b)}/secrets", secret,
                               ok=(201, 409))
        items = [item for b in new for item in block_objects(b)]
        with ThreadPoolExecutor(self.workers) as pool:
            for done, _ in enumerate(pool.map(self._create, items), 1):
                if done % 5000 == 0:
                    rate = done / (time.monotonic() - started)
                    print(f"  {done:,}/{len(items):,} objects ({rate:.0f}/s)", file=sys.stderr)
        for obj, _ in items:
            self.counts[obj["kind"]] += 1
        self.blocks = target
        return time.monotonic() - started


# -- the bridge -------------------------------------------------------------------------------------


# The interpreter that runs the bridges (`--python`): a virtualenv with the image's packages only
# (requirements.lock) measures the process as shipped; the test extras add about 4 MB (`rich`).
PYTHON = [sys.executable]


def bridge_command(config: Path) -> list[str]:
    return [PYTHON[0], "-m", "receiver.cli", "serve", "--config", str(config)]


def image_env(root: Path) -> dict[str, str]:
    """The variables the checkout's container image sets for the process (the `ENV` lines of
    the Containerfile's last stage), but the bridge's own settings (`GFB_*`) and `PATH`: the
    bridge then runs with the interpreter and allocator settings it ships with."""
    path = root / "Containerfile"
    if not path.is_file():
        return {}
    text = path.read_text().replace("\\\n", " ")
    stage = text.rsplit("\nFROM ", 1)[-1]
    env: dict[str, str] = {}
    for line in stage.splitlines():
        if line.startswith("ENV "):
            for pair in line.split()[1:]:
                name, _, value = pair.partition("=")
                if value and not name.startswith("GFB_") and name != "PATH":
                    env[name] = value
    return env


def bridge_env(kubeconfig: Path, root: Path = ROOT) -> dict[str, str]:
    env = child_env(KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    for name in [n for n in env if n.startswith(("GFB_", "MALLOC_")) or n == "POD_NAMESPACE"]:
        del env[name]
    env.update(image_env(root))
    return env


def write_config(work: Path, port: int) -> Path:
    path = work / f"bridge-{port}.yaml"
    path.write_text(yaml.safe_dump({"cluster_name": "bench", "log_level": "warning",
                                    "listen": {"host": "127.0.0.1", "port": port}}))
    return path


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def child_pid(pid: int) -> int | None:
    """The first child of `pid` (py-spy's target), or None."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def start_bridge(kubeconfig: Path, work: Path, *, timeout: float,
                 wrap: list[str] | None = None, root: Path = ROOT
                 ) -> tuple[subprocess.Popen[bytes], int, float, int, dict[str, Any]]:
    """(process, bridge pid, seconds to the first /readyz 200, VmRSS KiB then, its body)."""
    port = free_port()
    log = (work / f"bridge-{port}.log").open("ab")
    started = time.monotonic()
    proc = subprocess.Popen([*(wrap or []), *bridge_command(write_config(work, port))],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            cwd=root, env=bridge_env(kubeconfig, root), start_new_session=True)
    log.close()
    url = f"http://127.0.0.1:{port}/readyz"
    with httpx.Client(trust_env=False, timeout=5.0) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the bridge exited with {proc.returncode}; see {log.name}")
            if time.monotonic() - started > timeout:
                stop(proc)
                raise RuntimeError(f"no /readyz 200 within {timeout:g}s; see {log.name}")
            try:
                response = client.get(url)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code == 200:
                elapsed = time.monotonic() - started
                pid = proc.pid if wrap is None else (child_pid(proc.pid) or proc.pid)
                kib = rss_kib(pid)
                body = response.json()
                body["api_calls"] = api_calls(client.get(f"http://127.0.0.1:{port}/metrics").text)
                return proc, pid, elapsed, kib, body
            time.sleep(0.05)


def api_calls(metrics: str) -> dict[str, list[float]]:
    """call -> [count, seconds summed] of the Kubernetes API calls made so far."""
    calls: dict[str, list[float]] = {}
    for line in metrics.splitlines():
        match = re.match(r'gfb_kubernetes_call_seconds_(count|sum)\{call="([^"]+)".*\} (\S+)', line)
        if match is not None:
            entry = calls.setdefault(match.group(2), [0.0, 0.0])
            entry[match.group(1) == "sum"] += float(match.group(3))
    return calls


def measure_starts(kubeconfig: Path, work: Path, starts: int, expected: int,
                   timeout: float, checkouts: list[tuple[str, Path]]
                   ) -> dict[str, dict[str, Any]]:
    """Per checkout: `starts` starts, the checkouts taking turns (so outside load falls on
    each alike)."""
    out = {name: {"seconds": [], "rss_mib": [], "api_calls": []} for name, _ in checkouts}
    for n in range(starts):
        for name, root in checkouts:
            proc, _, elapsed, kib, body = start_bridge(kubeconfig, work, timeout=timeout,
                                                       root=root)
            stop(proc)
            if body.get("objects", 0) < expected:
                raise RuntimeError(f"ready with {body.get('objects')} objects, {expected} expected")
            out[name]["seconds"].append(elapsed)
            out[name]["rss_mib"].append(kib / 1024)
            out[name]["api_calls"].append(body["api_calls"])
            made = ", ".join(f"{k} {int(c)} ({t:.1f}s)"
                             for k, (c, t) in sorted(body["api_calls"].items()))
            print(f"  start {n + 1} ({name}): {elapsed:.2f}s, {kib / 1024:.0f} MiB, "
                  f"{body.get('objects')} objects, {body.get('receivers')} receivers; "
                  f"API calls before ready: {made}", file=sys.stderr)
    for result in out.values():
        result["load"] = os.getloadavg()[0]
    return out


def profile_start(kubeconfig: Path, work: Path, out: Path, timeout: float) -> list[str]:
    """One start under py-spy; the 15 frames with the most samples (inclusive), as text."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    wrap = [py_spy, "record", "--rate", "100", "--format", "raw", "--output", str(out),
            "--nonblocking", "--"]
    proc, pid, elapsed, _, _ = start_bridge(kubeconfig, work, timeout=timeout * 2, wrap=wrap)
    os.kill(pid, signal.SIGTERM)  # py-spy writes its file when its target exits
    proc.wait(120)
    inclusive: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        samples = int(count)
        total += samples
        for frame in set(stack.split(";")):
            inclusive[frame] += samples
    lines = [f"profiled start: ready after {elapsed:.1f}s under py-spy, {total} samples"]
    lines += [f"{100 * c / total:5.1f}%  {frame}" for frame, c in inclusive.most_common(40)]
    return lines


# -- idle side by side ------------------------------------------------------------------------------


def idle_rss(plane: ControlPlane, bin_dir: Path, work: Path, settle: float, readings: int,
             interval: float, timeout: float, checkouts: list[tuple[str, Path]]
             ) -> dict[str, Any]:
    """notification-controller started once; each checkout's bridge beside it in turn."""
    flux = FluxControllers(bin_dir, plane.kubeconfig, workdir=work / "flux",
                           startup_timeout=timeout)
    (work / "flux").mkdir(exist_ok=True)
    bridge: subprocess.Popen[bytes] | None = None
    out: dict[str, Any] = {"notification-controller": [], "bridges": {}}
    try:
        flux.start(["notification-controller"])
        nc_pid = flux.pid("notification-controller")
        for name, root in checkouts:
            bridge, gfb_pid, _, _, _ = start_bridge(plane.kubeconfig, work, timeout=timeout,
                                                    root=root)
            time.sleep(settle)  # both have listed and indexed; let start-up garbage go
            gfb = []
            for _ in range(readings):
                out["notification-controller"].append(rss_kib(nc_pid) / 1024)
                gfb.append(rss_kib(gfb_pid) / 1024)
                time.sleep(interval)
            out["bridges"][name] = gfb
            stop(bridge)
            bridge = None
        out["load"] = os.getloadavg()[0]
        return out
    finally:
        if bridge is not None:
            stop(bridge)
        flux.stop()


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0], allow_abbrev=False)
    p.add_argument("--sizes", default="12000,120000", help="Flux object counts, ascending")
    p.add_argument("--starts", type=int, default=3, help="starts per size (median)")
    p.add_argument("--workers", type=int, default=16, help="parallel requests when filling")
    p.add_argument("--no-status", action="store_true", help="objects without a status")
    p.add_argument("--idle-sizes", default="",
                   help="also compare idle RSS with notification-controller at these sizes")
    p.add_argument("--settle", type=float, default=30.0)
    p.add_argument("--readings", type=int, default=5)
    p.add_argument("--interval", type=float, default=3.0)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed to get ready")
    p.add_argument("--profile", type=Path, help="py-spy one start of the largest size here")
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter that runs the bridges (e.g. a virtualenv with "
                        "requirements.lock installed: the image's packages, no test extras)")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=DIR",
                   help="also start the bridge from this checkout (its own image settings), "
                        "taking turns with this one")
    args = p.parse_args()
    PYTHON[0] = args.python
    checkouts = [("this checkout", ROOT)] + [
        (name, Path(root).resolve()) for name, _, root in
        (b.partition("=") for b in args.baseline)]
    for _, root in checkouts:  # the image's modules are compiled at install time
        subprocess.run([args.python, "-m", "compileall", "-q", str(root / "receiver")],
                       check=True)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    idle_sizes = {int(s) for s in args.idle_sizes.split(",") if s}
    if not idle_sizes <= set(sizes):
        sys.exit("--idle-sizes must be among --sizes")
    command = "python -m benchmarks.bench_startup " + " ".join(sys.argv[1:])
    total_started = time.monotonic()

    bin_dir = ensure_binaries(("etcd", "kube-apiserver", "notification-controller"))
    shm = Path("/dev/shm")  # etcd on a tmpfs: filling is bound by the API server, not the disk
    workdir = Path(tempfile.mkdtemp(prefix="gfb-bench-startup-",
                                    dir=shm if shm.is_dir() else None))
    plane = ControlPlane(bin_dir, workdir=workdir)
    results: dict[str, Any] = {"sizes": {}, "idle": {}, "command": command}
    try:
        plane.start()
        filler = Filler(plane, args.workers, not args.no_status)
        for size in sizes:
            print(f"filling to {size:,} objects ...", file=sys.stderr)
            fill = filler.fill_to(size)
            expected = filler.blocks * BLOCK
            print(f"  {fill:.0f}s; starting the bridge {args.starts} times", file=sys.stderr)
            by_checkout = measure_starts(plane.kubeconfig, workdir, args.starts, expected,
                                         args.timeout, checkouts)
            results["sizes"][str(size)] = {
                "fill_seconds": fill, "objects": expected, "kinds": dict(filler.counts),
                "checkouts": by_checkout}
            if size in idle_sizes:
                print("idle RSS beside notification-controller ...", file=sys.stderr)
                idle = idle_rss(plane, bin_dir, workdir, args.settle, args.readings,
                                args.interval, args.timeout, checkouts)
                results["idle"][str(size)] = {**idle, "objects": expected}
        if args.profile:
            results["profile"] = profile_start(plane.kubeconfig, workdir, args.profile,
                                               args.timeout)
    finally:
        plane.stop()
        if not os.environ.get("GFB_BENCH_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)
    print_tables(results)
    print(f"\nCommand: `{command.strip()}` (whole run {time.monotonic() - total_started:.0f}s; "
          f"{os.cpu_count()} CPUs)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _runs(values: list[float], fmt: Callable[[float], str]) -> str:
    return " / ".join(fmt(v) for v in values)


def print_tables(results: dict[str, Any]) -> None:
    print("\n| Flux objects | created in | checkout | starts | to /readyz 200 (median) | "
          "each start | RSS at ready (median) | load avg |")
    print("|---:|---:|---|---:|---:|---|---:|---:|")
    for size in results["sizes"].values():
        for name, r in size["checkouts"].items():
            print(f"| {int(size['objects']):,} | {size['fill_seconds']:.0f} s | {name} | "
                  f"{len(r['seconds'])} | **{_median(r['seconds']):.2f} s** | "
                  f"{_runs(r['seconds'], '{:.2f}'.format)} | {_median(r['rss_mib']):.0f} MiB "
                  f"({_runs(r['rss_mib'], '{:.0f}'.format)}) | {r['load']:.1f} |")
    for idle in results["idle"].values():
        print(f"\nIdle RSS, {idle['objects']:,} Flux objects, each bridge beside the same "
              f"notification-controller and API server (load avg {idle['load']:.1f}):\n")
        print("| | median | readings |")
        print("|---|---:|---|")
        rows = [("notification-controller", idle["notification-controller"])] + [
            (f"gitea-flux-bridge ({name})", values) for name, values in idle["bridges"].items()]
        for who, values in rows:
            print(f"| {who} | **{_median(values):.0f} MiB** | "
                  f"{_runs(values, '{:.0f}'.format)} |")
    for line in results.get("profile", []):
        print(line)


if __name__ == "__main__":
    main()
