"""The delivery store's ceiling: RSS with 12,000 objects cached and `deliveries.max_count`
(10,000) deliveries kept, and bytes per delivery (tracemalloc).

    python -m benchmarks.bench_memory [--max-count 10000]

In process, no sockets: the app with the in-memory cluster built from the ingest benchmark's
fleet (2,000 GitRepositories, 10,000 Kustomizations, 200 Receivers), pushes sent through the
ASGI interface, each a new commit, spread over the 200 Receivers.
1. RSS loaded; then `max_count` pushes (all kept, in flight); RSS.
2. Wait until they have timed out (no Flux runs), send `max_count` more: the oldest are
   evicted, RSS must not grow past the ceiling (bar: 200 MB).
3. In a second process, tracemalloc over 2,000 pushes: bytes per delivery kept, and where.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx

from benchmarks.bench_ingest import ROOT, Setup
from benchmarks.common import rss_mb

BAR_MB = 200


def _bodies(setup: Setup, count: int, offset: int) -> Iterator[tuple[str, bytes, str]]:
    """One push at a time: a list of 10,000 bodies of 8 KB would be 80 MB of the benchmark's
    own data in the measured process (it was, until this was a generator: glibc kept the
    freed heap, and the bridge was charged for it)."""
    n = len(setup.requests)
    heads = [json.loads(body)["after"].encode() for _, body, _ in setup.requests]
    for i in range(count):
        path, body, _ = setup.requests[i % n]
        yield (path, body.replace(heads[i % n], f"{offset + i:040x}".encode()),
               f"bench-token-{i % n}")


async def _push(client: httpx.AsyncClient,
                pushes: Iterable[tuple[str, bytes, str]]) -> dict[int, int]:
    codes: dict[int, int] = {}
    for path, body, token in pushes:
        r = await client.post(path, content=body, headers={
            "Content-Type": "application/json", "X-Gitea-Event": "push",
            "Authorization": f"Bearer {token}"})
        codes[r.status_code] = codes.get(r.status_code, 0) + 1
    return codes


async def run(work: Path, max_count: int, timeout: float, trace: int) -> dict[str, object]:
    from receiver.config_load import load_settings
    from receiver.flux.memory import MemoryCluster
    from receiver.flux.store import ObjectStore
    from receiver.web.app import create_app, url_normaliser

    setup = Setup(work, max_count=max_count, timeout=timeout)
    settings = load_settings(setup.config, overrides={"manifests": str(setup.fleet)})
    store = ObjectStore(url_normaliser(settings))
    cluster = MemoryCluster.from_directory(store, setup.fleet)
    app = create_app(settings, cluster)
    parts = app.state.parts
    out: dict[str, object] = {"objects": len(store)}
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        gc.collect()
        out["rss_loaded_mb"] = round(rss_mb(os.getpid()), 1)
        if trace:
            warm = await _push(client, _bodies(setup, 200, 10**9))  # first touch of each path
            gc.collect()
            tracemalloc.start(1)
            before = tracemalloc.take_snapshot()
            codes = await _push(client, _bodies(setup, trace, 0))
            gc.collect()
            after = tracemalloc.take_snapshot()
            stats = after.compare_to(before, "lineno")
            grown = sum(s.size_diff for s in stats)
            out.update(pushes=trace, codes=codes, warm=warm, kept=len(parts.deliveries),
                       bytes_per_delivery=round(grown / trace),
                       top=[f"{s.traceback[0].filename.rsplit('/', 2)[-2:]}:{s.traceback[0].lineno} "
                            f"{s.size_diff / trace:.0f} B" for s in stats[:12]])
            return out
        codes = await _push(client, _bodies(setup, max_count, 0))
        gc.collect()
        out.update(first_codes=codes, kept_after_first=len(parts.deliveries),
                   in_flight_after_first=parts.deliveries.active_count,
                   rss_after_first_mb=round(rss_mb(os.getpid()), 1))
        deadline = time.monotonic() + timeout + 30
        while parts.deliveries.active_count and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        codes = await _push(client, _bodies(setup, max_count, max_count))
        gc.collect()
        out.update(second_codes=codes, kept_after_second=len(parts.deliveries),
                   rss_after_second_mb=round(rss_mb(os.getpid()), 1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--max-count", type=int, default=10_000)
    p.add_argument("--timeout", type=float, default=3.0,
                   help="seconds until an unanswered delivery times out")
    p.add_argument("--trace", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gfb-memory-"))
    if a.trace:
        print(json.dumps(asyncio.run(run(work, a.max_count, a.timeout, a.trace))))
        return
    result = asyncio.run(run(work, a.max_count, a.timeout, 0))
    traced = json.loads(subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_memory", "--trace", "2000", "--max-count",
         str(a.max_count)], capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip().splitlines()[-1])
    ceiling = max(result["rss_after_first_mb"], result["rss_after_second_mb"])  # type: ignore[type-var]
    print(f"\nobjects cached: {result['objects']}; deliveries.max_count {a.max_count}\n")
    print("| measure | value |\n|---|---:|")
    print(f"| RSS loaded | {result['rss_loaded_mb']} MB |")
    print(f"| RSS with {result['kept_after_first']} deliveries kept "
          f"({result['in_flight_after_first']} in flight) | "
          f"{result['rss_after_first_mb']} MB |")
    print(f"| RSS after {a.max_count} more (oldest evicted, {result['kept_after_second']} kept) | "
          f"{result['rss_after_second_mb']} MB |")
    print(f"| bytes per delivery kept (tracemalloc, {traced['pushes']} pushes) | "
          f"{traced['bytes_per_delivery']:,} B |")
    print(f"| bar: RSS <= {BAR_MB} MB | {'met' if ceiling <= BAR_MB else 'NOT met'} |")
    print(f"\nstatus codes: first {result['first_codes']}, second {result['second_codes']}")
    print("largest growth per delivery: " + "; ".join(traced["top"]))


if __name__ == "__main__":
    main()
