#!/usr/bin/env python3
"""Write the chart's README.md from Chart.yaml and the comments in values.yaml.

Usage: python scripts/chart_readme.py [--check] [CHART_DIR]

values.yaml documents a key with a comment block that starts with `# -- ` right above it
(the helm-docs convention); further `#` lines continue the text. A block whose last line is a
commented-out key (`# key: value`, one space after the `#`, at the keys' indentation) documents
that key, which is unset by default. A key gets a row when it is documented, or when it is a
leaf (a scalar, a list or an empty mapping) with no documented mapping above it.

--check: write nothing; exit 1 when README.md differs from what this script writes.
Needs only Python and PyYAML (a dependency of the project already).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CHART = Path(__file__).resolve().parent.parent / "charts" / "gitea-flux-bridge"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_.-]*|\"[^\"]+\"):(?: |$)")
COMMENT = re.compile(r"^(?P<indent> *)#(?P<text>.*)$")
COMMENTED_KEY = re.compile(r"^ (?P<key>[A-Za-z_][A-Za-z0-9_]*):(?: (?P<value>.*))?$")
UNSET = object()
SEE_BELOW = object()


@dataclass
class Row:
    key: str
    description: str
    default: Any = UNSET
    documented: bool = True


@dataclass
class _Block:
    indent: int
    lines: list[str] = field(default_factory=list)


def _lookup(values: Any, path: list[str]) -> Any:
    node = values
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return UNSET
        node = node[part]
    return node


def parse(text: str) -> list[Row]:
    """The documented keys of a values.yaml, in file order."""
    values = yaml.safe_load(text) or {}
    rows: list[Row] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    block: _Block | None = None
    in_list_at: int | None = None  # indentation of a list whose items are not documented

    def path_at(indent: int) -> list[str]:
        while stack and stack[-1][0] >= indent:
            stack.pop()
        return [key for _, key, _ in stack]

    def flush_commented_key(block: _Block) -> None:
        match = COMMENTED_KEY.match(block.lines[-1]) if len(block.lines) > 1 else None
        if match is None:
            return
        path = [*path_at(block.indent), match["key"]]
        rows.append(Row(".".join(path), _join(block.lines[:-1])))

    for line in text.splitlines():
        if not line.strip():
            continue
        comment = COMMENT.match(line)
        if comment:
            body = comment["text"]
            indent = len(comment["indent"])
            if in_list_at is not None and indent > in_list_at:
                continue
            if body.startswith(" -- "):
                if block is not None:
                    flush_commented_key(block)
                block = _Block(indent, [body[4:].strip()])
            elif block is not None:
                block.lines.append(body)
            continue
        indent = len(line) - len(line.lstrip(" "))
        if in_list_at is not None:
            if indent > in_list_at or (indent == in_list_at and line.lstrip().startswith("- ")):
                continue
            in_list_at = None
        match = KEY.match(line)
        if match is None:
            block = None
            continue
        key = match["key"].strip('"')
        path = [*path_at(indent), key]
        value = _lookup(values, path)
        under_documented = any(documented for _, _, documented in stack)
        if block is not None and (block.indent != indent or (
                len(block.lines) > 1 and COMMENTED_KEY.match(block.lines[-1]))):
            flush_commented_key(block)
            block = None
        documented = block is not None
        if documented:
            assert block is not None
            rows.append(Row(".".join(path), _join(block.lines), value))
        elif not under_documented and (not isinstance(value, dict) or not value):
            rows.append(Row(".".join(path), "", value, documented=False))
        block = None
        stack.append((indent, key, documented))
        if isinstance(value, list) and value:
            in_list_at = indent
    return rows


def _join(lines: list[str]) -> str:
    """One table cell: prose lines joined; indented lines (examples) as code on lines of
    their own."""
    parts: list[str] = []
    for line in lines:
        text = _cell(line.strip())
        if line.startswith("   ") and text:
            parts.append("<br>`" + text + "`")
        elif text:
            parts.append(text.replace("<", "&lt;").replace(">", "&gt;"))
    return " ".join(parts).replace(" <br>", "<br>")


def _type(value: Any) -> str:
    if value is UNSET:
        return "unset"
    if value is SEE_BELOW:
        return "object"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    return "object"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(value: Any) -> str:
    if value is UNSET:
        return "(unset)"
    if value is SEE_BELOW:
        return "see below"
    return "`" + _cell(json.dumps(value, separators=(", ", ": "))) + "`"


def render(chart_dir: Path) -> str:
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    rows = parse((chart_dir / "values.yaml").read_text())
    name = chart["name"]
    out = [
        f"# {name}",
        "",
        "<!-- Generated by scripts/chart_readme.py from Chart.yaml and values.yaml; do not edit."
        " Run `python scripts/chart_readme.py` after changing values.yaml. -->",
        "",
        " ".join(str(chart["description"]).split()),
        "",
        f"Chart version {chart['version']}, app version {chart['appVersion']},"
        f" Kubernetes {chart['kubeVersion']}.",
        "",
        "## Install",
        "",
        "`clusterName` is required: every cluster that posts statuses to the same Gitea needs its"
        " own.",
        "",
        "```sh",
        f"helm upgrade --install {name} charts/{name} --namespace flux-system \\",
        "  --set clusterName=eu-west \\",
        "  --set image.repository=registry.example.com/platform/gitea-flux-bridge",
        "```",
        "",
        "The whole setup (Gitea webhooks, the Flux Provider and Alert, tokens) is in"
        " `docs/flux-setup.md` and `docs/gitea-setup.md`; every key of `config` is described in"
        " `docs/configuration.md`.",
        "",
        "## Values",
        "",
        "| Key | Type | Default | Description |",
        "|-----|------|---------|-------------|",
    ]
    for row in rows:
        if isinstance(row.default, dict) and any(
                other.key.startswith(row.key + ".") for other in rows):
            row.default = SEE_BELOW
        out.append(f"| `{row.key}` | {_type(row.default)} | {_default(row.default)} |"
                   f" {row.description} |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    args = [a for a in argv if a != "--check"]
    chart_dir = Path(args[0]) if args else DEFAULT_CHART
    text = render(chart_dir)
    target = chart_dir / "README.md"
    if check:
        if not target.exists() or target.read_text() != text:
            print(f"{target} is out of date: run python scripts/chart_readme.py", file=sys.stderr)
            return 1
        return 0
    target.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
