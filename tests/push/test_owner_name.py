"""An Actions body may name its repository `owner/name` (what `${{ gitea.repository }}` gives):
matched on every configured Gitea host and alias, so a mirrored pair is matched on both."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from receiver import signatures as sig
from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import PayloadError, parse_actions_body
from receiver.giturls import gitea_prefixes, normalise_repo_url
from receiver.push.routing import plan_push
from tests.conftest import ACTIONS_TOKEN, Bridge, make_settings

SHA = "d" * 40
ALIASES = {"gitea-http.gitea.svc:3000": "gitea.eu.example.com"}
PREFIXES = gitea_prefixes(["https://gitea.eu.example.com", "https://us.example.com/gitea/"],
                          ["gitea.eu.example.com"], ALIASES)


def _repo(name: str, url: str, branch: str = "main", ns: str = "flux-system") -> dict[str, Any]:
    return {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"url": url, "ref": {"branch": branch}}}


def _store() -> ObjectStore:
    store = ObjectStore(lambda url: normalise_repo_url(url, ALIASES))
    for raw in (
        _repo("eu", "https://gitea.eu.example.com/Teams/Apps.git"),
        _repo("us", "ssh://git@us.example.com/gitea/teams/apps.git"),
        _repo("in-cluster", "http://gitea-http.gitea.svc:3000/teams/apps"),
        _repo("github", "https://github.com/teams/apps.git"),
        _repo("other", "https://gitea.eu.example.com/teams/other.git"),
        {"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
         "metadata": {"name": "r", "namespace": "flux-system"},
         "spec": {"type": "generic", "resources": [
             {"kind": "GitRepository", "name": n} for n in ("eu", "us", "in-cluster", "github",
                                                            "other")]}},
    ):
        store.upsert(raw)
    return store


def test_prefixes_hold_instance_urls_with_sub_paths_hosts_and_aliases() -> None:
    # An alias stands for its target (URLs are normalised to the target before matching).
    assert {"gitea.eu.example.com", "us.example.com/gitea"} == PREFIXES
    assert gitea_prefixes([], [], {"mirror.example.com:2222": "mirror.example.com"}) == {
        "mirror.example.com"}


def test_owner_name_matches_every_configured_gitea_host_and_names_them() -> None:
    store = _store()
    push = parse_actions_body({"repository": "teams/apps", "ref": "main", "sha": SHA})
    assert push.repo_urls == () and push.full_name == "teams/apps"
    receiver = store.list("Receiver")[0]
    plan = plan_push(receiver, push, store, gitea_prefixes=PREFIXES)
    reasons = {t.name: t.reason for t in plan.targets}
    assert sorted(reasons) == ["eu", "in-cluster", "us"]  # not github.com, not teams/other
    assert reasons["us"] == ("repository teams/apps (at us.example.com/gitea/teams/apps) and "
                             "branch main match the push")


def test_owner_name_without_configured_hosts_matches_any_host() -> None:
    store = _store()
    push = parse_actions_body({"repository": "teams/apps.git", "ref": "main", "sha": SHA})
    plan = plan_push(store.list("Receiver")[0], push, store)
    assert sorted(t.name for t in plan.targets) == ["eu", "github", "in-cluster", "us"]


@pytest.mark.parametrize("value", ["apps", "a/b/c", "a b/c", "/apps", "teams/", "teams/apps/"])
def test_what_is_neither_a_url_nor_owner_name_is_refused(value: str) -> None:
    with pytest.raises(PayloadError, match="URL or owner/name"):
        parse_actions_body({"repository": value, "ref": "main", "sha": SHA})


@given(owner=st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True),
       name=st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True))
def test_owner_name_finds_exactly_the_url_form_of_the_same_repository(owner: str, name: str) -> None:
    store = ObjectStore(lambda url: normalise_repo_url(url, ALIASES))
    store.upsert(_repo("x", f"https://gitea.eu.example.com/{owner}/{name}.git"))
    by_url = parse_actions_body({"repository": f"https://gitea.eu.example.com/{owner}/{name}",
                                 "ref": "main", "sha": SHA})
    by_name = parse_actions_body({"repository": f"{owner}/{name}", "ref": "main", "sha": SHA})
    receiver = store.upsert({"kind": "Receiver", "metadata": {"name": "r", "namespace": "flux-system"},
                             "spec": {"resources": [{"kind": "GitRepository", "name": "x"}]}})
    assert [t.key for t in plan_push(receiver, by_url, store).targets] == [
        t.key for t in plan_push(receiver, by_name, store, gitea_prefixes=PREFIXES).targets]


@pytest.mark.anyio
async def test_the_service_routes_owner_name_and_says_where_it_matched(bridge_factory: Any) -> None:
    # No Gitea answers here: the statuses queued cannot be posted, so the teardown does not
    # give them the default 10 s to drain.
    settings = make_settings(gitea=[{"name": "eu", "url": "https://gitea.example.com",
                                     "token": {"file": "/dev/null"}}],
                             shutdown={"flush_seconds": 0})
    bridge: Bridge = await bridge_factory(settings)
    body = json.dumps({"repository": "teams/apps", "ref": "production", "sha": SHA,
                       "paths": ["deploy/app.yaml"]}).encode()
    path = "/hook/" + sig.hook_digest(ACTIONS_TOKEN, "actions", "apps")
    r = await bridge.client.post(path, content=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {ACTIONS_TOKEN}"})
    assert r.status_code == 202, r.text
    source = r.json()["targets"][0]
    assert (source["kind"], source["name"]) == ("GitRepository", "team-apps")
    assert "repository teams/apps (at gitea.example.com/teams/apps)" in source["reason"]
