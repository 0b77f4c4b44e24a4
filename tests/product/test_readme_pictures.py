"""The pictures in README.md are the product's own: the badge it shows is what the README's
simulated deploy makes the service serve, byte for byte; the diagram names the endpoints the
service has; the screenshot is the one tests/e2e/test_e2e_loop.py takes of a real Gitea."""

from __future__ import annotations

import re
from pathlib import Path

from tests.product import test_action_script as action

ROOT = Path(__file__).resolve().parent.parent.parent
README = (ROOT / "README.md").read_text()
BADGE = ROOT / "docs" / "images" / "badge-deployed.svg"
BADGE_PATH = "/badge/teams/apps.svg?branch=production"


def test_the_readme_badge_is_what_the_simulated_deploy_serves(tmp_path: Path) -> None:
    service = action.start_service(tmp_path, "--simulate-flux", "--simulate-delay", "0.2",
                                   env={"GFB_CLUSTER_NAME": "eu-west"})
    try:
        _, before = service.get(BADGE_PATH)
        assert b'aria-label="eu-west: unknown"' in before, before
        result = action.run_notify(action.actions_env(
            service.base_url, action.hook_path(tmp_path), FLUX_BRIDGE_WAIT="60"))
        assert result.returncode == 0, (result.stdout, result.stderr)
        _, after = service.get(BADGE_PATH)
    finally:
        action.stop_service(service)
    assert b'aria-label="eu-west: deployed"' in after, after
    assert after == BADGE.read_bytes(), "regenerate docs/images/badge-deployed.svg"
    assert f"]({BADGE.relative_to(ROOT)})" in README


def test_the_readme_diagram_names_the_service_endpoints() -> None:
    diagram = re.search(r"```mermaid\n(.*?)```", README, re.S)
    assert diagram, "README.md has a mermaid diagram"
    text = diagram.group(1)
    for endpoint in ("/hook/", "/events", "/deliveries/"):
        assert endpoint in text, endpoint
    assert "reconcile.fluxcd.io/requestedAt" in text


def test_the_readme_screenshot_is_a_small_png() -> None:
    shot = ROOT / "docs" / "images" / "gitea-pull-statuses.png"
    assert f"]({shot.relative_to(ROOT)})" in README
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) < 200_000, "keep the repository small: a narrower window, fewer colours"
