"""Side by side with Flux: notification-controller's own Receiver and the bridge, same pushes.

One run, one machine, one real API server (etcd + kube-apiserver from `tests.e2e.realk8s`, with an
audit log). notification-controller (the real binary, `tests.e2e.e2e_harness.FluxControllers`) and
the bridge (`gitea-flux-bridge serve` as a subprocess) run side by side, each with its own
ServiceAccount (bound to cluster-admin) so the audit log tells their API calls apart. Each gets
its own namespace with the same objects: a GitRepository, two Kustomizations on different paths
and a `generic-hmac` Receiver listing all three (same token). Both are sent the same bytes with
the same `X-Signature: sha256=<hex>`: an Actions-style body naming the repository, ref, commit
and changed path (notification-controller ignores the body; the bridge routes by it).

Two phases per receiver, one receiver at a time (the other idles):

1. **paced**: `--paced` pushes, each a new commit, one every 1.2 s (past the bridge's 1 s
   coalescing window). For the bridge, after each push this script plays source-controller
   (the admin writes the GitRepository's status: the pushed commit, Ready), so the bridge goes
   on to annotate the touched Kustomization as it would in a cluster. API writes per push
   here is the cost of one push on a quiet system.
2. **load**: `wrk` with one fixed signed body for `--duration` seconds (`--connections`
   connections): requests per second, p50 and p99 latency, non-2xx replies, API writes per
   request under load, RSS (VmRSS, sampled every 0.25 s: idle before, peak during) and CPU
   seconds per 1000 requests.

**API writes are counted from the API server's audit log** (policy: Metadata level for
get/list/create/update/patch/delete on the source and kustomize groups, nothing else), by the
ServiceAccount that made them, between the start of a phase and two seconds after its end
(the bridge's trailing coalesced patch goes out up to one window later). Unlike a count of
resourceVersion changes, this also counts patches that change nothing (notification-controller
stamps `requestedAt` with second precision, so under load most of its patches are no-ops that
still cost an API write).

The bridge's `rate_limit` is raised for the load phase (its default, 50 requests/s per
Receiver with a burst of 100, would answer most of the load with 429; notification-controller
has no such limit), and `deliveries.max_count` too, with short tracking timeouts, since no
source-controller reports the load phase's commit and each request stays a tracked delivery
until its timeout.

    python -m benchmarks.bench_vs_flux [--duration 20] [--connections 16] [--paced 10]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import cpu_seconds
from receiver import signatures as sig
from tests.e2e.e2e_harness import BridgeProcess, FluxControllers, ensure_binaries, rss_kib
from tests.e2e.realk8s import ControlPlane, wait_until

TOKEN = "bench-vs-flux-receiver-token"
REPO_URL = "https://gitea.example.com/platform/fleet"
BENCH_NS = "bench"
NC_NS, GFB_NS = "bench-nc", "bench-gfb"
RECEIVER = "push"
AUDITED_GROUPS = ("source.toolkit.fluxcd.io", "kustomize.toolkit.fluxcd.io")
MERGE_PATCH = "application/merge-patch+json"
WRITE_VERBS = frozenset({"create", "update", "patch", "delete"})
SOURCE_API = "/apis/source.toolkit.fluxcd.io/v1"
KUSTOMIZE_API = "/apis/kustomize.toolkit.fluxcd.io/v1"
RECEIVER_API = "/apis/notification.toolkit.fluxcd.io/v1"
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    verbs: ["get", "list", "create", "update", "patch", "delete"]
    resources:
      - group: "source.toolkit.fluxcd.io"
      - group: "kustomize.toolkit.fluxcd.io"
  - level: None
"""


class AuditedControlPlane(ControlPlane):
    """The test control plane with an audit log of the Flux objects' API calls."""

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.log"

    def _apiserver_args(self) -> list[str]:
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(AUDIT_POLICY)
        return [*super()._apiserver_args(), f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}", "--audit-log-maxsize=0",
                "--audit-log-format=json"]


# -- requests -------------------------------------------------------------------------------------


def push_body(sha: str) -> bytes:
    return json.dumps({"repository": REPO_URL, "ref": "refs/heads/main", "sha": sha,
                       "paths": ["clusters/bench/apps/settings.yaml"]},
                      separators=(",", ":")).encode()


def signature(body: bytes) -> str:
    return "sha256=" + hmac.new(TOKEN.encode(), body, hashlib.sha256).hexdigest()


def lua_script(path: str, body: bytes) -> str:
    return f"""
wrk.method = "POST"
wrk.path = "{path}"
wrk.body = [==[{body.decode()}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Signature"] = "{signature(body)}"

done = function(summary, latency, requests)
  io.write(string.format("GFB_RESULT p50_us=%d p99_us=%d\\n",
    latency:percentile(50), latency:percentile(99)))
end
"""


def run_wrk(url: str, script: Path, duration: int, connections: int) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s",
         str(script), url], capture_output=True, text=True, check=True,
        timeout=duration + 60).stdout
    result = {"rps": float(_find(r"Requests/sec:\s+([\d.]+)", out)),
              "requests": float(_find(r"(\d+) requests in", out)),
              "p50_ms": float(_find(r"p50_us=(\d+)", out)) / 1000,
              "p99_ms": float(_find(r"p99_us=(\d+)", out)) / 1000}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors:.*?timeout (\d+)", out)
    result["non2xx"] = float(non2xx.group(1)) if non2xx else 0.0
    result["timeouts"] = float(errors.group(1)) if errors else 0.0
    return result


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"wrk output lacks {pattern!r}:\n{text}")
    return match.group(1)


# -- measuring --------------------------------------------------------------------------------------


class Audit:
    """API calls on the Flux objects per user between two points of the audit log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def calls(self, since: int, window: tuple[float, float] | None = None
              ) -> Counter[tuple[str, str, str]]:
        """(user, verb, resource/name) -> count of completed calls after byte offset `since`;
        with `window` (unix times), only calls the API server received within it."""
        counts: Counter[tuple[str, str, str]] = Counter()
        with self.path.open("rb") as handle:
            handle.seek(since)
            for line in handle:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("stage") != "ResponseComplete":
                    continue
                ref = event.get("objectRef") or {}
                if ref.get("apiGroup") not in AUDITED_GROUPS or ref.get("subresource"):
                    continue
                if window is not None:
                    received = _unix(event["requestReceivedTimestamp"])
                    if not window[0] <= received <= window[1]:
                        continue
                what = f"{ref.get('resource')}/{ref.get('name', '*')}"
                counts[(event["user"]["username"], event["verb"], what)] += 1
        return counts


def _unix(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def tally(calls: Counter[tuple[str, str, str]], user: str) -> tuple[int, int, dict[str, int]]:
    """(writes, reads, writes by resource/name) of one user."""
    writes = reads = 0
    by_object: Counter[str] = Counter()
    for (who, verb, what), count in calls.items():
        if who != user:
            continue
        if verb in WRITE_VERBS:
            writes += count
            by_object[what] += count
        elif verb in ("get", "list"):
            reads += count
    return writes, reads, dict(by_object)


@contextmanager
def sample_rss(pid: int, interval: float = 0.25) -> Iterator[list[int]]:
    samples: list[int] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            samples.append(rss_kib(pid))
            stop.wait(interval)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


# -- setup ------------------------------------------------------------------------------------------


def service_account_kubeconfig(plane: ControlPlane, name: str) -> tuple[Path, str]:
    plane.request("POST", f"/api/v1/namespaces/{BENCH_NS}/serviceaccounts", {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}, ok=(201, 409))
    plane.request("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": f"bench-{name}"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": BENCH_NS}]},
        ok=(201, 409))
    user = f"system:serviceaccount:{BENCH_NS}:{name}"
    path = plane.write_kubeconfig(plane.workdir / f"{name}.kubeconfig",
                                  plane.service_account_token(BENCH_NS, name), user=user)
    return path, user


def make_objects(plane: ControlPlane, namespace: str) -> None:
    plane.ensure_namespace(namespace)
    plane.request("POST", f"/api/v1/namespaces/{namespace}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "receiver-token"},
        "stringData": {"token": TOKEN}})
    plane.request("POST", f"{SOURCE_API}/namespaces/{namespace}/gitrepositories", {
        "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
        "metadata": {"name": "fleet"},
        "spec": {"interval": "1h", "url": REPO_URL + ".git", "ref": {"branch": "main"}}})
    for name in ("apps", "infra"):
        plane.request("POST", f"{KUSTOMIZE_API}/namespaces/{namespace}/kustomizations", {
            "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
            "metadata": {"name": name},
            "spec": {"interval": "1h", "path": f"./clusters/bench/{name}", "prune": False,
                     "sourceRef": {"kind": "GitRepository", "name": "fleet"}}})
    plane.request("POST", f"{RECEIVER_API}/namespaces/{namespace}/receivers", {
        "apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
        "metadata": {"name": RECEIVER},
        "spec": {"type": "generic-hmac", "secretRef": {"name": "receiver-token"},
                 "resources": [
                     {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
                      "name": "fleet"},
                     {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                      "name": "apps"},
                     {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                      "name": "infra"}]}})


def receiver_ready(plane: ControlPlane, namespace: str) -> bool:
    receiver = plane.request("GET", f"{RECEIVER_API}/namespaces/{namespace}/receivers/{RECEIVER}")
    status = receiver.get("status") or {}
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return bool(status.get("webhookPath")) and bool(ready) and ready[0].get("status") == "True"


def report_artifact(plane: ControlPlane, namespace: str, sha: str) -> None:
    """Play source-controller: the GitRepository has `main@sha1:<sha>` and is Ready."""
    path = f"{SOURCE_API}/namespaces/{namespace}/gitrepositories/fleet"
    generation = plane.request("GET", path)["metadata"]["generation"]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    revision = f"main@sha1:{sha}"
    plane.request("PATCH", f"{path}/status", {"status": {
        "observedGeneration": generation,
        "artifact": {"revision": revision, "digest": "sha256:" + "0" * 64,
                     "lastUpdateTime": stamp, "path": f"gitrepository/{namespace}/fleet/x.tar.gz",
                     "url": f"http://127.0.0.1:1/gitrepository/{namespace}/fleet/x.tar.gz"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Succeeded",
                        "message": f"stored artifact for revision '{revision}'",
                        "lastTransitionTime": stamp, "observedGeneration": generation}]}},
        content_type=MERGE_PATCH)


def annotation(plane: ControlPlane, namespace: str, kind_path: str) -> str:
    found = plane.request("GET", f"{kind_path.format(ns=namespace)}")
    return str((found["metadata"].get("annotations") or {}).get("reconcile.fluxcd.io/requestedAt", ""))


def _annotation_changed(plane: ControlPlane, namespace: str, path: str, before: str) -> bool:
    return annotation(plane, namespace, path) != before


# -- the phases -------------------------------------------------------------------------------------


def paced(plane: ControlPlane, audit: Audit, url: str, user: str, namespace: str, count: int,
          *, play_source: bool) -> dict[str, Any]:
    """`count` pushes of new commits, one at a time; API calls per push by `user`."""
    apps = KUSTOMIZE_API + "/namespaces/{ns}/kustomizations/apps"
    since = audit.mark()
    latencies = []
    with httpx.Client(trust_env=False, timeout=30.0) as client:
        for _ in range(count):
            sha = secrets.token_hex(20)
            body = push_body(sha)
            before = annotation(plane, namespace, apps)
            started = time.perf_counter()
            response = client.post(url, content=body, headers={
                "Content-Type": "application/json", "X-Signature": signature(body)})
            latencies.append(time.perf_counter() - started)
            if response.status_code // 100 != 2:
                raise RuntimeError(f"{url}: {response.status_code} {response.text}")
            if play_source:
                report_artifact(plane, namespace, sha)
                # The bridge annotates the touched Kustomization once the source has the commit.
                wait_until("the bridge to annotate apps",
                           functools.partial(_annotation_changed, plane, namespace, apps, before),
                           30, interval=0.05)
            time.sleep(1.2)
    time.sleep(2.0)
    writes, reads, by_object = tally(audit.calls(since), user)
    return {"writes_per_push": writes / count, "reads_per_push": reads / count,
            "writes_by_object": by_object,
            "p50_ms": sorted(latencies)[len(latencies) // 2] * 1000}


def load(audit: Audit, url: str, path: str, user: str, pid: int, duration: int,
         connections: int, work: Path) -> dict[str, Any]:
    body = push_body(secrets.token_hex(20))
    script = work / f"load-{pid}.lua"
    script.write_text(lua_script(path, body))
    rss_idle = rss_kib(pid)
    cpu_before = cpu_seconds(pid)
    since = audit.mark()
    with sample_rss(pid) as samples:
        started = time.time()
        result: dict[str, Any] = dict(run_wrk(url, script, duration, connections))
        ended = time.time()
    cpu = cpu_seconds(pid) - cpu_before
    time.sleep(2.0)
    # Writes the API server received while wrk ran: a receiver that queues work keeps writing
    # after its clients are gone, and those writes belong to requests wrk never counted.
    writes, _, by_object = tally(audit.calls(since, (started, ended)), user)
    after, _, _ = tally(audit.calls(since), user)
    result.update({
        "writes": float(writes), "writes_after": float(after - writes),
        "writes_per_second": writes / (ended - started),
        "writes_per_request": writes / result["requests"] if result["requests"] else 0.0,
        "writes_by_object": by_object,
        "rss_idle_mib": rss_idle / 1024, "rss_peak_mib": max(samples or [0]) / 1024,
        "cpu_per_1k": cpu / result["requests"] * 1000 if result["requests"] else 0.0,
    })
    return result


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0], allow_abbrev=False)
    p.add_argument("--duration", type=int, default=20, help="seconds of wrk load per receiver")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--paced", type=int, default=10, help="paced pushes per receiver")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install -y wrk")
    command = "python -m benchmarks.bench_vs_flux " + " ".join(sys.argv[1:])
    total_started = time.monotonic()

    bin_dir = ensure_binaries(("etcd", "kube-apiserver", "notification-controller"))
    work = Path(tempfile.mkdtemp(prefix="gfb-bench-vs-flux-"))
    plane = AuditedControlPlane(bin_dir)
    flux: FluxControllers | None = None
    bridge: BridgeProcess | None = None
    try:
        plane.start()
        plane.ensure_namespace(BENCH_NS)
        nc_kubeconfig, nc_user = service_account_kubeconfig(plane, "notification-controller")
        gfb_kubeconfig, gfb_user = service_account_kubeconfig(plane, "gitea-flux-bridge")
        make_objects(plane, NC_NS)
        make_objects(plane, GFB_NS)

        flux = FluxControllers(bin_dir, nc_kubeconfig, workdir=work / "flux")
        (work / "flux").mkdir()
        flux.start(["notification-controller"])
        wait_until("notification-controller's Receiver to be Ready",
                   lambda: receiver_ready(plane, NC_NS), 60)
        nc_pid = flux.pid("notification-controller")
        nc_path = "/hook/" + sig.hook_digest(TOKEN, RECEIVER, NC_NS)

        bridge = BridgeProcess({
            "cluster_name": "bench",
            "log_level": "info",
            "rate_limit": {"requests_per_second": 1_000_000, "burst": 1_000_000},
            "deliveries": {"max_count": 1_000_000, "max_age_seconds": 120},
            "reconcile": {"source_timeout_seconds": 10, "consumer_timeout_seconds": 12},
        }, gfb_kubeconfig, work)
        bridge.start(min_receivers=2)
        gfb_path = "/hook/" + sig.hook_digest(TOKEN, RECEIVER, GFB_NS)

        audit = Audit(plane.audit_log)
        print("paced pushes ...", file=sys.stderr)
        results: dict[str, dict[str, Any]] = {"notification-controller": {}, "gitea-flux-bridge": {}}
        results["notification-controller"]["paced"] = paced(
            plane, audit, flux.receiver_url + nc_path, nc_user, NC_NS, args.paced,
            play_source=False)
        results["gitea-flux-bridge"]["paced"] = paced(
            plane, audit, bridge.url + gfb_path, gfb_user, GFB_NS, args.paced, play_source=True)
        print("load ...", file=sys.stderr)
        results["notification-controller"]["load"] = load(
            audit, flux.receiver_url, nc_path, nc_user, nc_pid, args.duration, args.connections,
            work)
        results["gitea-flux-bridge"]["load"] = load(
            audit, bridge.url, gfb_path, gfb_user, bridge.pid, args.duration, args.connections,
            work)
    finally:
        if bridge is not None:
            bridge.stop()
        if flux is not None:
            flux.stop()
        plane.stop()
        if os.environ.get("GFB_BENCH_KEEP"):
            print(f"kept {work} and {plane.workdir}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print_table(results, args)
    print(f"\nCommand: `{command.strip()}` (whole run {time.monotonic() - total_started:.0f}s; "
          f"{os.cpu_count()} CPUs; notification-controller v1.9.3, kube-apiserver v1.36.3)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n### Receiver side by side: generic-hmac, same signed pushes, one API server\n\n"
          f"Load: wrk -t1 -c{args.connections} -d{args.duration}s, one fixed signed body. "
          f"Paced: {args.paced} pushes of new commits, 1.2 s apart.\n")
    print("| | notification-controller | gitea-flux-bridge |")
    print("|---|---:|---:|")
    nc, gfb = results["notification-controller"], results["gitea-flux-bridge"]
    rows = [
        ("requests/s (load)", "{rps:.0f}", "load"),
        ("p50 latency (load)", "{p50_ms:.1f} ms", "load"),
        ("p99 latency (load)", "{p99_ms:.1f} ms", "load"),
        ("non-2xx / timeouts (load)", "{non2xx:.0f} / {timeouts:.0f}", "load"),
        ("API writes per request (load)", "{writes_per_request:.3f}", "load"),
        ("API writes/s (load)", "{writes_per_second:.0f}", "load"),
        ("API writes after wrk stopped", "{writes_after:.0f}", "load"),
        ("API writes per push (paced)", "{writes_per_push:.1f}", "paced"),
        ("API reads per push (paced)", "{reads_per_push:.1f}", "paced"),
        ("latency per push (paced, p50)", "{p50_ms:.1f} ms", "paced"),
        ("RSS idle", "{rss_idle_mib:.0f} MiB", "load"),
        ("RSS peak under load", "{rss_peak_mib:.0f} MiB", "load"),
        ("CPU seconds per 1000 requests", "{cpu_per_1k:.2f}", "load"),
    ]
    for label, fmt, phase in rows:
        print(f"| {label} | {fmt.format(**nc[phase])} | {fmt.format(**gfb[phase])} |")
    print("\nAPI writes by object (audit log):")
    for who, phases in results.items():
        for phase in ("paced", "load"):
            objects = ", ".join(f"{k} {v}" for k, v in sorted(phases[phase]["writes_by_object"].items()))
            print(f"- {who}, {phase}: {objects or 'none'}")


if __name__ == "__main__":
    main()
