"""Signed 8 KiB pushes per second against one `serve --manifests` worker, next to the bare
Starlette endpoint, both driven by wrk on this machine. Prints a markdown table.

    python -m benchmarks.bench_ingest [--duration 15] [--connections 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.common import free_port, parse_wrk, rss_mb
from benchmarks.fleetgen import HOST, generate
from receiver.signatures import hmac_hex, hook_digest
from tests import gitea_payloads as gp

ROOT = Path(__file__).resolve().parent.parent
TARGET_BYTES = 8 * 1024




def push_body(repo: int, seq: int) -> bytes:
    """A push shaped exactly as Gitea sends it (repository, pusher, sender, up to five commits
    with their file lists), grown commit by commit to about 8 KiB, touching one region's apps."""
    full_name = f"org-{repo % 50}/repo-{repo}"
    root = f"https://{HOST}/"
    commits: list[dict[str, object]] = []
    n = 0
    while True:
        files = [f"clusters/region-0/apps/service-{n}/deployment.yaml",
                 f"clusters/region-0/apps/service-{n}/kustomization.yaml"]
        commits.insert(0, gp.commit(full_name, f"change {seq}-{n}", modified=files, root=root))
        n += 1
        body = gp.gitea_bytes(gp.push(full_name, "refs/heads/main", commits, root=root))
        if len(body) >= TARGET_BYTES or n > 40:
            return body


# The part of both scripts that makes each request's delivery id (and, fresh, its commit) one
# of a kind: a counter per thread, the thread's number and the run's nonce. setup() runs in
# the main Lua state and numbers the threads; thread:set() makes the number a global of that
# thread's own state, which request() reads (a local `tid` would read 0 in every thread, and
# two threads would send the same ids and commits: joins and duplicates, not pushes).
_LUA_THREADS = """local i = 0
local threads = 0
local nonce = "00000000"
setup = function(thread) threads = threads + 1; thread:set("tid", threads) end
init = function(args) if args[1] then nonce = args[1] end end
"""


def lua_script(requests: list[tuple[str, bytes, str]]) -> str:
    entries = ",\n".join(
        f'{{path="{p}", sig="{s}", body=[==[{b.decode()}]==]}}' for p, b, s in requests)
    return f"""
local reqs = {{
{entries}
}}
{_LUA_THREADS}request = function()
  i = i + 1
  local r = reqs[(i % #reqs) + 1]
  local headers = {{}}
  headers["Content-Type"] = "application/json"
  headers["X-Gitea-Event"] = "push"
  headers["X-Gitea-Signature"] = r.sig
  headers["X-Gitea-Delivery"] = "bench-" .. nonce .. "-" .. tostring(tid) .. "-" .. tostring(i)
  return wrk.format("POST", r.path, headers, r.body)
end
"""


def fresh_lua_script(requests: list[tuple[str, list[bytes], str]]) -> str:
    """Every request a new commit: the body's head commit id is replaced by a fresh one, so
    nothing joins a delivery in flight and every push is routed, recorded and annotated. The
    Receivers are `generic` ones authenticated by bearer token (a body that changes per request
    cannot carry a precomputed HMAC)."""
    entries = ",\n".join(
        "{{path=\"{}\", token=\"{}\", parts={{{}}}}}".format(
            p, t, ", ".join(f"[==[{part.decode()}]==]" for part in parts))
        for p, parts, t in requests)
    return f"""
local reqs = {{
{entries}
}}
{_LUA_THREADS}request = function()
  i = i + 1
  local r = reqs[(i % #reqs) + 1]
  local sha = nonce .. string.format("%02x%030d", tid, i)
  local headers = {{}}
  headers["Content-Type"] = "application/json"
  headers["X-Gitea-Event"] = "push"
  headers["Authorization"] = "Bearer " .. r.token
  headers["X-Gitea-Delivery"] = "bench-" .. nonce .. "-" .. tostring(tid) .. "-" .. tostring(i)
  return wrk.format("POST", r.path, headers, table.concat(r.parts, sha))
end
"""


def wait_ready(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback only
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")






def run_wrk(url: str, script: Path, duration: int, connections: int, threads: int) -> dict[str, float]:
    """One wrk run. Its delivery ids (and, fresh, its commits) carry a nonce of their own: a
    round must not repeat the ids of the round before (they would be answered `duplicate`)."""
    nonce = secrets.token_hex(4)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script),
         url, "--", nonce],
        capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


class Setup:
    """A generated fleet, the bridge's config, and wrk scripts for the bridge and the bare app.

    workload "fresh": every push a new commit (the full path: route, record, annotate; the
    deliveries time out after `timeout` seconds, as no Flux runs, and the store keeps the last
    `max_count`). "repeat": the same 200 commits over and over (pushes join their delivery in
    flight once the first one is in)."""

    def __init__(self, work: Path, repos: int = 2000, kustomizations: int = 10000,
                 receivers: int = 200, max_count: int = 10_000, workload: str = "fresh",
                 timeout: float = 2.0, root: Path = ROOT, python: str = sys.executable,
                 receiver_for_all: bool = False) -> None:
        self.work = work
        self.root = root
        self.python = python
        self.fleet = work / "fleet"
        rtype = "generic" if workload == "fresh" else "github"
        generate(self.fleet, repos, kustomizations, receivers, receiver_type=rtype,
                 receiver_for_all=receiver_for_all)
        self.config = work / "config.yaml"
        self.config.write_text(
            "log_level: warning\nrate_limit: {requests_per_second: 1000000000, burst: 1000000000}\n"
            f"deliveries: {{max_count: {max_count}, max_age_seconds: 600}}\n"
            + (f"reconcile: {{source_timeout_seconds: {timeout}, "
               f"consumer_timeout_seconds: {timeout}}}\n" if workload == "fresh" else ""))
        self.requests: list[tuple[str, bytes, str]] = []
        fresh: list[tuple[str, list[bytes], str]] = []
        for r in range(receivers):
            token = f"bench-token-{r}"
            body = push_body(r, r)
            path = f"/hook/{hook_digest(token, f'hook-{r}', 'flux-system')}"
            self.requests.append((path, body, hmac_hex("sha256", token, body)))
            head = json.loads(body)["after"].encode()
            fresh.append((path, body.split(head), token))
        self.script = work / "push.lua"
        self.script.write_text(fresh_lua_script(fresh) if workload == "fresh"
                               else lua_script(self.requests))
        self.bare_script = work / "bare.lua"
        self.bare_script.write_text(lua_script(self.requests[:1]))
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def start_bridge(self, port: int, probe_out: Path | None = None) -> subprocess.Popen[bytes]:
        """`serve` on the fleet; under `benchmarks.probe`, reporting to `probe_out`, if given."""
        module, env = (("benchmarks.probe", {"PROBE_OUT": str(probe_out)}) if probe_out
                       else ("receiver.cli", {}))
        return subprocess.Popen(
            [self.python, "-m", module, "serve", "--manifests", str(self.fleet), "--config",
             str(self.config), "--port", str(port)],
            env={**self.env, "PYTHONPATH": str(self.root), **env}, cwd=self.root)

    def start_bare(self, port: int, spin_us: int = 0) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "benchmarks.bare_app:app", "--port", str(port),
             "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level",
             "warning"], env={**self.env, "BARE_TOKEN": "bench-token-0",
                              "BARE_SPIN_US": str(spin_us)}, cwd=ROOT)


def wait_bare(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/hook/x", timeout=1)
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("bare endpoint not ready")


def stop(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--duration", type=int, default=15)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repos", type=int, default=2000)
    p.add_argument("--kustomizations", type=int, default=10000)
    p.add_argument("--receivers", type=int, default=200)
    p.add_argument("--workload", choices=("fresh", "repeat"), default="fresh")
    p.add_argument("--max-count", type=int, default=10_000, help="deliveries.max_count")
    p.add_argument("--timeout", type=float, default=2.0,
                   help="fresh: seconds until an unanswered delivery times out (no Flux runs)")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=DIR[:PYTHON]",
                   help="also run the bridge from this checkout (e.g. a release) in each round, "
                        "with its own interpreter (default DIR/.venv/bin/python); repeatable")
    p.add_argument("--control-us", type=int, default=0, metavar="N",
                   help="also run the bare endpoint spending N µs more CPU per request (e.g. "
                        "the bridge's CPU per push less the bare's): the latency any endpoint "
                        "of that cost gets from the same load generator")
    p.add_argument("--probe", action="store_true",
                   help="run this checkout's bridge under benchmarks.probe and print what the "
                        "server saw of each request, beside wrk's latency")
    a = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install -y wrk")

    work = Path(tempfile.mkdtemp(prefix="gfb-bench-"))
    setup = Setup(work, a.repos, a.kustomizations, a.receivers, a.max_count, a.workload, a.timeout)
    ports = {"bare": free_port(), "bridge": free_port()}
    probe_out = work / "probe.json"
    procs = {"bare": setup.start_bare(ports["bare"]), "bridge": setup.start_bridge(
        ports["bridge"], probe_out if a.probe else None)}
    control = f"bare + {a.control_us} µs" if a.control_us > 0 else ""
    if control:
        ports[control] = free_port()
        procs[control] = setup.start_bare(ports[control], a.control_us)
    baselines = []
    for spec in a.baseline:
        name, _, where = spec.partition("=")
        root, _, python = where.partition(":")
        base = Setup.__new__(Setup)
        base.__dict__.update(setup.__dict__)
        base.root = Path(root).resolve()
        base.python = python or str(base.root / ".venv" / "bin" / "python")
        ports[name] = free_port()
        procs[name] = base.start_bridge(ports[name])
        baselines.append(name)
    bares = ["bare", control] if control else ["bare"]
    names = [*bares, *baselines, "bridge"]
    bridges = [n for n in names if n not in bares]
    rss_loaded: dict[str, float] = {}
    rss_after: dict[str, float] = {}
    metrics: dict[str, str] = {}
    rounds: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    try:
        for n in bares:
            wait_bare(ports[n])
        for n in bridges:
            wait_ready(f"http://127.0.0.1:{ports[n]}/readyz")
            rss_loaded[n] = rss_mb(procs[n].pid)
        for _ in range(a.rounds):
            for n in names:
                rounds[n].append(run_wrk(f"http://127.0.0.1:{ports[n]}",
                                         setup.bare_script if n in bares else setup.script,
                                         a.duration, a.connections, a.threads))
        for n in bridges:
            rss_after[n] = rss_mb(procs[n].pid)
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[n]}/metrics", timeout=10) as r:
                metrics[n] = r.read().decode()
    finally:
        stop(*procs.values())
        probe = json.loads(probe_out.read_text()) if a.probe and probe_out.exists() else None
        shutil.rmtree(work, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[name])

    print(f"\nobjects: {a.repos} GitRepositories, {a.kustomizations} Kustomizations, "
          f"{a.receivers} Receivers; body {len(setup.requests[0][1])} bytes; workload "
          f"{a.workload}; deliveries.max_count {a.max_count}; wrk -t{a.threads} "
          f"-c{a.connections} -d{a.duration}s x {a.rounds} rounds (medians)\n")
    print("| endpoint | requests/s | ratio to bare | p50 ms | p99 ms | p99 / bare | non-2xx "
          "| first round / median | RSS MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in names:
        rss = f"{rss_loaded[n]:.0f} loaded / {rss_after[n]:.0f} after" if n in bridges else "-"
        print(f"| {n} | {med(n, 'rps'):.0f} | {med(n, 'rps') / med('bare', 'rps'):.2f} | "
              f"{med(n, 'p50'):.2f} | {med(n, 'p99'):.2f} | {med(n, 'p99') / med('bare', 'p99'):.2f} | "
              f"{med(n, 'non2xx'):.0f} | {rounds[n][0]['rps'] / med(n, 'rps'):.2f} | {rss} |")
    print("\nper round (requests/s, p99 ms, ratio to bare in that round):")
    for i in range(a.rounds):
        bare_rps = rounds["bare"][i]["rps"]
        print(f"  round {i + 1}: " + "; ".join(
            f"{n} {rounds[n][i]['rps']:.0f} rps p99 {rounds[n][i]['p99']:.1f}"
            + (f" ({rounds[n][i]['rps'] / bare_rps:.2f})" if n in bridges else "") for n in names))
    seconds = a.duration * a.rounds
    for n in bridges:
        annotated = sum(float(m) for m in re.findall(
            r'gfb_targets_annotated_total\{kind="GitRepository"\} ([\d.e+]+)', metrics[n]))
        accepted = sum(r["requests"] - r["non2xx"] for r in rounds[n])
        print(f"{n}: pushes accepted {accepted:.0f}; GitRepository patches {annotated:.0f} over "
              f"{a.receivers} sources in {seconds} s = "
              f"{annotated / a.receivers / seconds:.2f} per object per second")
    if probe is not None:
        print_probe(probe)
    print("JSON " + json.dumps({n: rounds[n] for n in names}))


def print_probe(probe: dict[str, Any]) -> None:
    """What the bridge saw of its requests over all rounds (`benchmarks.probe`), in ms."""
    print("\nthe bridge, as the server saw it (all rounds; ms):")
    for label, summary in probe["timed"].items():
        if label.startswith("HTTP"):
            print(f"  {label}: n {summary['count']}, p50 {summary.get('p50_ms')}, "
                  f"p99 {summary.get('p99_ms')}, p99.9 {summary.get('p999_ms')}, "
                  f"max {summary.get('max_ms')}")
    lag = probe["loop_lag"]
    print(f"  event-loop lag: p99 {lag.get('p99_ms')}, max {lag.get('max_ms')}; full "
          f"collections {probe['gc']['gen2'].get('count')}, longest "
          f"{probe['gc']['gen2'].get('max_ms')}")


if __name__ == "__main__":
    main()
