"""The docs say what the code does: every metric, config key and error text in `docs/` exists in
the code, and every metric and config key in the code is documented."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from receiver.config import Settings
from receiver.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = ROOT / "docs"


def _string_parts() -> str:
    """Every string constant in the package, with f-strings' literal parts (Python has already
    joined adjacent literals), one per line."""
    parts: list[str] = []
    for path in (ROOT / "receiver").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts.append(node.value)
    return "\n".join(parts)


STRINGS = _string_parts()


def _metric_names() -> set[str]:
    """Every sample name the service can expose under our prefix (counters with `_total`)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if not family.name.startswith("gfb_"):
            continue
        if family.type == "counter":
            names.add(family.name + "_total")
        else:
            names.add(family.name)
    return names


def _documented_metrics() -> set[str]:
    text = (DOCS / "operations.md").read_text()
    return set(re.findall(r"^\| `(gfb_[a-z_]+)` \|", text, flags=re.M))


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    code, docs = _metric_names(), _documented_metrics()
    assert code - docs == set(), "metrics missing from docs/operations.md"
    assert docs - code == set(), "docs/operations.md names metrics the code does not have"


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        key = prefix + name
        annotation: Any = field.annotation
        sub = _model_in(annotation)
        if sub is not None:
            keys |= _leaf_keys(sub, key + ".")
        else:
            keys.add(key)
    return keys


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _documented_keys() -> set[str]:
    text = (DOCS / "configuration.md").read_text()
    return set(re.findall(r"^\| `([a-z_][a-z0-9_.\[\]]*)` \|", text, flags=re.M))


def test_every_config_key_is_documented() -> None:
    documented = _documented_keys()
    missing = {key for key in _leaf_keys(Settings) if key not in documented}
    assert missing == set(), "config keys missing from docs/configuration.md"


def _documented_errors() -> set[str]:
    text = (DOCS / "api.md").read_text()
    return set(re.findall(r'\{"error": ?"([^"]+)"', text))


def test_every_documented_error_text_exists_in_the_code() -> None:
    missing = set()
    for message in _documented_errors():
        text = " ".join(message.split())  # the docs wrap long lines
        # What the code writes literally: the text between placeholders (`<...>`), numbers,
        # and quoted examples; a leading field name may be interpolated (`ref is longer ...`).
        fragments = [f.strip() for f in re.split(r"<[^>]*>|\d+|'[^']*'", text)]
        for fragment in (f for f in fragments if len(f) >= 8):
            tail = fragment.split(" ", 1)[-1]
            if fragment not in STRINGS and tail not in STRINGS:
                missing.add(message)
    assert missing == set(), "docs/api.md shows error texts the code never sends"


def test_every_test_the_architecture_names_as_holding_an_invariant_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", text))
    assert len(named) >= 10
    for path, name in named:
        source = ROOT / path
        assert source.is_file(), path
        if name:
            assert re.search(rf"^(?:async )?def {name}\(", source.read_text(), re.M), (path, name)


def test_user_facing_text_speaks_of_the_product_only() -> None:
    """No issue numbers, design-note sections or planning paths in what users read."""
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "charts").rglob("*.md")), *sorted((ROOT / "charts").rglob("*.yaml")),
             *sorted((ROOT / "charts").rglob("*.tpl"))]
    internal = re.compile(r"\bissues? \d+|\bDESIGN\b|\.\./shared|shared/reference")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in pages
             for n, line in enumerate(p.read_text().splitlines(), 1) if internal.search(line)]
    assert not found, found
