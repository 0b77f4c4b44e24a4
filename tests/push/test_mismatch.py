"""A push that matches no source says why: in the /hook reply and in a metric."""

from __future__ import annotations

from typing import Any

import pytest

from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import Push
from receiver.push.mismatch import HOST_ALIAS_MISSING, OTHER_HOST, OTHER_REPOSITORY, unmatched
from receiver.web.app import url_normaliser
from tests import gitea_payloads as gp
from tests.conftest import Bridge, BridgeFactory, make_settings
from tests.web.test_ingest import post_gitea


def _store(*urls: str, aliases: dict[str, str] | None = None) -> ObjectStore:
    settings = make_settings(host_aliases=aliases or {})
    store = ObjectStore(url_normaliser(settings))
    for i, url in enumerate(urls):
        store.upsert({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
                      "metadata": {"name": f"repo-{i}", "namespace": "flux-system"},
                      "spec": {"url": url, "ref": {"branch": "main"}}})
    return store


def _push(*urls: str) -> Push:
    return Push(repo_urls=urls, full_name="", ref="refs/heads/main", sha="a" * 40)


def test_a_matched_repository_is_not_unmatched() -> None:
    store = _store("https://gitea.example.com/platform/fleet.git")
    assert unmatched(_push("https://gitea.example.com/platform/fleet"), store) is None
    assert unmatched(None, store) is None
    assert unmatched(_push(), store) is None


def test_same_path_on_another_host_is_a_missing_alias() -> None:
    store = _store("http://gitea-http.gitea.svc.cluster.local:3000/platform/fleet.git")
    found = unmatched(_push("https://gitea.example.com/platform/fleet.git",
                            "git@gitea.example.com:platform/fleet.git"), store)
    assert found is not None and found.reason == HOST_ALIAS_MISSING
    assert "gitea-http.gitea.svc.cluster.local:3000" in found.message
    assert "host_aliases" in found.message
    # With the alias, it matches.
    aliased = _store("http://gitea-http.gitea.svc.cluster.local:3000/platform/fleet.git",
                     aliases={"gitea-http.gitea.svc.cluster.local:3000": "gitea.example.com"})
    assert unmatched(_push("https://gitea.example.com/platform/fleet.git"), aliased) is None


def test_known_host_other_repository() -> None:
    store = _store("https://gitea.example.com/platform/fleet.git")
    found = unmatched(_push("https://gitea.example.com/platform/other.git"), store)
    assert found is not None and found.reason == OTHER_REPOSITORY
    assert "gitea.example.com/platform/other" in found.message


def test_unknown_host() -> None:
    store = _store("https://gitea.example.com/platform/fleet.git")
    found = unmatched(_push("https://elsewhere.example.org/team/app.git"), store)
    assert found is not None and found.reason == OTHER_HOST
    assert "elsewhere.example.org" in found.message
    assert unmatched(_push("https://gitea.example.com/x/y"), _store()) is not None


def test_the_store_forgets_deleted_urls() -> None:
    store = _store("https://gitea.example.com/platform/fleet.git")
    assert store.has_source_host("gitea.example.com")
    assert store.hosts_serving("other.example.com/platform/fleet") == ["gitea.example.com"]
    store.delete(next(iter(store.list("GitRepository"))).key)
    assert not store.has_source_host("gitea.example.com")
    assert store.hosts_serving("other.example.com/platform/fleet") == []


# -- through /hook -----------------------------------------------------------------------------

CASES = [
    # (repository, Gitea root URL, reason)
    ("platform/fleet", "https://gitea-mirror.example.com/", HOST_ALIAS_MISSING),
    ("platform/not-deployed", gp.ROOT_URL, OTHER_REPOSITORY),
    ("team/app", "https://elsewhere.example.org/", OTHER_HOST),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("repo", "root", "reason"), CASES)
async def test_hook_reply_and_metric_name_the_reason(
    bridge: Bridge, repo: str, root: str, reason: str
) -> None:
    doc = gp.push(repo, root=root)
    r = await post_gitea(bridge, doc)
    assert r.status_code == 202, r.text
    reply: dict[str, Any] = r.json()
    assert reply["targets"] == []
    assert reply["unmatched"]["reason"] == reason
    assert reply["unmatched"]["message"]
    registry = bridge.parts.metrics.registry
    assert registry.get_sample_value("gfb_pushes_unmatched_total", {"reason": reason}) == 1


@pytest.mark.anyio
async def test_a_matching_push_has_no_unmatched(bridge: Bridge) -> None:
    r = await post_gitea(bridge, gp.push("platform/fleet"))
    assert r.status_code == 202
    assert "unmatched" not in r.json()
    registry = bridge.parts.metrics.registry
    for reason in (HOST_ALIAS_MISSING, OTHER_REPOSITORY, OTHER_HOST):
        assert not registry.get_sample_value("gfb_pushes_unmatched_total", {"reason": reason})


@pytest.mark.anyio
async def test_alias_fixes_it(bridge_factory: BridgeFactory) -> None:
    settings = make_settings(host_aliases={
        "gitea-http.gitea.svc.cluster.local:3000": "gitea.example.com",
        "gitea-mirror.example.com": "gitea.example.com"})
    bridge = await bridge_factory(settings)
    root = "https://gitea-mirror.example.com/"
    doc = gp.push("platform/fleet", root=root)
    r = await post_gitea(bridge, doc)
    assert r.status_code == 202
    assert "unmatched" not in r.json()
    assert r.json()["targets"], r.json()
