"""The Gitea status client, every request checked against Gitea 1.26.3's swagger."""

from __future__ import annotations

import json
from pathlib import Path

import certifi
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from receiver.config import GiteaInstance, SecretSource
from receiver.gitea.api_types import CommitStatus, CreateStatusOption, StatusPage, more_pages
from receiver.gitea.client import GiteaClient, GiteaError, parse_retry_after
from receiver.retry import retryable_status
from tests.fakegitea import FakeGitea, SwaggerValidator, gitea_transport

SHA = "5394cb7f48ab9fd33a7a95f6ee1f7b9c4b2b8a3e"
OPTION = CreateStatusOption("success", "https://ui.example.com/x", "Reconciliation succeeded",
                            "flux/eu-west/kustomization/apps/webapp")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def instance(name: str = "eu", url: str = "https://gitea.example.com/sub",
             ca_bundle: Path | None = None) -> GiteaInstance:
    return GiteaInstance(name=name, url=url, token=SecretSource(secret="gitea/token"),
                         ca_bundle=ca_bundle)


def client_for(fake: FakeGitea, tokens: list[str] | None = None,
               url: str = "https://gitea.example.com/sub") -> tuple[GiteaClient, list[bool]]:
    transport, _ = gitea_transport({"gitea.example.com": fake})
    supply = list(tokens or [fake.token])
    reads: list[bool] = []

    async def read_token(source: SecretSource, fresh: bool) -> str:
        reads.append(fresh)
        return supply.pop(0) if len(supply) > 1 else supply[0]

    return GiteaClient([instance(url=url)], read_token, transport=transport), reads


# -- the validator itself -------------------------------------------------------------------


def request(method: str, path: str, body: object = None, *, auth: bool = True,
            params: dict[str, str] | None = None) -> httpx.Request:
    headers = {"Authorization": "token t"} if auth else {}
    return httpx.Request(method, "https://g.example.com" + path, params=params,
                         json=body if body is not None else None, headers=headers)


def test_validator_accepts_a_good_create_status() -> None:
    v = SwaggerValidator()
    ok = request("POST", f"/api/v1/repos/o/r/statuses/{SHA}", OPTION.as_json())
    assert v.problems(ok) == []


@pytest.mark.parametrize("req, fragment", [
    (request("POST", f"/api/v1/repos/o/r/statuses/{SHA}", {"state": "green"}), "not in"),
    (request("POST", f"/api/v1/repos/o/r/statuses/{SHA}", {"status": "success"}),
     "not in the definition"),
    (request("POST", f"/api/v1/repos/o/r/statuses/{SHA}", {"state": 1}), "is not string"),
    (request("POST", f"/api/v1/repos/o/r/statuses/{SHA}", OPTION.as_json(), auth=False),
     "Authorization"),
    (request("PUT", f"/api/v1/repos/o/r/statuses/{SHA}", OPTION.as_json()), "no such operation"),
    (request("GET", f"/api/v1/repos/o/r/statuses/{SHA}", params={"per_page": "5"}),
     "undeclared query"),
    (request("GET", f"/api/v1/repos/o/r/statuses/{SHA}", params={"sort": "newest"}), "not in"),
    (request("GET", f"/api/v1/repos/o/r/statuses/{SHA}", params={"limit": "x"}), "integer"),
    (request("GET", "/api/v2/repos/o/r"), "not under"),
])
def test_validator_catches_bad_requests(req: httpx.Request, fragment: str) -> None:
    problems = SwaggerValidator().problems(req)
    assert problems and any(fragment in p for p in problems), problems


# -- requests --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_post_status_under_a_sub_path() -> None:
    fake = FakeGitea(prefix="/sub/api/v1")
    client, _ = client_for(fake)
    created = await client.post_status("eu", "team", "webapp", SHA, OPTION)
    await client.aclose()
    assert fake.problems == []
    assert created is not None and created.state == "success" and created.id == 1
    assert fake.posts == [("team", "webapp", SHA, OPTION.as_json())]


@pytest.mark.anyio
async def test_request_shape() -> None:
    fake = FakeGitea(prefix="/sub/api/v1")
    transport, router = gitea_transport({"gitea.example.com": fake})

    async def read_token(source: SecretSource, fresh: bool) -> str:
        return "gitea-token\n"  # a trailing newline from a Secret is not part of the token

    client = GiteaClient([instance()], read_token, transport=transport)
    await client.post_status("eu", "team", "web app", SHA, OPTION)
    await client.status_page("eu", "team", "web app", SHA)
    await client.aclose()
    post, get = (call.request for call in router.calls)
    assert post.method == "POST"
    assert str(post.url) == f"https://gitea.example.com/sub/api/v1/repos/team/web%20app/statuses/{SHA}"
    assert post.headers["authorization"] == "token gitea-token"
    assert post.headers["content-type"] == "application/json"
    assert post.headers["user-agent"].startswith("gitea-flux-bridge/")
    assert json.loads(post.content) == OPTION.as_json()
    # `leastindex` is Gitea's index-descending sort: newest first, despite its name.
    assert get.method == "GET" and get.url.params["sort"] == "leastindex"
    assert get.url.params["limit"] == "50" and get.url.params["page"] == "1"
    assert not get.content
    assert fake.problems == []


@pytest.mark.anyio
async def test_a_status_page_lists_the_newest_first_with_the_status_field() -> None:
    fake = FakeGitea()
    client, _ = client_for(fake, url="https://gitea.example.com")
    other = CreateStatusOption("failure", "", "other", "flux/eu-west/kustomization/apps/other")
    assert (await client.status_page("eu", "team", "webapp", SHA)).items == ()
    await client.post_status("eu", "team", "webapp", SHA,
                             CreateStatusOption("pending", "", "Push received", OPTION.context))
    await client.post_status("eu", "team", "webapp", SHA, OPTION)
    await client.post_status("eu", "team", "webapp", SHA, other)
    page = await client.status_page("eu", "team", "webapp", SHA)
    await client.aclose()
    assert [s.context for s in page.items] == [other.context, OPTION.context, OPTION.context]
    assert page.items[1] == CommitStatus("success", OPTION.description, OPTION.target_url,
                                         OPTION.context, 2, at=1786107845.0)
    assert fake.problems == []


# -- paging ------------------------------------------------------------------------------------


def test_more_pages() -> None:
    one = CommitStatus("success", "", "", "c", 1)
    assert not more_pages(StatusPage((), 1, 50, 10), 0)  # an empty page ends it
    assert more_pages(StatusPage((one,) * 50, 1, 50, 120), 50)
    assert not more_pages(StatusPage((one,) * 20, 3, 50, 120), 120)
    # Without X-Total-Count: a full page may have a successor, a short one does not.
    assert more_pages(StatusPage((one,) * 50, 1, 50), 50)
    assert not more_pages(StatusPage((one,) * 49, 1, 50), 49)


def seeded(count: int, contexts: int = 1) -> FakeGitea:
    fake = FakeGitea()
    for i in range(count):
        fake.add("team", "webapp", SHA, f"c{i % contexts}", "pending" if i % 2 else "success",
                 f"#{i}")
    return fake


@pytest.mark.anyio
async def test_listing_reads_every_page_newest_first() -> None:
    fake = seeded(120)
    client, _ = client_for(fake, url="https://gitea.example.com")
    found: list[CommitStatus] = []
    for number in range(1, 10):  # as the service pages (status.gitea_view.read_commit)
        page = await client.status_page("eu", "team", "webapp", SHA, number)
        found.extend(page.items)
        if not more_pages(page, len(found)):
            break
    await client.aclose()
    assert [p for *_, p in fake.reads] == [1, 2, 3]  # ceil(120 / 50)
    assert [s.description for s in found] == [f"#{i}" for i in reversed(range(120))]
    assert fake.problems == []


@pytest.mark.anyio
async def test_fake_gitea_pages_and_sorts_as_gitea_does() -> None:
    fake = seeded(70)
    fake.repos = {("team", "webapp")}
    transport, _ = gitea_transport({"gitea.example.com": fake})
    base = "https://gitea.example.com/api/v1/repos/team/webapp"
    auth = {"Authorization": f"token {fake.token}"}
    async with httpx.AsyncClient(transport=transport) as http:
        default = await http.get(f"{base}/statuses/{SHA}", headers=auth)
        assert len(default.json()) == 30 and default.headers["x-total-count"] == "70"
        capped = await http.get(f"{base}/statuses/{SHA}", headers=auth, params={"limit": 500})
        assert len(capped.json()) == 50
        last = await http.get(f"{base}/statuses/{SHA}", headers=auth,
                              params={"limit": 50, "page": 2, "sort": "leastindex"})
        assert [s["description"] for s in last.json()] == [f"#{i}" for i in reversed(range(20))]
        ascending = await http.get(f"{base}/commits/{SHA}/statuses", headers=auth,
                                   params={"sort": "highestindex", "limit": 2})
        assert [s["description"] for s in ascending.json()] == ["#0", "#1"]
        assert "index" not in ascending.json()[0]  # not part of Gitea's JSON
        unknown = await http.get(f"https://gitea.example.com/api/v1/repos/team/other/statuses/"
                                 f"{SHA}", headers=auth)
        assert unknown.status_code == 404
    assert fake.problems == []


@pytest.mark.anyio
async def test_unknown_repository_is_a_final_404() -> None:
    fake = FakeGitea(repos={("team", "webapp")})
    client, _ = client_for(fake, url="https://gitea.example.com")
    with pytest.raises(GiteaError) as info:
        await client.status_page("eu", "team", "gone", SHA)
    await client.aclose()
    assert info.value.status == 404 and not info.value.retryable


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("failure, status, retryable", [
    (500, 500, True), (502, 502, True), (503, 503, True), (429, 429, True),
    (501, 501, False), (400, 400, False), (403, 403, False), (404, 404, False),
    (422, 422, False),
    (httpx.ConnectError("refused"), 0, True),
    (httpx.ReadTimeout("slow"), 0, True),
    (httpx.RemoteProtocolError("reset"), 0, True),
])
async def test_errors_are_classified(failure: int | Exception, status: int,
                                     retryable: bool) -> None:
    fake = FakeGitea(prefix="/sub/api/v1", fail=[failure])
    client, _ = client_for(fake)
    with pytest.raises(GiteaError) as info:
        await client.post_status("eu", "team", "webapp", SHA, OPTION)
    await client.aclose()
    assert (info.value.status, info.value.retryable) == (status, retryable)
    assert fake.token not in str(info.value)


@pytest.mark.anyio
async def test_retry_after_is_read() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "7"}, json={"message": "slow down"})

    async def read_token(source: SecretSource, fresh: bool) -> str:
        return "t"

    client = GiteaClient([instance()], read_token,
                         transport=httpx.MockTransport(handler))
    with pytest.raises(GiteaError) as info:
        await client.status_page("eu", "o", "r", SHA)
    await client.aclose()
    assert info.value.retry_after == 7.0 and info.value.retryable
    assert "slow down" in str(info.value)


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("100000") == 300.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None
    assert retryable_status(429) and retryable_status(599) and not retryable_status(404)
    assert not retryable_status(501) and not retryable_status(409)
    assert retryable_status(409, after_reread=True)  # the cluster's conditional patch


@pytest.mark.anyio
async def test_401_rereads_a_rotated_token_once() -> None:
    fake = FakeGitea(prefix="/sub/api/v1", token="new-token")
    client, reads = client_for(fake, tokens=["old-token", "new-token"])
    await client.post_status("eu", "team", "webapp", SHA, OPTION)
    await client.post_status("eu", "team", "webapp", SHA, OPTION)
    await client.aclose()
    assert reads == [False, True]  # cached after the fresh read
    assert len(fake.posts) == 2


@pytest.mark.anyio
async def test_401_with_the_same_token_is_final() -> None:
    fake = FakeGitea(prefix="/sub/api/v1", token="right")
    client, reads = client_for(fake, tokens=["wrong"])
    with pytest.raises(GiteaError) as info:
        await client.post_status("eu", "team", "webapp", SHA, OPTION)
    await client.aclose()
    assert info.value.status == 401 and not info.value.retryable
    assert reads == [False, True]


@pytest.mark.anyio
async def test_unreadable_token_is_retryable_and_unknown_instance_is_not() -> None:
    async def broken(source: SecretSource, fresh: bool) -> str:
        raise FileNotFoundError("/var/run/secrets/token")

    client = GiteaClient([instance()], broken, transport=httpx.MockTransport(
        lambda r: httpx.Response(201, json={})))
    with pytest.raises(GiteaError) as info:
        await client.post_status("eu", "o", "r", SHA, OPTION)
    assert info.value.retryable
    with pytest.raises(GiteaError) as info:
        await client.post_status("nope", "o", "r", SHA, OPTION)
    assert not info.value.retryable
    await client.aclose()


@pytest.mark.anyio
async def test_ca_bundle_builds_a_verifying_client() -> None:
    async def read_token(source: SecretSource, fresh: bool) -> str:
        return "t"

    client = GiteaClient([instance(ca_bundle=Path(certifi.where()))], read_token)
    await client.aclose()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["pending", "success", "error", "failure", "warning", "skipped"]),
       st.text(max_size=200), st.text(max_size=80), st.text(min_size=1, max_size=80))
def test_any_status_body_matches_the_spec(state: str, description: str, url: str,
                                          context: str) -> None:
    body = CreateStatusOption(state, url, description, context).as_json()
    req = request("POST", f"/api/v1/repos/o/r/statuses/{SHA}", body)
    assert SwaggerValidator().problems(req) == []


# -- pull-request comments ------------------------------------------------------------------


@pytest.mark.anyio
async def test_comments_are_listed_created_edited_and_deleted_as_gitea_keeps_them() -> None:
    fake = FakeGitea(prefix="/sub/api/v1")
    fake.add_pull("team", "webapp", 7)
    fake.add_comment("team", "webapp", 7, "LGTM", "alice")
    client, _ = client_for(fake)
    assert await client.current_login("eu") == fake.login
    made = await client.create_comment("eu", "team", "webapp", 7, "<!-- m -->\nfirst")
    assert made is not None and made.login == fake.login
    await client.edit_comment("eu", "team", "webapp", made.id, "<!-- m -->\nsecond")
    listed = await client.list_comments("eu", "team", "webapp", 7)
    assert [(c.login, c.body) for c in listed] == [("alice", "LGTM"),
                                                    (fake.login, "<!-- m -->\nsecond")]
    await client.delete_comment("eu", "team", "webapp", made.id)
    await client.delete_comment("eu", "team", "webapp", made.id)  # gone already: fine
    assert [c.body for c in await client.list_comments("eu", "team", "webapp", 7)] == ["LGTM"]
    # Someone else's comment is not ours to edit: Gitea says 403, a final error.
    with pytest.raises(GiteaError) as refused:
        await client.edit_comment("eu", "team", "webapp", listed[0].id, "hijacked")
    assert refused.value.status == 403 and not refused.value.retryable
    with pytest.raises(GiteaError) as missing:
        await client.list_comments("eu", "team", "webapp", 99)
    assert missing.value.status == 404
    assert fake.problems == []
    await client.aclose()


@pytest.mark.anyio
async def test_a_merge_commit_names_its_pull_request_and_other_commits_none() -> None:
    fake = FakeGitea(prefix="/sub/api/v1")
    fake.add_pull("team", "webapp", 3, merged=True, merge_commit_sha=SHA, merged_at=1.8e9)
    fake.add_pull("team", "webapp", 4)
    client, _ = client_for(fake)
    merged = await client.merged_pull("eu", "team", "webapp", SHA)
    assert merged is not None
    assert (merged.number, merged.merged, merged.merge_commit_sha, merged.merged_at) == (
        3, True, SHA, 1.8e9)
    assert await client.merged_pull("eu", "team", "webapp", "f" * 40) is None
    fake.fail.append(503)
    with pytest.raises(GiteaError) as down:
        await client.merged_pull("eu", "team", "webapp", SHA)
    assert down.value.retryable
    assert fake.problems == []
    await client.aclose()
