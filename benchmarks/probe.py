"""Run `gitea-flux-bridge serve` with probes that say where latency goes, without changing it.

    python -m benchmarks.probe serve --manifests DIR ...   (PROBE_OUT=report.json)

Probes, all written to `PROBE_OUT` as JSON when the server stops:
- garbage collector pauses (`gc.callbacks`): count, total, max and the slowest by generation;
  each collection over 10 ms with what it freed; with PROBE_GC_YOUNG=1 also how many young
  objects it found and the largest containers among them, with PROBE_GC_WHO=1 who caused each
  full collection, with PROBE_FULL_WALKS=1 what each full collection walked, by type (these
  three cost time outside the pauses, inside the loop's stalls); at exit, the unreachable
  objects that were frozen (`gc.freeze`), which no collection could free;
- event-loop lag: a heartbeat task sleeps 5 ms and records how late it wakes;
- stalls: each time the heartbeat is 20 ms late, what the loop's thread was doing, whether it
  had a CPU, and the collector's share (`benchmarks.stalls`);
- watch handling: time in `ObjectStore.upsert` with its listeners (what a watch event or an
  in-memory patch costs on the loop) and in the reconciler's evaluation of a delivery;
- threads: CPU seconds per thread from /proc (the Kubernetes client's watch threads and the
  `asyncio.to_thread` pool that sends patches and reads Secrets);
- HTTP, as the server sees it: each request from the parser's first byte of it to its last
  byte handed to the socket ("request cycle"), and on each connection the time from one
  response to the next request's first byte ("between requests": the way back to the client,
  its turn, and the way in). A load generator's latency that both leave unexplained was spent
  in the generator or the kernel, not in the bridge.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.stalls import StallWatch

HEARTBEAT = 0.005
FULL_WALKS = os.environ.get("PROBE_FULL_WALKS") == "1"
GC_WHO = bool(os.environ.get("PROBE_GC_WHO"))
GC_YOUNG = bool(os.environ.get("PROBE_GC_YOUNG"))


class Probe:
    def __init__(self) -> None:
        self.gc_pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._gc_start = 0.0
        self.lag: list[float] = []
        self.timed: dict[str, list[float]] = {}
        self.started = time.monotonic()
        self.full_walks: list[int] = []  # objects a full collection walked, each time
        self.full_kinds: list[dict[str, int]] = []  # ... the most numerous types, each time
        self.stalls = StallWatch()
        self.slow_collections: list[dict[str, Any]] = []
        self._young: dict[str, Any] | None = None  # what the last young collection found

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2 and GC_WHO:
            import traceback
            self.slow_collections.append({"who": traceback.format_stack(limit=8)[:-1],
                                          "count": gc.get_count(),
                                          "threshold": gc.get_threshold(),
                                          "frozen": gc.get_freeze_count()})
        if phase == "start" and info["generation"] == 0 and GC_YOUNG:
            young = gc.get_objects(generation=0)
            sized = sorted(((len(o), type(o).__name__) for o in young
                            if isinstance(o, (list, dict, set, tuple))), reverse=True)[:3]
            self._young = {"objects": len(young), "largest": sized,
                           "contained": sum(n for n, _ in sized)}
            del young
        if phase == "start":
            # What a full collection walks (outside its pause, but inside the loop's stall:
            # opt-in, PROBE_FULL_WALKS=1).
            if info["generation"] == 2 and FULL_WALKS:
                walked = gc.get_objects(generation=2) + gc.get_objects(generation=1)
                self.full_walks.append(len(walked))
                kinds: dict[str, int] = {}
                for obj in walked:
                    kinds[type(obj).__name__] = kinds.get(type(obj).__name__, 0) + 1
                self.full_kinds.append(dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:15]))
                del walked
            self._gc_start = time.perf_counter()
        else:
            ended = time.perf_counter()
            self.gc_pauses[info["generation"]].append(ended - self._gc_start)
            if ended - self._gc_start > 0.01:  # a slow one: how much did it free?
                self.slow_collections.append({
                    "at": round(time.time(), 3), "generation": info["generation"],
                    "ms": round((ended - self._gc_start) * 1000, 1),
                    "collected": info["collected"], "uncollectable": info["uncollectable"],
                    "tracked_after": sum(gc.get_count()),
                    "young": self._young})
            self.stalls.on_gc_pause(ended, ended - self._gc_start, info["generation"])

    async def heartbeat(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(HEARTBEAT)
            self.lag.append(time.perf_counter() - before - HEARTBEAT)
            self.stalls.beat()

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        samples = self.timed.setdefault(label, [])
        if asyncio.iscoroutinefunction(original):
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                # Only the synchronous stretches matter for the loop; an await inside is
                # counted too, so this is an upper bound.
                t = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    samples.append(time.perf_counter() - t)
            setattr(owner, name, timed_async)
        else:
            def timed(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    samples.append(time.perf_counter() - t)
            setattr(owner, name, timed)

    def report(self) -> dict[str, Any]:
        def summary(values: list[float]) -> dict[str, float]:
            if not values:
                return {"count": 0}
            ordered = sorted(values)
            def pct(p: float) -> float:
                return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 3)
            return {"count": len(values), "total_s": round(sum(values), 3), "p50_ms": pct(0.5),
                    "p99_ms": pct(0.99), "p999_ms": pct(0.999), "max_ms": round(ordered[-1] * 1000, 3)}

        return {
            "seconds": round(time.monotonic() - self.started, 1),
            "gc": {f"gen{g}": summary(v) for g, v in self.gc_pauses.items()},
            "gc_threshold": gc.get_threshold(),
            "gc_frozen": gc.get_freeze_count(),
            "gc_full_walks": self.full_walks,
            "gc_slow": self.slow_collections,
            "gc_frozen_garbage": frozen_garbage(),
            "gc_full_kinds": self.full_kinds,
            "loop_lag": summary(self.lag),
            "loop_lag_over_ms": {str(ms): sum(1 for v in self.lag if v * 1000 > ms)
                                 for ms in (1, 5, 10, 20, 50)},
            "timed": {k: summary(v) for k, v in self.timed.items()},
            "threads": thread_cpu(),
            "stalls": self.stalls.report(),
        }


def frozen_garbage() -> int:
    """Unreachable objects the collector could not see because they were frozen (the app
    freezes what it keeps): collect what it can see, then unfreeze and count what else goes.
    Run at exit only: the second collection walks everything."""
    gc.collect()
    gc.unfreeze()
    return gc.collect()


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) per thread of this process, by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick
        name = names.get(int(task.name), "other")
        name = "to_thread pool" if name.startswith("asyncio_") else name
        out[name] = round(out.get(name, 0.0) + seconds, 2)
    return out


def time_http(probe: Probe) -> None:
    """Time each request as uvicorn's httptools protocol sees it (see the module's docstring)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    cycles = probe.timed.setdefault("HTTP request cycle (first byte in to last byte out)", [])
    between = probe.timed.setdefault("HTTP between requests on a connection", [])
    began = HttpToolsProtocol.on_message_begin
    completed = HttpToolsProtocol.on_response_complete

    def on_message_begin(self: Any) -> None:
        now = time.perf_counter()
        last = getattr(self, "_probe_done", None)
        if last is not None:
            between.append(now - last)
        self._probe_begun = now
        began(self)

    def on_response_complete(self: Any) -> None:
        now = time.perf_counter()
        cycles.append(now - self._probe_begun)
        self._probe_done = now
        completed(self)

    HttpToolsProtocol.on_message_begin = on_message_begin  # type: ignore[method-assign]
    HttpToolsProtocol.on_response_complete = on_response_complete  # type: ignore[method-assign]


def install() -> Probe:
    probe = Probe()
    gc.callbacks.append(probe.on_gc)

    from receiver.delivery.reconcile import Reconciler
    from receiver.flux.store import ObjectStore
    from receiver.web.drain import DrainingServer

    probe.wrap(ObjectStore, "upsert", "store.upsert (watch event or patch, with listeners)")
    probe.wrap(Reconciler, "_on_change", "reconciler._on_change")
    probe.wrap(Reconciler, "_evaluate", "reconciler._evaluate (includes awaits)")
    import receiver.web.ingest as ingest_module
    from receiver.push import plan_cache, receiver_specs
    from receiver.push.hookindex import HookIndex

    probe.wrap(receiver_specs, "resolve_resources", "Receiver resolution (cache miss)")
    probe.wrap(plan_cache, "plan_selection", "routing.plan_selection (plan cache miss)")
    probe.wrap(ingest_module, "encode", "delivery id encode")
    probe.wrap(HookIndex, "lookup_or_refresh", "hook lookup")
    time_http(probe)
    startup = DrainingServer.startup

    async def startup_with_heartbeat(self: Any, *args: Any, **kwargs: Any) -> Any:
        probe.task = asyncio.get_running_loop().create_task(probe.heartbeat())  # type: ignore[attr-defined]
        probe.stalls.start()
        return await startup(self, *args, **kwargs)

    DrainingServer.startup = startup_with_heartbeat  # type: ignore[method-assign]
    out = os.environ.get("PROBE_OUT")
    if out:
        atexit.register(lambda: Path(out).write_text(json.dumps(probe.report(), indent=1)))
    return probe


def main() -> None:
    install()
    from receiver.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
