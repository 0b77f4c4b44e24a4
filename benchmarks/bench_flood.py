"""A flood of the worst unauthenticated request of each class against a real server, with a
`/healthz` probe beside it: does the bridge stay responsive and within its memory?

    python -m benchmarks.bench_flood [--seconds 20] [--connections 16] [--classes ...]

Starts `gitea-flux-bridge serve` on loopback (the in-memory cluster: a handful of Receivers of
each type, a GitRepository and a Kustomization, an events HMAC token) and, for each class in
turn, keeps `--connections` clients sending that class's request back to back for `--seconds`.
Meanwhile a separate process asks `/healthz` every 20 ms on a connection of its own and records
how long each answer took, and the server's RSS is read every 200 ms. Per class it prints the
requests answered (by status), the probe's p50 / p99 / max and the highest RSS. Goal: p99 under
50 ms and RSS under 200 MB in every class. Loopback only; every loop ends at its deadline.

Classes (each the costliest of its kind a stranger can send, with no credential that holds):
- `delivery-bomb`: `GET /deliveries/<id>`, a 5.9 KB id whose payload inflates to 4 MB of
  nested JSON, claiming a real Receiver;
- `form-escapes`: a 3 MB form body, `payload=` and a million `%41`, to a `github` Receiver;
- `hmac-3mib`: a 3 MiB JSON body to a `generic-hmac` Receiver (one HMAC of it each);
- `signature-candidates`: a timestamped signature with the most candidates taken (8) and one
  with 800 (malformed unread), alternately, to a `generic` Receiver;
- `big-head`: 90 headers of 650 bytes (59 KB, under the 431 bound) to an unknown hook path;
- `events-3mib`: a 3 MiB body to `/events` with a wrong signature;
- `unknown-paths`: a new random hook path each time (404; Secret re-reads are throttled);
- `mixed`: all of the above at once, the connections shared among them;
- `baseline` (first): no flood, only the probe: what the shared machine adds by itself.

`--source DIR` runs the server from another checkout (the same script, before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
from itsdangerous.encoding import base64_encode

from benchmarks.bench_ingest import wait_ready
from benchmarks.common import free_port, rss_mb

ROOT = Path(__file__).resolve().parent.parent
TOKENS = {"gitea": "flood-gitea-token", "hmac": "flood-hmac-token", "actions": "flood-actions"}
MiB = 1024 * 1024
Request = tuple[str, str, dict[str, str], bytes]  # method, path, headers, body


def _digest(token: str, name: str, namespace: str = "flux-system") -> str:
    return hashlib.sha256((token + name + namespace).encode()).hexdigest()


def manifests(directory: Path) -> None:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
         "metadata": {"name": "fleet", "namespace": "flux-system"},
         "spec": {"url": "https://gitea.example.com/platform/fleet.git", "interval": "5m",
                  "ref": {"branch": "main"}}},
        {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
         "metadata": {"name": "apps", "namespace": "flux-system"},
         "spec": {"interval": "5m", "path": "./apps", "prune": True,
                  "sourceRef": {"kind": "GitRepository", "name": "fleet"}}},
    ]
    for name, rtype in (("gitea", "github"), ("hmac", "generic-hmac"), ("actions", "generic")):
        docs.append({"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
                     "metadata": {"name": name, "namespace": "flux-system"},
                     "spec": {"type": rtype, "secretRef": {"name": f"{name}-token"},
                              "resources": [{"kind": "GitRepository", "name": "fleet"}]}})
        docs.append({"apiVersion": "v1", "kind": "Secret",
                     "metadata": {"name": f"{name}-token", "namespace": "flux-system"},
                     "stringData": {"token": TOKENS[name]}})
    (directory / "fleet.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs))


def _bomb_id() -> str:
    """The largest id under 6,000 characters that inflates to millions of empty lists."""
    best, count = "", 1024
    while True:
        raw = b'[1,"flux-system/gitea","","",0,"",0,[' + b"[]," * count + b"[]]]"
        candidate = "." + base64_encode(zlib.compress(raw, 9)).decode() + "." + "A" * 43
        if len(candidate) > 5990:
            return best
        best, count = candidate, count * 2


def classes() -> dict[str, Callable[[], Request]]:
    bomb = _bomb_id()
    form = b"payload=" + b"%41" * 1_000_000
    big = json.dumps({"ref": "refs/heads/main", "pad": "x" * (3 * MiB - 100)}).encode()
    bad_hmac = "sha256=" + "0" * 64
    head = {f"x-pad-{i:02d}": "p" * 640 for i in range(90)}
    gitea = f"/hook/{_digest(TOKENS['gitea'], 'gitea')}"
    hmac_path = f"/hook/{_digest(TOKENS['hmac'], 'hmac')}"
    actions = f"/hook/{_digest(TOKENS['actions'], 'actions')}"
    turn = [0]

    def candidates() -> Request:
        turn[0] += 1
        now = int(time.time())
        many = 8 if turn[0] % 2 else 800
        value = f"t={now}," + ",".join(["v1=" + secrets.token_hex(32)] * many)
        return ("POST", actions, {"X-Signature": value}, b'{"sha": "' + b"a" * 40 + b'"}')

    return {
        "delivery-bomb": lambda: ("GET", f"/deliveries/{bomb}",
                                  {"Authorization": "Bearer wrong"}, b""),
        "form-escapes": lambda: ("POST", gitea, {
            "Content-Type": "application/x-www-form-urlencoded", "X-Gitea-Event": "push",
            "X-Gitea-Signature": "0" * 64}, form),
        "hmac-3mib": lambda: ("POST", hmac_path, {
            "Content-Type": "application/json", "X-Signature": bad_hmac}, big),
        "signature-candidates": candidates,
        "big-head": lambda: ("POST", "/hook/" + "0" * 64, head, b""),
        "events-3mib": lambda: ("POST", "/events", {
            "Content-Type": "application/json", "X-Signature": bad_hmac}, big),
        "unknown-paths": lambda: ("POST", "/hook/" + secrets.token_hex(32), {}, b"{}"),
    }


def probe(port: int, seconds: float, out: Connection) -> None:
    """In its own process: GET /healthz every 20 ms; send back each answer's latency (s)."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0,
                      trust_env=False) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                ok = client.get("/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - started if ok else float("inf"))
            time.sleep(max(0.0, 0.02 - (time.perf_counter() - started)))
    out.send(latencies)
    out.close()


async def flood(port: int, seconds: float, connections: int,
                makers: list[Callable[[], Request]]) -> Counter[str]:
    answers: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    if not makers:  # the baseline: the probe alone
        await asyncio.sleep(seconds)
        return answers
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30.0,
                                 limits=limits, trust_env=False) as client:
        async def worker(index: int) -> None:
            make = makers[index % len(makers)]
            while time.monotonic() < deadline:
                method, path, headers, body = make()
                try:
                    reply = await client.request(method, path, headers=headers, content=body)
                    answers[str(reply.status_code)] += 1
                except httpx.HTTPError as exc:
                    answers[type(exc).__name__] += 1

        await asyncio.gather(*(worker(i) for i in range(connections)))
    return answers


def run_class(port: int, pid: int, seconds: float, connections: int,
              makers: list[Callable[[], Request]]) -> dict[str, Any]:
    receiving, sending = multiprocessing.Pipe(duplex=False)
    prober = multiprocessing.Process(target=probe, args=(port, seconds, sending))
    rss: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            rss.append(rss_mb(pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    prober.start()
    try:
        answers = asyncio.run(flood(port, seconds, connections, makers))
        latencies = receiving.recv()
    finally:
        prober.join(timeout=seconds + 30)
        stop.set()
        sampler.join()
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return {"answers": dict(answers), "probes": len(ms), "p50": statistics.median(ms),
            "p99": p99, "max": ms[-1], "rss_max": max(rss, default=rss_mb(pid)),
            "rss_end": rss_mb(pid)}


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--classes", nargs="*", help="a subset of the classes, in this order")
    p.add_argument("--source", type=Path, default=ROOT,
                   help="the checkout whose `receiver` the server runs")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gfb-flood-"))
    (work / "manifests").mkdir()
    manifests(work / "manifests")
    (work / "events-token").write_text("flood-events-token")
    port = free_port()
    (work / "config.yaml").write_text(json.dumps({
        "listen": {"host": "127.0.0.1", "port": port}, "log_level": "warning",
        "events": {"hmac_token": {"file": str(work / "events-token")}}}))
    server = subprocess.Popen(
        [sys.executable, "-m", "receiver.cli", "serve", "--manifests", str(work / "manifests"),
         "--config", str(work / "config.yaml")],
        env={**os.environ, "PYTHONPATH": str(a.source.resolve())}, cwd=a.source,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    all_classes = classes()
    names = a.classes or ["baseline", *all_classes, "mixed"]
    results: dict[str, dict[str, Any]] = {}
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz")
        idle = rss_mb(server.pid)
        for name in names:
            makers = (list(all_classes.values()) if name == "mixed" else
                      [] if name == "baseline" else [all_classes[name]])
            results[name] = run_class(port, server.pid, a.seconds, a.connections, makers)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nserver RSS when ready: {idle:.0f} MB; {a.connections} connections, "
          f"{a.seconds:g} s per class; /healthz every 20 ms from its own process\n")
    print("| class | requests answered (status: count) | req/s | /healthz p50 ms | p99 ms "
          "| max ms | RSS max MB | verdict |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for name, r in results.items():
        answered = sum(v for k, v in r["answers"].items() if k.isdigit())
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["answers"].items()))
        verdict = "met" if r["p99"] < 50 and r["rss_max"] < 200 else "**not met**"
        print(f"| {name} | {codes} | {answered / a.seconds:.0f} | {r['p50']:.1f} | "
              f"{r['p99']:.1f} | {r['max']:.1f} | {r['rss_max']:.0f} | {verdict} |")
    print("JSON " + json.dumps({"idle_rss": idle, "classes": results}))


if __name__ == "__main__":
    main()
