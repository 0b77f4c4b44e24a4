"""CPU per push as the bridge fills up: deliveries kept, objects cached (bench_stages' successor).

    python -m benchmarks.bench_scaling [--pushes 6000] [--baseline NAME=DIR ...]

In process, no sockets (as `bench_stages`): the ingest benchmark's Receivers (200, each listing
10 GitRepositories and their Kustomizations) over a fleet of 12,200 or 120,200 objects;
pushes of new commits sent through the ASGI app by 64 concurrent coroutines. Each size first
fills the delivery store to `deliveries.max_count` (1,000 or 10,000: every delivery times out
after 0.05 s, and the store keeps the newest), then measures `--pushes` more in blocks of a
fifth each: **process CPU seconds per push** (background included: patches, evaluations, the
time-outs), which other work on the machine does not inflate the way it does wall-clock rates.
Also per size: evaluations per push, GC-tracked objects and RSS with the store full, and the
last block's CPU per push over the first block's (does a push cost more as deliveries pile up?).

Every checkout runs in a process of its own, this script's code with the checkout's
`receiver` package (`--baseline before=DIR`); sizes and checkouts alternate.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZES = (  # (label, GitRepositories, Kustomizations, deliveries kept)
    ("12,200 objects, 1,000 kept", 2_000, 10_000, 1_000),
    ("12,200 objects, 10,000 kept", 2_000, 10_000, 10_000),
    ("120,200 objects, 1,000 kept", 20_000, 100_000, 1_000),
    ("120,200 objects, 10,000 kept", 20_000, 100_000, 10_000),
)


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def _measure(repos: int, kustomizations: int, kept: int, pushes: int,
                   clients: int) -> dict[str, Any]:
    from benchmarks.bench_ingest import Setup
    from benchmarks.bench_memory import _bodies
    from benchmarks.bench_stages import _scope
    from receiver.config_load import load_settings
    from receiver.delivery.reconcile import Reconciler
    from receiver.flux.memory import MemoryCluster
    from receiver.flux.store import ObjectStore
    from receiver.web.app import create_app, url_normaliser

    evaluations = [0]
    view = Reconciler.view

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        evaluations[0] += 1
        return view(self, *args, **kwargs)

    Reconciler.view = counted  # type: ignore[method-assign]
    # Short enough that the deliveries in flight stay well under the smaller store's bound
    # (a push past it is a cheap 503, not a push); the store keeps the finished ones.
    timeout = 0.05
    setup = Setup(Path(tempfile.mkdtemp(prefix="gfb-scaling-")), repos=repos,
                  kustomizations=kustomizations, max_count=kept, timeout=timeout)
    settings = load_settings(setup.config, overrides={"manifests": str(setup.fleet)})
    store = ObjectStore(url_normaliser(settings))
    cluster = MemoryCluster.from_directory(store, setup.fleet)
    app = create_app(settings, cluster)
    codes: dict[int, int] = {}

    async def send_one(path: str, body: bytes, token: str) -> None:
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                codes[message["status"]] = codes.get(message["status"], 0) + 1

        await app(_scope(path, body, token), receive, send)

    async def run(count: int, offset: int) -> None:
        work = iter(_bodies(setup, count, offset))

        async def client() -> None:
            for push in work:
                await send_one(*push)
                await asyncio.sleep(0)  # as a socket would: the loop's other tasks get a turn

        await asyncio.gather(*(client() for _ in range(clients)))

    async with app.router.lifespan_context(app):
        await run(kept, 10**9)  # fill the store (and every Receiver's first use)
        await asyncio.sleep(timeout + 0.5)
        gc.collect()
        codes.clear()
        evaluations[0] = 0
        blocks = []
        started = time.process_time()
        block = pushes // 5
        for i in range(5):
            cpu = time.process_time()
            await run(block, i * block)
            blocks.append(1e6 * (time.process_time() - cpu) / block)
        await asyncio.sleep(timeout + 0.5)  # the time-outs end every delivery
        total = 1e6 * (time.process_time() - started) / (5 * block)
        tracked = len(gc.get_objects())
        rss = _rss_mb()
    return {"codes": codes, "cpu_us_per_push": total, "blocks": blocks,
            "evaluations_per_push": evaluations[0] / (5 * block),
            "gc_tracked": tracked, "rss_mb": rss, "objects": len(store)}


def _one(args: argparse.Namespace) -> None:
    sys.path.insert(0, args.receiver_root)  # the checkout's `receiver`, this script's benchmark
    import receiver
    assert Path(receiver.__file__).resolve().is_relative_to(Path(args.receiver_root).resolve())
    result = asyncio.run(_measure(args.repos, args.kustomizations, args.kept, args.pushes,
                                  args.clients))
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pushes", type=int, default=6000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--sizes", default="0,1,2,3", help="which of the four sizes (indexes)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--receiver-root", default=str(ROOT), help=argparse.SUPPRESS)
    p.add_argument("--repos", type=int, default=2000, help=argparse.SUPPRESS)
    p.add_argument("--kustomizations", type=int, default=10000, help=argparse.SUPPRESS)
    p.add_argument("--kept", type=int, default=10000, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        _one(a)
        return
    checkouts = [("this checkout", str(ROOT))] + [
        tuple(b.split("=", 1)) for b in a.baseline]  # type: ignore[misc]
    sizes = [SIZES[int(i)] for i in a.sizes.split(",")]
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(a.rounds):
        for label, repos, kustomizations, kept in sizes:
            for name, root in checkouts:
                out = subprocess.run(
                    [sys.executable, "-m", "benchmarks.bench_scaling", "--one",
                     "--receiver-root", root, "--repos", str(repos),
                     "--kustomizations", str(kustomizations), "--kept", str(kept),
                     "--pushes", str(a.pushes), "--clients", str(a.clients)],
                    capture_output=True, text=True, check=True, cwd=ROOT,
                    env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
                result = json.loads(out.strip().splitlines()[-1])
                results.setdefault((label, name), []).append(result)
                print(f"{label} | {name} | {result}", file=sys.stderr, flush=True)
    print("| size | checkout | CPU µs per push (median) | runs | last block / first block | "
          "evaluations per push | GC-tracked objects | RSS MB | codes |")
    print("|---|---|---:|---|---:|---:|---:|---:|---|")
    for (label, name), runs in results.items():
        cpu = statistics.median(r["cpu_us_per_push"] for r in runs)
        drift = statistics.median(r["blocks"][-1] / r["blocks"][0] for r in runs)
        last = runs[-1]
        each = " / ".join(f"{r['cpu_us_per_push']:.0f}" for r in runs)
        print(f"| {label} | {name} | {cpu:.0f} | "
              f"{each} | {drift:.2f} | "
              f"{last['evaluations_per_push']:.2f} | {last['gc_tracked']:,} | "
              f"{last['rss_mb']:.0f} | {last['codes']} |")


if __name__ == "__main__":
    main()
