"""Latency at fixed rates below saturation, the bridge and the bare endpoint in the same run.

    python -m benchmarks.bench_latency [--duration 10] [--fractions 0.25 0.5 0.75]

Both servers as in `bench_ingest` (fleet of 2,000 GitRepositories, 10,000 Kustomizations, 200
Receivers; `deliveries.max_count` 10,000). Load: `oha` (cargo install oha). First the saturation
rate of each endpoint (oha, 64 connections, unthrottled); then `oha -q <rate>` at each fraction
of the **bridge's** saturation rate, the same absolute rate for both endpoints, with
`--latency-correction` (no coordinated omission). Every request is a push of a new commit
(`-Z`: one body per line) through one hook path: the bridge's is an organisation-wide Receiver
(`hook-all`: every GitRepository and Kustomization by label), and the bodies cycle over the
fleet's 2,000 repositories, so nothing joins or dedupes and no object collects more than a few
delivery marks. (Through one repository's Receiver, every push past 512 within the replay
window is refused its mark by design, `TooManyMarks`: that measured the refusal, not a push.)
The bridge's deliveries by outcome are printed after the runs, and for each fixed rate the
bridge's CPU per push: its process CPU time over the run (background work included: patches,
evaluations, time-outs, Events) divided by the pushes answered, which a saturation burst hides
(work a push leaves behind runs after the burst). `--bridge-root` runs the bridge from another
checkout (before/after with the same script).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bench_ingest import Setup, push_body, stop, wait_bare, wait_ready
from benchmarks.common import cpu_seconds, free_port
from benchmarks.fleetgen import ALL_RECEIVER, ALL_TOKEN
from receiver.signatures import hook_digest

REPOS = 2000  # Setup's fleet

OHA = shutil.which("oha") or str(Path.home() / ".cargo" / "bin" / "oha")


def oha(url: str, bodies: Path, token: str, duration: int, rate: float | None,
        connections: int) -> dict[str, Any]:
    cmd = [OHA, "--no-tui", "--output-format", "json", "-z", f"{duration}s", "-c", str(connections),
           "-m", "POST", "-T", "application/json", "-H", "X-Gitea-Event: push",
           "-H", f"Authorization: Bearer {token}", "-Z", str(bodies)]
    if rate is not None:
        cmd += ["-q", str(rate), "--latency-correction"]
    out = json.loads(subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout)
    pct = out["latencyPercentiles"]
    codes = out.get("statusCodeDistribution") or {}
    return {"rps": out["summary"]["requestsPerSec"],
            "p50": (pct["p50"] or 0) * 1000, "p99": (pct["p99"] or 0) * 1000,
            "p999": (pct["p99.9"] or 0) * 1000,
            "non2xx": sum(v for k, v in codes.items() if not k.startswith("2")),
            "codes": codes, "errors": sum((out.get("errorDistribution") or {}).values()),
            "error_kinds": out.get("errorDistribution") or {}}


def delivery_outcomes(url: str) -> dict[str, float]:
    """`gfb_deliveries_total` by outcome, from the bridge's /metrics."""
    text = httpx.get(url, timeout=10, trust_env=False).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        found = re.match(r'gfb_deliveries_total\{[^}]*outcome="([^"]+)"[^}]*\} ([0-9.e+]+)$', line)
        if found:
            out[found.group(1)] = out.get(found.group(1), 0.0) + float(found.group(2))
    return out


def print_stalls(stalls: dict[str, Any], windows: dict[str, tuple[float, float]]) -> None:
    """The probe's loop stalls (`benchmarks.stalls`) that fell in the bridge's fixed-rate runs."""
    for name, (began, ended) in windows.items():
        inside = [s for s in stalls["longest"] if began <= s["wall_time"] <= ended]
        print(f"\nloop stalls over {stalls['threshold_ms']:.0f} ms at {name}: {len(inside)}, "
              f"{sum(s['ms'] for s in inside):.0f} ms in all")
        for s in inside[:8]:
            print(f"  {s['ms']} ms at +{s['wall_time'] - began:.2f} s: main thread ran "
                  f"{s.get('main_run_ms')} ms, waited for a CPU {s.get('main_waited_for_cpu_ms')} "
                  f"ms; other threads {s.get('other_threads_cpu_ms')} ms; collector {s['gc_ms']} ms"
                  f" (generations {s['gc_generations']})")
            for count, stack in s["stacks"][:3]:
                print(f"      {count} x {stack}")


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--saturation-seconds", type=int, default=8)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--bodies", type=int, default=4000, help="distinct commits to cycle over")
    p.add_argument("--bridge-root", type=Path, default=None,
                   help="run the bridge from this checkout (default: this one)")
    p.add_argument("--probe", action="store_true",
                   help="run the bridge under benchmarks.probe and print its report")
    a = p.parse_args()
    if not Path(OHA).exists():
        sys.exit("oha is needed: cargo install oha")
    work = Path(tempfile.mkdtemp(prefix="gfb-latency-"))
    setup = Setup(work, receiver_for_all=True,
                  **({"root": a.bridge_root.resolve()} if a.bridge_root else {}))
    bridge_path = f"/hook/{hook_digest(ALL_TOKEN, ALL_RECEIVER, 'flux-system')}"
    bare_path = setup.requests[0][0]
    bodies = work / "bodies.txt"
    with bodies.open("w") as f:
        for i in range(a.bodies):
            body = push_body(i % REPOS, i)
            head = json.loads(body)["after"]
            f.write(body.decode().replace(head, f"{i:040x}").replace("\n", "") + "\n")
    ports = {"bare": free_port(), "bridge": free_port()}
    procs = {"bare": setup.start_bare(ports["bare"]), "bridge": setup.start_bridge(
        ports["bridge"], work / "probe.json" if a.probe else None)}
    results: dict[str, dict[str, Any]] = {}
    windows: dict[str, tuple[float, float]] = {}  # the fixed-rate runs of the bridge, wall time
    try:
        wait_bare(ports["bare"])
        wait_ready(f"http://127.0.0.1:{ports['bridge']}/readyz")
        url = {"bare": f"http://127.0.0.1:{ports['bare']}{bare_path}",
               "bridge": f"http://127.0.0.1:{ports['bridge']}{bridge_path}"}
        token = {"bare": "bench-token-0", "bridge": ALL_TOKEN}
        sat = {n: oha(url[n], bodies, token[n], a.saturation_seconds, None, a.connections)
               for n in ("bare", "bridge")}
        base = sat["bridge"]["rps"]
        for fraction in a.fractions:
            rate = round(base * fraction)
            for n in ("bare", "bridge"):
                before, began = cpu_seconds(procs[n].pid), time.time()
                run = oha(url[n], bodies, token[n], a.duration, rate, a.connections)
                used = cpu_seconds(procs[n].pid) - before
                if n == "bridge":
                    windows[f"{fraction:.0%}"] = (began, time.time())
                results[f"{n} {fraction:.0%}"] = {
                    "rate": rate, **run,
                    "cpu_us_per_push": used / max(1.0, run["rps"] * a.duration) * 1e6}
        outcomes = delivery_outcomes(f"http://127.0.0.1:{ports['bridge']}/metrics")
    finally:
        stop(*procs.values())
        if a.probe and (work / "probe.json").exists():
            report = json.loads((work / "probe.json").read_text())
            print("probe: " + json.dumps({k: v for k, v in report.items() if k != "stalls"}))
            print(f"\ncollector pauses over the whole run: {report['gc']}")
            print_stalls(report["stalls"], windows)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nthe bridge's deliveries by outcome: {outcomes}")
    print(f"\nsaturation (oha -c{a.connections}, {a.saturation_seconds}s): bare "
          f"{sat['bare']['rps']:.0f} req/s (p99 {sat['bare']['p99']:.1f} ms), bridge "
          f"{sat['bridge']['rps']:.0f} req/s (p99 {sat['bridge']['p99']:.1f} ms); ratio "
          f"{sat['bridge']['rps'] / sat['bare']['rps']:.2f}\n")
    print("| rate (share of bridge saturation) | endpoint | achieved req/s | p50 ms | p99 ms "
          "| p99.9 ms | p99 / bare p99 | non-2xx (cut off at the end) | CPU µs per request |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for fraction in a.fractions:
        bare = results[f"bare {fraction:.0%}"]
        for n in ("bare", "bridge"):
            r = results[f"{n} {fraction:.0%}"]
            ratio = r["p99"] / bare["p99"] if bare["p99"] else float("nan")
            print(f"| {r['rate']} ({fraction:.0%}) | {n} | {r['rps']:.0f} | {r['p50']:.2f} | "
                  f"{r['p99']:.2f} | {r['p999']:.2f} | {ratio:.2f} | {r['non2xx']} ({r['errors']}) | "
                  f"{r['cpu_us_per_push']:.0f} |")
    print("JSON " + json.dumps({"saturation": sat, "fixed": results,
                                "median_p99_ratio": statistics.median(
                                    results[f"bridge {f:.0%}"]["p99"] / results[f"bare {f:.0%}"]["p99"]
                                    for f in a.fractions)}))


if __name__ == "__main__":
    main()
