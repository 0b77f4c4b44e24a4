"""Every Gitea Actions workflow, the example workflow and the notify-flux composite action,
through the real actionlint (built from its Go module by scripts/testbin.sh).

actionlint lints workflow files; a composite action's metadata is read (and its inputs and
outputs checked) where a workflow uses it as a local action, so the action is linted through
a workflow that uses it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.testbin import ROOT, tool

WORKFLOWS = sorted((ROOT / ".gitea" / "workflows").glob("*.y*ml"))
EXAMPLES = sorted((ROOT / "examples" / "gitea-actions").glob("*.y*ml"))
ACTION = ROOT / ".gitea" / "actions" / "notify-flux"


# Gitea Actions takes a full URL in `uses:` (an action from another Gitea instance); actionlint
# knows only GitHub's `owner/repo@ref` forms.
GITEA_URL_USES = r'specifying action "https://[^"]+" in invalid format'


def actionlint(*files: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # -shellcheck= : the shell in `run:` steps is checked by shellcheck tests of their own.
    return subprocess.run([tool("actionlint"), "-no-color", "-shellcheck=",
                           "-ignore", GITEA_URL_USES, *map(str, files)],
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_there_are_workflows() -> None:
    assert WORKFLOWS and EXAMPLES


@pytest.mark.parametrize("path", WORKFLOWS + EXAMPLES, ids=lambda p: p.name)
def test_workflow_is_clean(path: Path) -> None:
    result = actionlint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def _project_using_the_action(tmp_path: Path, extra_input: str = "") -> Path:
    """A repository that uses notify-flux as a local action with every input and output."""
    shutil.copytree(ACTION, tmp_path / ".gitea" / "actions" / "notify-flux")
    (tmp_path / ".git").mkdir()
    metadata = yaml.safe_load((ACTION / "action.yml").read_text())
    inputs = "\n".join(f"          {name}: x" for name in metadata["inputs"])
    outputs = " ".join(f"${{{{ steps.notify.outputs.{name} }}}}" for name in metadata["outputs"])
    workflow = tmp_path / ".github" / "workflows" / "uses-notify-flux.yml"
    workflow.parent.mkdir(parents=True)
    workflow.write_text(
        "on: push\njobs:\n  deploy:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - id: notify\n        uses: ./.gitea/actions/notify-flux\n        with:\n"
        f"{inputs}\n{extra_input}"
        f"      - run: echo \"{outputs}\"\n")
    return workflow


def test_composite_action_metadata_is_clean(tmp_path: Path) -> None:
    workflow = _project_using_the_action(tmp_path)
    result = actionlint(workflow, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_action_is_really_read(tmp_path: Path) -> None:
    workflow = _project_using_the_action(tmp_path, "          no-such-input: x\n")
    result = actionlint(workflow, cwd=tmp_path)
    assert result.returncode != 0
    assert 'input "no-such-input" is not defined in action "notify-flux"' in result.stdout
