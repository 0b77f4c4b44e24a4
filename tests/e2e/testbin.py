"""The binaries scripts/testbin.sh provides (promtool, actionlint, ...).

Taken from the cache, provided on demand when missing: built from their Go modules (minutes,
once), except promtool, which comes from PATH or Debian's `prometheus` package when apt has it
(seconds) and is built only otherwise. A tool that cannot be provided fails the test that needs
it: it never skips silently.
"""

from __future__ import annotations

import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "scripts" / "testbin.sh"


@cache
def tool(name: str) -> str:
    out = subprocess.run(["bash", str(SCRIPT), "--print-dir"], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    path = Path(out.stdout.strip()) / name
    if not path.exists():
        build = subprocess.run(["bash", str(SCRIPT), name], capture_output=True, text=True,
                               cwd=ROOT, timeout=3600)
        if build.returncode != 0 or not path.exists():
            pytest.fail(f"`scripts/testbin.sh {name}` could not build it:\n"
                        + build.stdout[-2000:] + build.stderr[-4000:])
    return str(path)
