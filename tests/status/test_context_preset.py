"""The `notification-controller` context preset: the contexts its gitea Provider posts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from receiver.config import StatusConfig
from receiver.status.decisions import RepoRef, build_status

UID = "0C9C2E41-7d1f-4b2a-9e3c-2f1a5b6c7d8e"
REPO = RepoRef("gitea.example.com/platform/fleet", "gitea.example.com", "platform", "fleet")


def _context(cfg: StatusConfig, kind: str, name: str) -> str:
    templates = cfg.templates("eu-1")
    return build_status(templates, kind, "flux-system", name, REPO, "a" * 40, "success",
                        "reconciliation succeeded").context


def test_the_preset_reproduces_notification_controller_contexts() -> None:
    cfg = StatusConfig(context_preset="notification-controller", provider_uid=UID)
    # generateDefaultCommitStatus: kind/name/<first UID segment>, all lower-cased.
    assert _context(cfg, "Kustomization", "flux-system") == "kustomization/flux-system/0c9c2e41"
    assert _context(cfg, "HelmRelease", "podinfo") == "helmrelease/podinfo/0c9c2e41"


def test_the_default_is_unchanged_and_uid8_is_a_template_field() -> None:
    assert _context(StatusConfig(), "Kustomization", "apps") == "flux/eu-1/kustomization/flux-system/apps"
    cfg = StatusConfig(context_template="flux/{cluster}/{kind}/{name}/{uid8}", provider_uid=UID)
    assert _context(cfg, "Kustomization", "apps") == "flux/eu-1/kustomization/apps/0c9c2e41"


@pytest.mark.parametrize("kwargs", [
    {"context_preset": "notification-controller"},  # no provider_uid
    {"context_preset": "notification-controller", "provider_uid": "  "},
    {"context_preset": "notification-controller", "provider_uid": UID,
     "context_template": "{kind}/{name}"},  # both
    {"context_preset": "flux", "provider_uid": UID},  # unknown preset
])
def test_a_preset_without_what_it_needs_is_refused(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        StatusConfig(**kwargs)  # type: ignore[arg-type]
