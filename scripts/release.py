"""Checks and notes for a release (used by .gitea/workflows/release.yml).

    python scripts/release.py check v0.1.0     the tag names the one version: receiver.__version__,
                                               the chart's version and appVersion, the image label
    python scripts/release.py notes 0.1.0      print CHANGELOG.md's section for that version

Exit status 1 with the reason on stderr when a check fails or the section is missing or empty.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def package_version(root: Path = ROOT) -> str:
    text = (root / "receiver" / "__init__.py").read_text()
    found = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    if not found:
        raise SystemExit("receiver/__init__.py has no __version__")
    return found.group(1)


def mismatches(tag: str, root: Path = ROOT) -> list[str]:
    """What disagrees with the tag (empty when the release may proceed)."""
    version = tag.removeprefix("v")
    problems = []
    if not tag.startswith("v") or not re.fullmatch(r"\d+\.\d+\.\d+", version):
        problems.append(f"tag {tag!r} is not v<major>.<minor>.<patch>")
    if package_version(root) != version:
        problems.append(f"receiver.__version__ is {package_version(root)}, the tag says {version}")
    chart = yaml.safe_load((root / "charts" / "gitea-flux-bridge" / "Chart.yaml").read_text())
    for key in ("version", "appVersion"):
        if str(chart.get(key)) != version:
            problems.append(f"Chart.yaml {key} is {chart.get(key)}, the tag says {version}")
    labels = re.findall(r'org\.opencontainers\.image\.version="([^"]+)"',
                        (root / "Containerfile").read_text())
    if labels != [version]:
        problems.append(f"Containerfile image.version label is {labels}, the tag says {version}")
    return problems


def notes(version: str, root: Path = ROOT) -> str:
    """The body of CHANGELOG.md's `## [version]` section (without its heading)."""
    text = (root / "CHANGELOG.md").read_text()
    heading = re.search(rf"^## \[?{re.escape(version)}\]?[^\n]*\n", text, re.M)
    if heading is None:
        raise SystemExit(f"CHANGELOG.md has no section ## [{version}]")
    rest = text[heading.end():]
    following = re.search(r"^## ", rest, re.M)
    body = (rest[:following.start()] if following else rest).strip()
    # Link reference definitions at the end of the file are not part of the section.
    body = re.sub(r"(\n\[[^\]]+\]: \S+)+$", "", body).strip()
    if not body:
        raise SystemExit(f"CHANGELOG.md's section ## [{version}] is empty")
    return body + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("check", "notes"):
        print(__doc__, file=sys.stderr)
        return 2
    command, value = argv
    if command == "check":
        problems = mismatches(value)
        for problem in problems:
            print(f"release: {problem}", file=sys.stderr)
        if problems:
            return 1
        print(f"release: {value} matches receiver.__version__, the chart and the image label")
        return 0
    sys.stdout.write(notes(value.removeprefix("v")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
