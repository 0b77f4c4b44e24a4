"""Where the tail comes from: the ingest load with probes and a sampling profile.

    pip install -e '.[bench]'      # py-spy
    python -m benchmarks.bench_tail [--duration 10] [--rounds 2] [--max-count 2000000]

Runs the bridge under `benchmarks.probe` (GC pauses, event-loop lag, time in watch handling and
per thread) on the ingest benchmark's fleet, drives it with wrk as `bench_ingest` does, samples
it with py-spy (non-blocking, 100 Hz), and prints: wrk per round, the probe's report, and the
share of samples per stage of the request (inclusive) and per function (self).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from benchmarks.bench_ingest import Setup, run_wrk, stop, wait_ready
from benchmarks.common import free_port, rss_mb

# Stages of a request, matched on the collapsed stack (first match from the leaf wins for
# self time; inclusive counts every stage on the stack).
STAGES = {
    "uvicorn/httptools protocol": "httptools_impl.py",
    "starlette routing/middleware": "starlette/",
    "ingest.hook (whole handler)": "hook (receiver/web/ingest.py",
    "signature check": "receiver/signatures.py",
    "JSON decode": "json/decoder.py",
    "payload parse": "receiver/gitea/payloads.py",
    "routing.plan_push": "plan_push (receiver/push/routing.py",
    "payload selector": "select_payload (receiver/push/selector.py",
    "delivery id encode (itsdangerous)": "encode (receiver/delivery/record.py",
    "reconciler.start_delivery": "start_delivery (receiver/delivery/reconcile.py",
    "reconciler._evaluate": "_evaluate (receiver/delivery/reconcile.py",
    "delivery_state.evaluate": "evaluate (receiver/delivery/state.py",
    "store.upsert (watch/patch handling)": "upsert (receiver/flux/store.py",
    "status listeners": "receiver/status/",
    "metrics": "prometheus_client/",
    "JSON reply": "render (starlette/responses.py",
    "logging": "logging/",
    "deliveries.expire": "expire (receiver/delivery/store.py",
    "garbage collector": "<gc>",
}


def summarise_profile(raw: Path) -> dict[str, object]:
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        for stage, needle in STAGES.items():
            if needle in stack:
                inclusive[stage] += count
        frames = stack.split(";")
        leaf[frames[-1].strip()] += count
    share = {k: round(100 * v / max(total, 1), 1) for k, v in inclusive.most_common()}
    top = {k: round(100 * v / max(total, 1), 1) for k, v in leaf.most_common(25)}
    return {"samples": total, "inclusive_percent": share, "self_percent_top": top}


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--max-count", type=int, default=10_000)
    p.add_argument("--workload", choices=("fresh", "repeat"), default="fresh")
    p.add_argument("--no-profile", action="store_true", help="probes only, no py-spy")
    p.add_argument("--raw", type=Path, help="also keep py-spy's raw collapsed stacks here")
    a = p.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not a.no_profile and not Path(spy).exists():
        sys.exit("py-spy is needed: pip install -e '.[bench]'")
    work = Path(tempfile.mkdtemp(prefix="gfb-tail-"))
    setup = Setup(work, max_count=a.max_count, workload=a.workload)
    port = free_port()
    probe_out = work / "probe.json"
    bridge = setup.start_bridge(port, probe_out)
    rounds = []
    sampler = None
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz")
        rss_loaded = rss_mb(bridge.pid)
        if not a.no_profile:
            sampler = subprocess.Popen(
                [spy, "record", "--nonblocking", "-r", "100", "-f", "raw", "-o",
                 str(work / "profile.txt"), "-p", str(bridge.pid),
                 "-d", str(a.duration * a.rounds + 2)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(a.rounds):
            rounds.append(run_wrk(f"http://127.0.0.1:{port}", setup.script, a.duration,
                                  a.connections, 1))
        rss_after = rss_mb(bridge.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        if sampler is not None:
            sampler.wait(timeout=60)
    finally:
        if sampler is not None and sampler.poll() is None:
            sampler.terminate()
        stop(bridge)
    print("| round | requests/s | p50 ms | p99 ms | non-2xx |")
    print("|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rounds, 1):
        print(f"| {i} | {r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['non2xx']:.0f} |")
    outcomes: collections.Counter[str] = collections.Counter()
    for outcome, value in re.findall(r'gfb_hook_requests_total\{[^}]*outcome="(\w+)"[^}]*\} ([\d.e+]+)',
                                     metrics):
        outcomes[outcome] += int(float(value))
    print(f"\n/hook outcomes: {dict(outcomes)}")
    print(f"\nRSS {rss_loaded:.0f} MB loaded, {rss_after:.0f} MB after")
    report = json.loads(probe_out.read_text()) if probe_out.exists() else {}
    print("\nprobe:\n" + json.dumps(report, indent=1))
    if not a.no_profile and (work / "profile.txt").exists():
        print("\nprofile:\n" + json.dumps(summarise_profile(work / "profile.txt"), indent=1))
        if a.raw is not None:
            shutil.copyfile(work / "profile.txt", a.raw)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
