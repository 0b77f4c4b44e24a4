"""The chart's README is generated from values.yaml comments by scripts/chart_readme.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
CHART = ROOT / "charts" / "gitea-flux-bridge"
SCRIPT = ROOT / "scripts" / "chart_readme.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_readme", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chart_readme"] = module
    spec.loader.exec_module(module)
    return module


def test_committed_readme_matches_the_script() -> None:
    expected = _script().render(CHART)
    assert (CHART / "README.md").read_text() == expected, (
        "charts/gitea-flux-bridge/README.md is out of date: run python scripts/chart_readme.py")


def test_check_mode_reports_a_stale_readme(tmp_path: Path) -> None:
    for name in ("Chart.yaml", "values.yaml", "README.md"):
        (tmp_path / name).write_text((CHART / name).read_text())
    ok = subprocess.run([sys.executable, str(SCRIPT), "--check", str(tmp_path)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    with (tmp_path / "values.yaml").open("a") as f:
        f.write("\n# -- A new value.\nnewValue: 1\n")
    stale = subprocess.run([sys.executable, str(SCRIPT), "--check", str(tmp_path)],
                           capture_output=True, text=True)
    assert stale.returncode == 1
    assert "out of date" in stale.stderr


def test_every_top_level_value_is_in_the_readme() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    keys = {row.key for row in _script().parse((CHART / "values.yaml").read_text())}
    for top in values:
        assert top in keys or any(k.startswith(top + ".") for k in keys), top


def test_parse_conventions() -> None:
    text = """\
# -- The first.
# More about it.
first: 1
nested:
  # -- Documented child.
  child: "x"
  plain: [1, 2]
  # -- An optional key, unset by default.
  # optional: {file: /x}
  after: true
# -- A documented mapping: its children are not listed unless documented.
block:
  a: 1
  # -- But this one is.
  b: 2
listOfMaps:
  - name: a
    # -- not a value of the chart
    value: 1
last: null
"""
    rows = {row.key: row for row in _script().parse(text)}
    assert list(rows) == ["first", "nested.child", "nested.plain", "nested.optional",
                          "nested.after", "block", "block.b", "listOfMaps", "last"]
    assert rows["first"].description == "The first. More about it."
    assert rows["nested.optional"].description == "An optional key, unset by default."
    assert rows["nested.after"].description == ""
    assert rows["block"].default == {"a": 1, "b": 2}
    assert rows["listOfMaps"].default == [{"name": "a", "value": 1}]
