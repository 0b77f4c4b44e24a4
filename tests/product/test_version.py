"""One version: receiver.__version__. Everything else that names it is checked against it."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version as installed_version
from pathlib import Path

import yaml

import receiver

ROOT = Path(__file__).resolve().parent.parent.parent


def test_version_is_a_release_number() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", receiver.__version__)


def test_pyproject_takes_it_from_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "receiver.__version__"}


def test_installed_distribution_has_it() -> None:
    assert installed_version("gitea-flux-bridge") == receiver.__version__


def test_chart_app_version_is_it() -> None:
    chart = yaml.safe_load((ROOT / "charts" / "gitea-flux-bridge" / "Chart.yaml").read_text())
    assert chart["appVersion"] == receiver.__version__


def test_image_label_is_it() -> None:
    text = (ROOT / "Containerfile").read_text()
    labels = re.findall(r'org\.opencontainers\.image\.version="([^"]+)"', text)
    assert labels == [receiver.__version__]


def test_changelog_has_a_section_for_it() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[?{re.escape(receiver.__version__)}\]?", changelog, re.M)
    assert "## [Unreleased]" in changelog


def test_license_is_apache_2() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
