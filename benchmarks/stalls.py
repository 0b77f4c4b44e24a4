"""Say what held the event loop whenever it stalled: a watchdog thread for `benchmarks.probe`.

The probe's heartbeat task wakes every 5 ms; `beat()` notes when. A thread of its own looks
every few milliseconds; once the last beat is older than the threshold, the loop is stalled, and
until the next beat the thread samples the main thread's Python stack. For each stall it then
records, besides the stacks:

- the wall time from the last beat to the next;
- how long the main thread ran on a CPU in that time, and how long it waited runnable for one
  (the kernel's `/proc/<pid>/task/<tid>/schedstat`): a stall in which it mostly waited is the
  machine's (another process had the cores), not the bridge's;
- the CPU the process's other threads used (did one hold the GIL?);
- the garbage collector's pauses inside it (the probe's `gc.callbacks`).

A sampler that needs the GIL cannot sample while the main thread holds it without a break (a
collection, one long C call): such a stall shows as run time with few or no stacks, and the
collector's share says whether it was a collection. The thread takes the GIL for a few
microseconds each look; that is the probe's own cost.
"""

from __future__ import annotations

import bisect
import collections
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOOK_EVERY = 0.004
FRAMES = 10  # innermost frames kept per sample


@dataclass
class Stall:
    began: float  # perf_counter of the last beat before it
    wall_began: float  # time.time() of the same moment
    stacks: collections.Counter[str] = field(default_factory=collections.Counter)
    ended: float = 0.0


def _stack(frame: Any) -> str:
    """The innermost frames, innermost first: `file:function:line <- caller ...`."""
    parts: list[str] = []
    while frame is not None and len(parts) < FRAMES:
        code = frame.f_code
        parts.append(f"{Path(code.co_filename).name}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return " <- ".join(parts)


class StallWatch:
    """Created in the thread that runs the event loop."""

    def __init__(self, threshold: float = 0.02) -> None:
        self.threshold = threshold
        self._main = threading.get_ident()
        self._schedstat = Path(f"/proc/self/task/{threading.get_native_id()}/schedstat")
        self._beat = time.perf_counter()
        self._wall_beat = time.time()
        self._current: Stall | None = None
        self.stalls: list[Stall] = []
        # (perf_counter, main thread's run ns, its runqueue wait ns, process CPU s) per look
        self._readings: collections.deque[tuple[float, int, int, float]] = collections.deque(
            maxlen=50_000)  # 200 s of looks
        # (perf_counter at its end, seconds, generation) per collection
        self.gc_pauses: collections.deque[tuple[float, float, int]] = collections.deque(
            maxlen=50_000)

    def beat(self) -> None:
        """Called by the heartbeat on each wake."""
        self._beat = time.perf_counter()
        self._wall_beat = time.time()

    def on_gc_pause(self, ended: float, seconds: float, generation: int) -> None:
        self.gc_pauses.append((ended, seconds, generation))

    def start(self) -> None:
        threading.Thread(target=self._run, name="probe stall watch", daemon=True).start()

    def _read(self) -> None:
        try:
            run, wait, _ = (int(v) for v in self._schedstat.read_text().split())
        except (OSError, ValueError):
            return
        self._readings.append((time.perf_counter(), run, wait, time.process_time()))

    def _run(self) -> None:
        while True:
            time.sleep(LOOK_EVERY)
            self._read()
            beat, now = self._beat, time.perf_counter()
            current = self._current
            if current is not None and beat != current.began:
                current.ended = beat
                self.stalls.append(current)
                current = self._current = None
            if now - beat > self.threshold:
                if current is None:
                    current = self._current = Stall(beat, self._wall_beat)
                frame = sys._current_frames().get(self._main)
                current.stacks[_stack(frame)] += 1

    @staticmethod
    def _at(readings: list[tuple[float, int, int, float]],
            moment: float) -> tuple[float, int, int, float] | None:
        """The reading taken nearest `moment` (readings are in time order)."""
        i = bisect.bisect_left(readings, moment, key=lambda r: r[0])
        near = readings[max(i - 1, 0):i + 1]
        return min(near, key=lambda r: abs(r[0] - moment)) if near else None

    def report(self, top: int = 1000) -> dict[str, Any]:
        """The `top` longest stalls, longest first."""
        rows = []
        # The watch thread goes on while this reads: work on copies.
        readings, stalls, pauses = list(self._readings), list(self.stalls), list(self.gc_pauses)
        for stall in sorted(stalls, key=lambda s: s.began - s.ended)[:top]:
            first, last = self._at(readings, stall.began), self._at(readings, stall.ended)
            row: dict[str, Any] = {
                "wall_time": round(stall.wall_began, 3),
                "ms": round((stall.ended - stall.began) * 1000, 1),
                "gc_ms": round(sum(s for end, s, _ in pauses
                                   if stall.began <= end <= stall.ended) * 1000, 1),
                "gc_generations": sorted({g for end, _, g in pauses
                                          if stall.began <= end <= stall.ended}),
                "stacks": [[n, s] for s, n in stall.stacks.most_common(4)],
            }
            if first and last and first is not last:
                main_run = (last[1] - first[1]) / 1e6
                row.update(main_run_ms=round(main_run, 1),
                           main_waited_for_cpu_ms=round((last[2] - first[2]) / 1e6, 1),
                           other_threads_cpu_ms=round((last[3] - first[3]) * 1000 - main_run, 1),
                           measured_over_ms=round((last[0] - first[0]) * 1000, 1))
            rows.append(row)
        return {"threshold_ms": self.threshold * 1000, "count": len(stalls),
                "total_ms": round(sum(s.ended - s.began for s in stalls) * 1000, 1),
                "longest": rows}
