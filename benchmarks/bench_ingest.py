"""Signed 8 KiB pushes per second against one `serve --manifests` worker, next to the bare
Starlette endpoint, both driven by wrk on this machine. Prints a markdown table.

    python -m benchmarks.bench_ingest [--duration 15] [--connections 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

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


def lua_script(requests: list[tuple[str, bytes, str]]) -> str:
    entries = ",\n".join(
        f'{{path="{p}", sig="{s}", body=[==[{b.decode()}]==]}}' for p, b, s in requests)
    return f"""
local reqs = {{
{entries}
}}
local i = 0
local tid = 0
setup = function(thread) tid = tid + 1; thread:set("tid", tid) end
request = function()
  i = i + 1
  local r = reqs[(i % #reqs) + 1]
  local headers = {{}}
  headers["Content-Type"] = "application/json"
  headers["X-Gitea-Event"] = "push"
  headers["X-Gitea-Signature"] = r.sig
  headers["X-Gitea-Delivery"] = "bench-" .. tostring(tid) .. "-" .. tostring(i)
  return wrk.format("POST", r.path, headers, r.body)
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
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=int, default=15)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repos", type=int, default=2000)
    p.add_argument("--kustomizations", type=int, default=10000)
    p.add_argument("--receivers", type=int, default=200)
    a = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install -y wrk")

    work = Path(tempfile.mkdtemp(prefix="gfb-bench-"))
    fleet = work / "fleet"
    generate(fleet, a.repos, a.kustomizations, a.receivers)
    config = work / "config.yaml"
    config.write_text(
        "log_level: warning\nrate_limit: {requests_per_second: 1000000000, burst: 1000000000}\n"
        "deliveries: {max_count: 2000000, max_age_seconds: 600}\n")

    requests = []
    for r in range(a.receivers):
        token = f"bench-token-{r}"
        body = push_body(r, r)
        requests.append((f"/hook/{hook_digest(token, f'hook-{r}', 'flux-system')}", body,
                         hmac_hex("sha256", token, body)))
    script = work / "push.lua"
    script.write_text(lua_script(requests))
    bare_script = work / "bare.lua"
    token0 = "bench-token-0"
    bare_script.write_text(lua_script([(requests[0][0], requests[0][1],
                                        hmac_hex("sha256", token0, requests[0][1]))]))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bport, qport = free_port(), free_port()
    bridge = subprocess.Popen(
        [sys.executable, "-m", "receiver.cli", "serve", "--manifests", str(fleet), "--config",
         str(config), "--port", str(bport)], env=env, cwd=ROOT)
    bare = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "benchmarks.bare_app:app", "--port", str(qport),
         "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"],
        env={**env, "BARE_TOKEN": token0}, cwd=ROOT)
    try:
        wait_ready(f"http://127.0.0.1:{bport}/readyz")
        wait_ready_bare = f"http://127.0.0.1:{qport}/hook/x"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(wait_ready_bare, timeout=1)
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.2)
        rss_loaded = rss_mb(bridge.pid)
        rounds: dict[str, list[dict[str, float]]] = {"bridge": [], "bare": []}
        for _ in range(a.rounds):
            rounds["bare"].append(run_wrk(f"http://127.0.0.1:{qport}", bare_script, a.duration,
                                          a.connections, a.threads))
            rounds["bridge"].append(run_wrk(f"http://127.0.0.1:{bport}", script, a.duration,
                                            a.connections, a.threads))
        rss_after = rss_mb(bridge.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{bport}/metrics", timeout=10) as r:
            metrics = r.read().decode()
    finally:
        for proc in (bridge, bare):
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rounds[name])

    ratio = med("bridge", "rps") / med("bare", "rps")
    print(f"\nobjects: {a.repos} GitRepositories, {a.kustomizations} Kustomizations, "
          f"{a.receivers} Receivers; body {len(requests[0][1])} bytes; wrk -t{a.threads} "
          f"-c{a.connections} -d{a.duration}s x {a.rounds} rounds (medians)\n")
    print("| endpoint | requests/s | p50 ms | p99 ms | non-2xx | RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("bare", "bridge"):
        rss = f"{rss_loaded:.0f} loaded / {rss_after:.0f} after" if name == "bridge" else "-"
        print(f"| {name} | {med(name, 'rps'):.0f} | {med(name, 'p50'):.2f} | "
              f"{med(name, 'p99'):.2f} | {med(name, 'non2xx'):.0f} | {rss} |")
    print(f"\nbridge / bare throughput ratio: {ratio:.2f}")
    annotated = sum(float(m) for m in re.findall(
        r'gfb_targets_annotated_total\{kind="GitRepository"\} ([\d.e+]+)', metrics))
    accepted = sum(r["requests"] - r["non2xx"] for r in rounds["bridge"])
    seconds = a.duration * a.rounds
    print(f"pushes accepted: {accepted:.0f}; GitRepository patches: {annotated:.0f} over "
          f"{a.receivers} sources in {seconds} s of load = "
          f"{annotated / a.receivers / seconds:.2f} patches per object per second")
    print("per-round requests/s: " + json.dumps({k: [round(r['rps']) for r in v]
                                                 for k, v in rounds.items()}))


if __name__ == "__main__":
    main()
