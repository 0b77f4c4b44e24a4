"""What one push costs, stage by stage: in process, under load, and each stage alone.

    python -m benchmarks.bench_stages [--pushes 8000] [--clients 64]

1. **Under load**: the ingest benchmark's fleet (12,200 objects, 200 Receivers) in the
   in-memory cluster; `--pushes` pushes of new commits sent straight through the ASGI app by
   `--clients` concurrent coroutines (no sockets, no HTTP parser: what is left is the bridge's
   own work). Each stage of the hook is wrapped with a timer; the table gives its mean and its
   share of one push. CPU seconds per push include the background (patches, evaluations,
   deadlines) that the pushes cause, up to the time-outs that end their deliveries.
2. **Alone**: the same stages called in a loop on one push of that fleet (`timeit`, best of 3):
   the price of the code without the cache misses and collections a loaded process adds.

The bare endpoint of `bench_ingest` does only the JSON decode and the HMAC of step 1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import gc
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bench_ingest import Setup
from benchmarks.bench_memory import _bodies

TIMES: collections.Counter[str] = collections.Counter()
CALLS: collections.Counter[str] = collections.Counter()
_GC_STARTED: list[float] = []


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    """Cyclic GC time by generation: a collection runs inside whatever stage allocates."""
    if phase == "start":
        _GC_STARTED.append(time.perf_counter())
    elif _GC_STARTED:
        label = f"garbage collection, generation {info['generation']} (inside the stages)"
        TIMES[label] += time.perf_counter() - _GC_STARTED.pop()
        CALLS[label] += 1


def _timed(owner: Any, name: str, label: str) -> None:
    """Replace `owner.name` with a copy that adds its wall time (sync: its CPU) to `label`."""
    original = getattr(owner, name)
    if asyncio.iscoroutinefunction(original):
        @functools.wraps(original)
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                TIMES[label] += time.perf_counter() - started
                CALLS[label] += 1
        setattr(owner, name, wrapped_async)
        return

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - started
            CALLS[label] += 1
    setattr(owner, name, wrapped)


def _instrument() -> None:
    import receiver.web.ingest as ingest
    from receiver.delivery.reconcile import Reconciler

    _timed(ingest, "select_payload", "payload: JSON decode + parse (select_payload)")
    if hasattr(ingest, "plan_selection"):  # a checkout before plans were remembered
        _timed(ingest, "plan_selection", "routing (plan_selection)")
    else:
        _timed(ingest.PlanCache, "plan", "routing (PlanCache.plan: remembered or routed)")
    _timed(ingest, "encode", "signed delivery id (encode)")
    _timed(ingest, "accepted_reply", "202 reply (plan as JSON)")
    reader = "read_capped" if hasattr(ingest, "read_capped") else "read_parts"
    _timed(ingest, reader, f"body read ({reader})")
    _timed(ingest.IngestService, "_authenticate", "authentication")
    _timed(ingest.Delivery, "from_record", "delivery object")
    _timed(ingest, "record_targets", "record targets")
    _timed(Reconciler, "view", "evaluations (delivery_state.evaluate, all callers)")


def _scope(path: str, body: bytes, token: str) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "headers": [(b"content-type", b"application/json"), (b"x-gitea-event", b"push"),
                        (b"authorization", f"Bearer {token}".encode()),
                        (b"content-length", str(len(body)).encode())]}


async def _under_load(pushes: int, clients: int, timeout: float) -> dict[str, Any]:
    from receiver.config_load import load_settings
    from receiver.flux.memory import MemoryCluster
    from receiver.flux.store import ObjectStore
    from receiver.web.app import create_app, url_normaliser

    setup = Setup(Path(tempfile.mkdtemp(prefix="gfb-stages-")), max_count=10_000,
                  timeout=timeout)
    settings = load_settings(setup.config, overrides={"manifests": str(setup.fleet)})
    store = ObjectStore(url_normaliser(settings))
    cluster = MemoryCluster.from_directory(store, setup.fleet)
    app = create_app(settings, cluster)
    codes: collections.Counter[int] = collections.Counter()

    async def send_one(path: str, body: bytes, token: str) -> None:
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # no disconnect: the reply is not streamed
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                codes[message["status"]] += 1

        await app(_scope(path, body, token), receive, send)

    async with app.router.lifespan_context(app):
        for push in _bodies(setup, 400, 10**9):  # every Receiver once: first-use work
            await send_one(*push)
        await asyncio.sleep(timeout + 0.5)
        gc.collect()
        TIMES.clear()
        CALLS.clear()
        codes.clear()
        work = iter(_bodies(setup, pushes, 0))

        async def client() -> None:
            for push in work:
                await send_one(*push)

        cpu = time.process_time()
        gc.callbacks.append(_on_gc)
        await asyncio.gather(*(client() for _ in range(clients)))
        await asyncio.sleep(timeout + 0.5)  # the time-outs end every delivery
        gc.callbacks.remove(_on_gc)
        cpu = time.process_time() - cpu
    return {"codes": dict(codes), "cpu_us_per_push": 1e6 * cpu / pushes}


def _alone(number: int) -> dict[str, float]:
    from receiver.config_load import load_settings
    from receiver.delivery.record import DeliveryRecord, encode
    from receiver.delivery.state import evaluate
    from receiver.delivery.store import Delivery, record_targets
    from receiver.delivery.view import Timeouts
    from receiver.flux.memory import MemoryCluster
    from receiver.flux.store import ObjectStore
    from receiver.push.package_routing import plan_selection
    from receiver.push.resources import resolve_resources
    from receiver.push.selector import select_payload
    from receiver.web.app import url_normaliser
    from receiver.web.replies import accepted_reply

    setup = Setup(Path(tempfile.mkdtemp(prefix="gfb-stages-")), max_count=10_000, timeout=2.0)
    settings = load_settings(setup.config, overrides={"manifests": str(setup.fleet)})
    store = ObjectStore(url_normaliser(settings))
    MemoryCluster.from_directory(store, setup.fleet)
    _, body, _ = setup.requests[0]
    selection = select_payload("generic", body)
    assert selection.push is not None
    for receiver in sorted(store.list("Receiver"), key=lambda o: o.key):
        resolved = resolve_resources(receiver, store)
        plan = plan_selection(receiver, selection, store, resolved=resolved)
        if plan.targets:
            break
    record = DeliveryRecord(f"{receiver.namespace}/{receiver.name}", selection.push.sha,
                            selection.push.ref, time.time(), "0123456789abcdef",
                            record_targets(plan))
    delivery_id, _ = encode(record, "bench-token")
    delivery = Delivery.from_record(delivery_id, record, plan)
    timeouts = Timeouts(2.0, 2.0)
    stages: dict[str, Callable[[], object]] = {
        "payload: JSON decode only (json.loads)": lambda: __import__("json").loads(body),
        "payload: JSON decode + parse (select_payload)": lambda: select_payload("generic", body),
        "routing (plan_selection)": lambda: plan_selection(receiver, selection, store,
                                                           resolved=resolved),
        "signed delivery id (encode)": lambda: encode(record, "bench-token"),
        "one evaluation (delivery_state.evaluate)": lambda: evaluate(
            record, store.get, time.time(), timeouts, {}),
        "202 reply (plan as JSON)": lambda: accepted_reply(delivery, plan, ()),
    }
    return {name: 1e6 * min(timeit.repeat(fn, number=number, repeat=3)) / number
            for name, fn in stages.items()}


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--pushes", type=int, default=8000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--timeout", type=float, default=2.0,
                   help="seconds until an unanswered delivery times out")
    a = p.parse_args()
    _instrument()
    loaded = asyncio.run(_under_load(a.pushes, a.clients, a.timeout))
    pushes = a.pushes
    print(f"\nunder load: {pushes} pushes, {a.clients} clients, codes {loaded['codes']}, "
          f"CPU {loaded['cpu_us_per_push']:.0f} µs per push (background included)\n")
    print("| stage | calls per push | mean µs per call | µs per push | share of CPU per push |")
    print("|---|---:|---:|---:|---:|")
    for label, total in TIMES.most_common():
        per_push = 1e6 * total / pushes
        print(f"| {label} | {CALLS[label] / pushes:.2f} | {1e6 * total / CALLS[label]:.1f} | "
              f"{per_push:.1f} | {100 * per_push / loaded['cpu_us_per_push']:.0f} % |")
    alone = _alone(3000)
    print("\nalone (best of 3 runs of 3,000 calls on one push):\n")
    print("| stage | µs per call |\n|---|---:|")
    for label, micros in alone.items():
        print(f"| {label} | {micros:.1f} |")


if __name__ == "__main__":
    main()
