"""Gitea version awareness: `skipped` only where Gitea accepts it (>= 1.25), `success` before,
so no status stays `pending` on an older Gitea."""

from __future__ import annotations

import logging

import pytest

from receiver.flux.revisions import TIMED_OUT
from receiver.gitea.version import accepts_skipped, parse_version, state_for_version
from tests.fakegitea import FakeGitea
from tests.status.test_status_service import (
    API,
    GITEA_TOKEN,
    OLD,
    REPO,
    SOURCE,
    delivery,
    eventually,
    push,
    rig,
    settled,
)

API_CONTEXT = "flux/eu-west/kustomization/apps/api"


@pytest.mark.parametrize(("text", "parsed"), [
    ("1.24.6", (1, 24, 6)),
    ("1.25.0", (1, 25, 0)),
    ("v1.26.3", (1, 26, 3)),
    ("1.25.0-rc1+dev-12-gabcdef", (1, 25, 0)),
    ("1.22", (1, 22, 0)),
    ("11.0.1+gitea-1.22.0", (1, 22, 0)),  # Forgejo: the Gitea version counts
    ("development", None),
    ("", None),
])
def test_parse_version(text: str, parsed: tuple[int, int, int] | None) -> None:
    assert parse_version(text) == parsed


def test_skipped_maps_to_success_before_1_25() -> None:
    assert not accepts_skipped("1.24.6")
    assert accepts_skipped("1.25.0") and accepts_skipped("1.26.3")
    assert accepts_skipped(None) and accepts_skipped("development")
    assert state_for_version("skipped", "1.24.6") == "success"
    assert state_for_version("skipped", "1.25.0") == "skipped"
    for state in ("pending", "success", "failure", "error", "warning"):
        assert state_for_version(state, "1.20.0") == state


async def _superseded(gitea: FakeGitea, *, version_later: str | None = None
                      ) -> dict[str, object] | None:
    async with rig(fakes={"gitea.example.com": gitea}) as r:
        if version_later is not None:
            await eventually(lambda: gitea.version_reads == 1)
            gitea.version = version_later
        d = delivery(keys=(API,))
        r.service.on_push_routed(d, push())
        await settled(r)
        # The branch moved on before Flux fetched our commit.
        r.cluster.mark_source_fetched(SOURCE, f"main@sha1:{OLD}")
        r.cluster.mark_applied(API, f"main@sha1:{OLD}")
        r.service.on_target_changed(d, API, TIMED_OUT)
        await settled(r)
        await eventually(lambda: (gitea.latest(*REPO, API_CONTEXT) or {}).get(
            "status") != "pending")
        return gitea.latest(*REPO, API_CONTEXT)


@pytest.mark.anyio
async def test_old_gitea_gets_success_for_a_superseded_commit() -> None:
    gitea = FakeGitea(token=GITEA_TOKEN, version="1.24.6")
    latest = await _superseded(gitea)
    assert latest is not None and latest["status"] == "success"
    assert str(latest["description"]).startswith("Superseded")
    assert gitea.version_reads == 1  # read at start, not per status
    assert all(body["state"] != "skipped" for *_, body in gitea.posts)


@pytest.mark.anyio
async def test_new_gitea_gets_skipped() -> None:
    gitea = FakeGitea(token=GITEA_TOKEN, version="1.25.0")
    latest = await _superseded(gitea)
    assert latest is not None and latest["status"] == "skipped"


@pytest.mark.anyio
async def test_version_unreadable_at_start_is_read_before_a_skipped_post(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gitea = FakeGitea(token=GITEA_TOKEN, version=None)  # GET /version fails at start
    with caplog.at_level(logging.INFO, logger="receiver.status_service"):
        latest = await _superseded(gitea, version_later="1.23.8")
    assert latest is not None and latest["status"] == "success"
    assert gitea.version_reads == 2
    messages = [r.getMessage() for r in caplog.records]
    assert "cannot read the Gitea version; asked again before posting a skipped status" in messages
    versions = [r for r in caplog.records if r.getMessage() == "gitea instance version"]
    assert [(r.__dict__["version"], r.__dict__["skipped_posted_as"]) for r in versions] == [
        ("1.23.8", "success")]
