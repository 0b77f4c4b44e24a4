"""Helpers the benchmark drivers share: ports, wrk output, process memory."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"not a wrk latency: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(out: str) -> dict[str, float]:
    """requests/s, request count, p50/p99 in ms (needs --latency) and non-2xx from wrk output."""
    def find(pattern: str) -> str:
        match = re.search(pattern, out)
        if match is None:
            raise RuntimeError(f"wrk output lacks {pattern!r}:\n{out}")
        return match.group(1)

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": float(find(r"Requests/sec:\s+([\d.]+)")),
        "requests": float(find(r"(\d+) requests in")),
        "p50": _ms(find(r"\s50(?:\.000)?%\s+(\S+)")),
        "p99": _ms(find(r"\s99(?:\.000)?%\s+(\S+)")),
        "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
