"""scripts/release.py (tag checks, changelog notes) and the shape of .gitea/workflows/release.yml.
actionlint lints the workflow itself (tests/product/test_actionlint.py)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

import receiver

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "scripts" / "release.py"
WORKFLOW = ROOT / ".gitea" / "workflows" / "release.yml"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("release", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


release = _module()


def _copy(tmp_path: Path) -> Path:
    for path in ("receiver/__init__.py", "charts/gitea-flux-bridge/Chart.yaml", "Containerfile",
                 "CHANGELOG.md"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, tmp_path / path)
    return tmp_path


def test_the_current_version_tag_passes() -> None:
    assert release.mismatches(f"v{receiver.__version__}") == []
    out = subprocess.run([sys.executable, str(SCRIPT), "check", f"v{receiver.__version__}"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("tag", ["v9.9.9", receiver.__version__, "v1.2", "vX"])
def test_another_tag_fails(tag: str) -> None:
    assert release.mismatches(tag)
    out = subprocess.run([sys.executable, str(SCRIPT), "check", tag], capture_output=True,
                         text=True, check=False)
    assert out.returncode == 1 and "release: " in out.stderr


def test_a_chart_left_behind_is_named(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    chart = root / "charts" / "gitea-flux-bridge" / "Chart.yaml"
    chart.write_text(chart.read_text().replace(f'appVersion: "{receiver.__version__}"',
                                               'appVersion: "0.0.9"'))
    assert release.mismatches(f"v{receiver.__version__}", root) == [
        f"Chart.yaml appVersion is 0.0.9, the tag says {receiver.__version__}"]


def test_notes_are_the_version_section_only() -> None:
    body = release.notes(receiver.__version__)
    assert body.strip()
    assert "## " not in body.split("\n", 1)[0]
    assert "[Unreleased]" not in body


def test_notes_stop_at_the_next_section_and_link_definitions(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "CHANGELOG.md").write_text(
        "# Changelog\n\n## [Unreleased]\n\n- next\n\n## [1.1.0] - 2026-01-02\n\n### Fixed\n\n"
        "- a fix\n\n## [1.0.0]\n\n- first\n\n[1.1.0]: https://example.com/c\n")
    assert release.notes("1.1.0", root) == "### Fixed\n\n- a fix\n"
    assert release.notes("1.0.0", root) == "- first\n"
    with pytest.raises(SystemExit, match="no section"):
        release.notes("2.0.0", root)


def test_workflow_runs_on_version_tags_in_order() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    on = workflow[True]  # YAML 1.1 reads the key `on` as a boolean
    assert on == {"push": {"tags": ["v*"]}}
    jobs = workflow["jobs"]
    assert jobs["test"]["needs"] == "check" and jobs["publish"]["needs"] == "test"
    assert any(s.get("run") == "bash .ci/run" for s in jobs["test"]["steps"])
    publish = "\n".join(str(s.get("run", "")) for s in jobs["publish"]["steps"])
    assert "--build-arg \"PYTHON_IMAGE=$base\"" in publish
    assert 'helm push "dist/gitea-flux-bridge-$VERSION.tgz" "$CHARTS"' in publish
    assert "/api/v1/repos/$REPOSITORY/releases" in publish
    assert jobs["publish"]["env"]["REGISTRY_TOKEN"] == "${{ secrets.REGISTRY_TOKEN }}"


def test_workflow_pins_the_helm_the_tests_use() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    setup = [s for s in workflow["jobs"]["publish"]["steps"]
             if str(s.get("uses", "")).startswith("azure/setup-helm")]
    pinned = (ROOT / "scripts" / "testbin.sh").read_text()
    assert setup and f"HELM_VERSION={setup[0]['with']['version']}" in pinned
