"""Flux events -> Gitea statuses: acceptance rate, event-to-post latency, posts saved by dedupe.

Three processes on this machine: one uvicorn worker (uvloop, httptools) serving the status
service's `POST /events` beside a bare endpoint that only checks the HMAC and parses the JSON
(the stack's ceiling, for the ratio); a Gitea stand-in (Starlette on uvicorn) that answers the
status API and records when each POST arrives; and this driver (wrk for throughput, httpx for
latency and dedupe). Times are CLOCK_MONOTONIC, which is system-wide, so the driver's send
time and the stand-in's arrival time compare directly. Prints a markdown table.

    python -m benchmarks.bench_events [--duration 10] [--connections 64] [--objects 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import free_port, parse_wrk

ROOT = Path(__file__).resolve().parent.parent
HMAC_KEY = "bench-events-hmac"
GITEA_TOKEN = "bench-gitea-token"




def go_json(doc: Any) -> bytes:
    """Compact, with Go's escaping of <, > and &, as notification-controller sends it."""
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode()


def sha_for(*parts: object) -> str:
    return hashlib.sha1(":".join(map(str, parts)).encode()).hexdigest()  # noqa: S324 (ids)


def event_body(index: int, sha: str, seconds: float = 1.2) -> bytes:
    return go_json({
        "involvedObject": {"kind": "Kustomization", "namespace": "apps", "name": f"ks-{index:05d}",
                           "uid": f"0c9c2e41-{index:08d}", "apiVersion":
                           "kustomize.toolkit.fluxcd.io/v1", "resourceVersion": "1"},
        "severity": "info", "timestamp": "2026-08-07T13:04:05Z",
        "message": f"Reconciliation finished in {seconds:.1f}s, next run in 10m0s",
        "reason": "ReconciliationSucceeded",
        "metadata": {"commit_status": "update", "revision": f"main@sha1:{sha}"},
        "reportingController": "kustomize-controller",
        "reportingInstance": "kustomize-controller-7c7b47f5f-8bhrp",
    })


def signature(body: bytes) -> str:
    return "sha256=" + hmac.new(HMAC_KEY.encode(), body, hashlib.sha256).hexdigest()


# -- role: the Gitea stand-in ------------------------------------------------------------------


def gitea_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    records: list[tuple[str, str, str, float]] = []
    gets = [0]
    shown: dict[str, dict[str, dict[str, object]]] = {}  # sha -> context -> latest status

    async def statuses(request: Request) -> Response:
        sha = request.path_params["sha"]
        if request.method == "GET":  # the latest per context is all the bridge looks for
            gets[0] += 1
            latest = sorted(shown.get(sha, {}).values(), key=lambda s: -int(str(s["id"])))
            return JSONResponse(latest, headers={"X-Total-Count": str(len(latest))})
        arrived = time.monotonic()
        body = json.loads(await request.body())
        records.append((sha, body["context"], body["state"], arrived))
        status: dict[str, object] = {
            "id": len(records), "status": body["state"], "context": body["context"],
            "description": body["description"], "target_url": body["target_url"]}
        shown.setdefault(sha, {})[body["context"]] = status
        return JSONResponse(status, status_code=201)

    async def dump(request: Request) -> Response:
        return JSONResponse({"posts": records, "gets": gets[0]})

    async def reset(request: Request) -> Response:
        records.clear()  # the counters; what Gitea shows stays, as in a real Gitea
        gets[0] = 0
        return JSONResponse({})

    return Starlette(routes=[
        Route("/api/v1/repos/{owner}/{repo}/statuses/{sha}", statuses, methods=["GET", "POST"]),
        Route("/_records", dump), Route("/_reset", reset, methods=["POST"]),
    ])


# -- role: the bridge worker -------------------------------------------------------------------


def bridge_app(gitea_port: int, objects: int, secret_dir: Path) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from receiver.config_load import load_settings
    from receiver.flux.memory import MemoryCluster
    from receiver.flux.store import ObjectStore
    from receiver.giturls import normalise_repo_url
    from receiver.metrics import Metrics
    from receiver.status.service import StatusService
    from receiver.web.app import status_endpoints

    (secret_dir / "hmac").write_text(HMAC_KEY)
    (secret_dir / "gitea").write_text(GITEA_TOKEN)
    settings = load_settings(environ={}, overrides={
        "cluster_name": "bench",
        "gitea": [{"name": "local", "url": f"http://127.0.0.1:{gitea_port}",
                   "token": {"file": str(secret_dir / "gitea")},
                   "hosts": ["gitea.example.com"]}],
        "events": {"hmac_token": {"file": str(secret_dir / "hmac")}},
        "statuses": {"resync_interval_seconds": 3600, "queue_size": 50_000},
        "secret_cache_seconds": 60,
    })
    cluster = MemoryCluster(ObjectStore(lambda u: normalise_repo_url(u, {})))
    ref = {"kind": "GitRepository", "name": "fleet", "namespace": "flux-system"}
    cluster.apply({"kind": "GitRepository", "metadata": {"name": "fleet",
                                                        "namespace": "flux-system"},
                   "spec": {"url": "https://gitea.example.com/team/fleet.git",
                            "ref": {"branch": "main"}}})
    for i in range(objects):
        cluster.apply({"kind": "Kustomization",
                       "metadata": {"name": f"ks-{i:05d}", "namespace": "apps"},
                       "spec": {"sourceRef": ref, "path": f"./apps/{i}"}})
    metrics = Metrics()
    service = StatusService(settings, cluster, metrics)

    async def counters(request: Request) -> Response:
        values = {f"{s.name}{sorted(s.labels.items())}": s.value
                  for family in metrics.registry.collect() for s in family.samples
                  if s.name in ("gfb_statuses_total", "gfb_events_total")}
        return JSONResponse(values)

    async def bare(request: Request) -> Response:
        body = await request.body()
        expected = "sha256=" + hmac.new(HMAC_KEY.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("x-signature", "")):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        json.loads(body)
        return JSONResponse({"accepted": True}, status_code=202)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await cluster.start()
        await service.start()
        yield
        await service.stop(5.0)

    events, _ = status_endpoints(service)
    return Starlette(lifespan=lifespan, routes=[
        Route("/events", events.handle, methods=["POST"]),
        Route("/bare", bare, methods=["POST"]),
        Route("/_metrics", counters),
    ])


def serve(app: Any, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="on")


# -- the driver ----------------------------------------------------------------------------------


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def lua_script(path: str, bodies: list[bytes]) -> str:
    entries = ",\n".join(f'{{sig="{signature(b)}", body=[==[{b.decode()}]==]}}' for b in bodies)
    return f"""
local reqs = {{
{entries}
}}
local i = 0
request = function()
  i = i + 1
  local r = reqs[(i % #reqs) + 1]
  local headers = {{}}
  headers["Content-Type"] = "application/json"
  headers["X-Signature"] = r.sig
  return wrk.format("POST", "{path}", headers, r.body)
end
"""


def wrk(port: int, path: str, bodies: list[bytes], duration: int,
        connections: int) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua_script(path, bodies))
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", script.name,
         f"http://127.0.0.1:{port}{path}"], capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    parsed = parse_wrk(out)
    return {"rps": parsed["rps"], "p99_ms": parsed["p99"], "errors": parsed["non2xx"]}


async def records(client: httpx.AsyncClient, gitea: str) -> dict[str, Any]:
    reply = await client.get(f"{gitea}/_records")
    data: dict[str, Any] = reply.json()
    return data


async def settle(client: httpx.AsyncClient, gitea: str, want: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline:
        count = len((await records(client, gitea))["posts"])
        if count >= want:
            break
        await asyncio.sleep(0.1)
    return count


async def drain(gitea: str, quiet: float = 1.0, timeout: float = 120.0) -> int:
    """Wait until the stand-in has seen no new post for `quiet` seconds."""
    async with httpx.AsyncClient(timeout=10) as client:
        deadline = time.monotonic() + timeout
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = len((await records(client, gitea))["posts"])
            if count != last:
                last, since = count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            await asyncio.sleep(0.1)
        return last


async def prime(bridge: str, bodies: list[bytes]) -> None:
    async with httpx.AsyncClient(timeout=60) as client:
        for body in bodies:
            reply = await client.post(f"{bridge}/events", content=body, headers={
                "Content-Type": "application/json", "X-Signature": signature(body)})
            assert reply.status_code == 202, reply.text


async def backlog_phase(bridge: str, gitea: str, events: int, objects: int) -> dict[str, float]:
    """A burst of new commits as fast as the driver can send: how fast the queue drains."""
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, pool=None), limits=limits) as client:
        await client.post(f"{gitea}/_reset")
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            body = event_body(i % objects, sha_for("backlog", i))
            async with sem:
                reply = await client.post(f"{bridge}/events", content=body, headers={
                    "Content-Type": "application/json", "X-Signature": signature(body)})
            assert reply.status_code == 202, reply.text

        start = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(events)))
        sent = time.monotonic() - start
        posted = await settle(client, gitea, events, 120)
        posts = (await records(client, gitea))["posts"]
    done = max(arrived for *_, arrived in posts) - start if posts else 0.0
    return {"events": events, "posted": posted, "send_s": sent, "drain_s": done,
            "rate": posted / done if done else 0.0}


async def latency_phase(bridge: str, gitea: str, events: int, rate: float,
                        objects: int) -> dict[str, float]:
    """Open-loop events at `rate`/s, each a new commit; event sent -> status POST arrived."""
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, pool=None), limits=limits) as client:
        await client.post(f"{gitea}/_reset")
        sent: dict[str, float] = {}
        accept_ms: list[float] = []

        async def one(i: int) -> None:
            sha = sha_for("latency", i)
            body = event_body(i % objects, sha)
            start = time.monotonic()
            sent[sha] = start
            reply = await client.post(f"{bridge}/events", content=body, headers={
                "Content-Type": "application/json", "X-Signature": signature(body)})
            accept_ms.append((time.monotonic() - start) * 1000)
            assert reply.status_code == 202, reply.text

        tasks = []
        begin = time.monotonic()
        for i in range(events):
            delay = begin + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        await settle(client, gitea, events, 30)
        posts = (await records(client, gitea))["posts"]
    lat = sorted((arrived - sent[sha]) * 1000 for sha, _, _, arrived in posts if sha in sent)
    accept_ms.sort()
    return {
        "events": events, "posted": len(lat),
        "p50_ms": statistics.median(lat), "p99_ms": lat[int(len(lat) * 0.99) - 1],
        "max_ms": lat[-1], "accept_p99_ms": accept_ms[int(len(accept_ms) * 0.99) - 1],
    }


async def dedupe_phase(bridge: str, gitea: str, objects: int, repeats: int) -> dict[str, float]:
    """Flux's repeated ReconciliationSucceeded: each object reports the same commit N times."""
    sha = sha_for("dedupe")
    async with httpx.AsyncClient(timeout=10) as client:
        await client.post(f"{gitea}/_reset")
        for round_ in range(repeats):
            for i in range(objects):
                body = event_body(i, sha, seconds=1.0 + round_ * 0.1)
                reply = await client.post(f"{bridge}/events", content=body, headers={
                    "Content-Type": "application/json", "X-Signature": signature(body)})
                assert reply.status_code == 202
            await asyncio.sleep(0.05)  # Flux repeats every interval, not in one burst
        await settle(client, gitea, objects, 10)
        await asyncio.sleep(1.0)
        data = await records(client, gitea)
    return {"events": objects * repeats, "posts": len(data["posts"]), "gets": data["gets"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--role", choices=["driver", "bridge", "gitea"], default="driver")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--gitea-port", type=int, default=0)
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--backlog-events", type=int, default=1000)
    parser.add_argument("--latency-events", type=int, default=400)
    parser.add_argument("--latency-rate", type=float, default=20.0)
    parser.add_argument("--dedupe-objects", type=int, default=100)
    parser.add_argument("--dedupe-repeats", type=int, default=20)
    args = parser.parse_args()
    if args.role == "gitea":
        serve(gitea_app(), args.port)
        return 0
    if args.role == "bridge":
        with tempfile.TemporaryDirectory() as secrets:
            serve(bridge_app(args.gitea_port, args.objects, Path(secrets)), args.port)
        return 0
    if shutil.which("wrk") is None:
        print("wrk is required: apt-get install -y wrk", file=sys.stderr)
        return 2

    gitea_port, bridge_port = free_port(), free_port()
    me = [sys.executable, "-m", "benchmarks.bench_events"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([*me, "--role", "gitea", "--port", str(gitea_port)], cwd=ROOT, env=env),
        subprocess.Popen([*me, "--role", "bridge", "--port", str(bridge_port), "--gitea-port",
                          str(gitea_port), "--objects", str(args.objects)], cwd=ROOT, env=env),
    ]
    try:
        wait_port(gitea_port)
        wait_port(bridge_port)
        bodies = [event_body(i, sha_for("wrk", i)) for i in range(args.objects)]
        bridge, gitea = f"http://127.0.0.1:{bridge_port}", f"http://127.0.0.1:{gitea_port}"
        bare = wrk(bridge_port, "/bare", bodies, args.duration, args.connections)
        print(f"bare: {bare}", file=sys.stderr)
        # Post each body's status once first: the wrk run then measures intake of Flux's
        # repeats (the workers only dedupe), not intake competing with 1000 first posts.
        asyncio.run(prime(bridge, bodies))
        asyncio.run(drain(gitea))
        ours = wrk(bridge_port, "/events", bodies, args.duration, args.connections)
        print(f"events: {ours}", file=sys.stderr)
        asyncio.run(drain(gitea))
        backlog = asyncio.run(backlog_phase(bridge, gitea, args.backlog_events, args.objects))
        print(f"backlog: {backlog}", file=sys.stderr)
        asyncio.run(drain(gitea))
        lat = asyncio.run(latency_phase(bridge, gitea, args.latency_events, args.latency_rate,
                                        args.objects))
        print(f"latency: {lat}", file=sys.stderr)
        asyncio.run(drain(gitea))
        dedupe = asyncio.run(dedupe_phase(bridge, gitea, args.dedupe_objects,
                                          args.dedupe_repeats))
        counters = httpx.get(f"{bridge}/_metrics").json()
        print(f"bridge counters: {counters}", file=sys.stderr)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=15)

    saved = dedupe["events"] - dedupe["posts"]
    print(f"\n{args.objects} Kustomizations cached; wrk -t2 -c{args.connections} "
          f"-d{args.duration}s over {args.objects} signed events (statuses already posted, so "
          "the workers dedupe); one uvicorn worker (uvloop, httptools); load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| bare endpoint (HMAC + JSON parse), req/s | {bare['rps']:,.0f} "
          f"(p99 {bare['p99_ms']:.1f} ms) |")
    print(f"| POST /events accepted, events/s | {ours['rps']:,.0f} (p99 {ours['p99_ms']:.1f} ms, "
          f"non-2xx {ours['errors']:.0f}) |")
    print(f"| ratio to the bare endpoint | {ours['rps'] / bare['rps']:.2f} |")
    print(f"| event received -> status posted, p50 / p99 / max "
          f"({lat['events']:.0f} events at {args.latency_rate:.0f}/s, new commit each) | "
          f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f} / {lat['max_ms']:.1f} ms |")
    print(f"| POST /events answer time p99 during that run | {lat['accept_p99_ms']:.1f} ms |")
    print(f"| statuses posted in that run | {lat['posted']:.0f} of {lat['events']:.0f} |")
    print(f"| burst of {backlog['events']:.0f} new commits: posted, drain rate | "
          f"{backlog['posted']:.0f} in {backlog['drain_s']:.1f} s = {backlog['rate']:,.0f} "
          f"statuses/s (list + post each) |")
    print(f"| repeated ReconciliationSucceeded: events -> posts | {dedupe['events']:.0f} -> "
          f"{dedupe['posts']:.0f} ({saved:.0f} posts saved, "
          f"{100 * saved / dedupe['events']:.1f}%) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
