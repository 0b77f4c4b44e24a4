"""A Gitea stand-in for the status tests, and a validator of requests against Gitea's swagger.

`SwaggerValidator` checks a request against `fixtures/gitea/swagger.v1.json` (v1.26.3): the
path matches a template under `/api/v1` (after the instance's sub-path), the method exists
there, every query parameter is declared (type and enum checked), and a JSON body matches the
referenced definition (known keys, types, enums). `FakeGitea` keeps commit statuses the way
Gitea does (per repo and commit, an increasing index, the newest per context wins), answers
with the `status` field quirk, lists them as Gitea 1.26 does (the `sort` values with their
real, inverted meaning for the index sorts; `page`; `limit` defaulting to 30 and capped at 50;
`X-Total-Count`), answers 404 for a repository it does not host (when told which it hosts),
and can be told to fail. Requests go through respx, which keeps every call for the validator.

Pull requests (`add_pull`) carry issue comments the way Gitea 1.26 keeps them: listed oldest
first, all at once (the operation takes no paging); created (201), edited (200) and deleted
(204) by id; only their poster (the token's user, `login`) may edit or delete one (403
otherwise); a pull request or comment it does not have is 404. `GET /user` names the token's
user; `GET commits/{sha}/pull` finds the merged pull request whose merge commit `sha` is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import respx

SWAGGER = Path(__file__).parent / "fixtures" / "gitea" / "swagger.v1.json"
_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "boolean": (bool,), "number": (int, float),
    "array": (list,), "object": (dict,),
}


@cache
def load_spec() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(SWAGGER.read_text())
    return data


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    pattern = "".join(f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") else re.escape(p)
                      for p in parts)
    return re.compile(f"^{pattern}$")


class SwaggerValidator:
    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        self.spec = spec or load_spec()
        self._paths = [(t, _template_regex(t), ops) for t, ops in self.spec["paths"].items()]

    def _resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            schema = self.spec["definitions"][name]
        return schema

    def _check_value(self, where: str, value: Any, schema: dict[str, Any]) -> list[str]:
        schema = self._resolve(schema)
        problems: list[str] = []
        kind = schema.get("type", "object")
        allowed = _TYPES.get(kind, (object,))
        if (isinstance(value, bool) and kind != "boolean") or not isinstance(value, allowed):
            return [f"{where}: {value!r} is not {kind}"]
        data: Any = value
        if "enum" in schema and value not in schema["enum"]:
            problems.append(f"{where}: {value!r} not in {schema['enum']}")
        if kind == "object":
            props = schema.get("properties", {})
            for key, item in data.items():
                if key not in props:
                    problems.append(f"{where}.{key}: not in the definition")
                else:
                    problems += self._check_value(f"{where}.{key}", item, props[key])
            problems += [f"{where}.{k}: required" for k in schema.get("required", [])
                         if k not in data]
        if kind == "array" and "items" in schema:
            for i, item in enumerate(data):
                problems += self._check_value(f"{where}[{i}]", item, schema["items"])
        return problems

    def match(self, path: str, method: str) -> tuple[str, dict[str, Any]] | None:
        """The template and operation for a path relative to /api/v1, most literal first."""
        found = []
        for template, regex, ops in self._paths:
            if regex.match(path) and method.lower() in ops:
                found.append((template.count("{"), template, ops[method.lower()]))
        if not found:
            return None
        _, template, op = min(found)
        return template, op

    def problems(self, request: httpx.Request, api_prefix: str = "/api/v1") -> list[str]:
        path = request.url.path
        if not path.startswith(api_prefix + "/"):
            return [f"{path}: not under {api_prefix}"]
        matched = self.match(path[len(api_prefix):], request.method)
        if matched is None:
            return [f"{request.method} {path}: no such operation in the spec"]
        template, op = matched
        where = f"{request.method} {template}"
        problems: list[str] = []
        params = op.get("parameters", [])
        regex = _template_regex(template)
        m = regex.match(path[len(api_prefix):])
        assert m is not None
        for p in params:
            if p["in"] == "path" and not unquote(m.group(p["name"])):
                problems.append(f"{where}: empty path parameter {p['name']}")
        declared = {p["name"]: p for p in params if p["in"] == "query"}
        for name, value in request.url.params.multi_items():
            if name not in declared:
                problems.append(f"{where}: undeclared query parameter {name}")
                continue
            spec = declared[name]
            if spec.get("type") == "integer" and not re.fullmatch(r"-?\d+", value):
                problems.append(f"{where}: query {name}={value!r} is not an integer")
            if "enum" in spec and value not in spec["enum"]:
                problems.append(f"{where}: query {name}={value!r} not in {spec['enum']}")
        body_params = [p for p in params if p["in"] == "body"]
        content = request.content
        if body_params:
            if request.headers.get("content-type", "").split(";")[0] != "application/json":
                problems.append(f"{where}: body is not application/json")
            try:
                body = json.loads(content)
            except ValueError:
                return [*problems, f"{where}: body is not JSON"]
            problems += self._check_value(f"{where} body", body, body_params[0]["schema"])
        elif content:
            problems.append(f"{where}: the operation takes no body")
        if not request.headers.get("authorization", "").startswith("token "):
            problems.append(f"{where}: no `Authorization: token ...` header")
        return problems


# Gitea's [api] DEFAULT_PAGING_NUM and MAX_RESPONSE_ITEMS defaults.
DEFAULT_PAGE_SIZE = 30
MAX_PAGE_SIZE = 50
# models/git/commit_status.go: how each `sort` orders, as (field, descending). Note the index
# sorts: `leastindex` is index DESC (newest first), `highestindex` index ASC.
_SORTS: dict[str, tuple[str, bool]] = {
    "oldest": ("id", False), "recentupdate": ("id", True), "leastupdate": ("id", False),
    "leastindex": ("index", True), "highestindex": ("index", False), "": ("id", True),
}
def _takes_skipped(version: str) -> bool:
    major, minor = (int(part) for part in version.split(".")[:2])
    return (major, minor) >= (1, 25)


def _public(status: dict[str, Any]) -> dict[str, Any]:
    """A stored status as the API shows it: the per-commit index is not part of the JSON."""
    return {k: v for k, v in status.items() if k != "index"}


NOT_FOUND = {"errors": None, "message": "The target couldn't be found.", "url": ""}


def _comment_json(comment: dict[str, Any]) -> dict[str, Any]:
    """A stored comment as swagger `Comment`."""
    owner, repo, number = comment["pull"]
    return {"id": comment["id"], "body": comment["body"], "user": dict(comment["user"]),
            "html_url": f"https://gitea.test/{owner}/{repo}/pulls/{number}"
                        f"#issuecomment-{comment['id']}",
            "created_at": "2026-08-07T13:04:05Z", "updated_at": "2026-08-07T13:04:05Z"}


@dataclass
class FakeGitea:
    """Gitea's commit statuses; `fail` queues failures for the next calls.

    `repos` lists the (owner, name) it hosts; None hosts every repository.
    """

    token: str = "gitea-token"
    prefix: str = "/api/v1"
    statuses: dict[tuple[str, str, str], list[dict[str, Any]]] = field(default_factory=dict)
    fail: list[int | Exception] = field(default_factory=list)
    posts: list[tuple[str, str, str, dict[str, Any]]] = field(default_factory=list)
    gets: int = 0
    reads: list[tuple[str, str, str, int]] = field(default_factory=list)  # (..., page)
    repos: set[tuple[str, str]] | None = None
    validator: SwaggerValidator = field(default_factory=SwaggerValidator)
    problems: list[str] = field(default_factory=list)
    # What GET /version answers (None: 404). Before 1.25 Gitea refuses the `skipped` state (as
    # 1.24 does: 400 with a message); from 1.25 on it takes it.
    version: str | None = "1.26.3"
    version_reads: int = 0
    # Epoch seconds a stored status is stamped with (`created_at`, `updated_at`); None: a
    # fixed time.
    clock: Callable[[], float] | None = None
    # The commit graph the compare API reads: commit -> its parents. A commit missing here is
    # unknown to the repository (compare answers 404).
    parents: dict[str, tuple[str, ...]] = field(default_factory=dict)
    compares: list[tuple[str, str, str, str]] = field(default_factory=list)  # (o, r, base, head)
    # What `doctor` reads: the token's user (GET /user), the repositories whose user may not
    # write (permissions.push false), those it does not administer (hooks answer 403, as
    # Gitea's reqAdmin does), and each repository's webhooks (GET .../hooks).
    login: str = "bridge-bot"
    read_only: set[tuple[str, str]] = field(default_factory=set)
    not_admin: set[tuple[str, str]] = field(default_factory=set)
    hooks: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    org_hooks: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # by organisation
    # The token's scopes (None: all). As Gitea 1.26: reading a repository needs
    # read:repository, posting a status write:repository (403 with Gitea's message
    # otherwise), GET /user read:user, pull-request comments read:issue (list) and
    # write:issue (create, edit, delete); a create-status body that is not JSON is 422.
    scopes: set[str] | None = None
    # (owner, repo, number) -> {"merged": bool, "merge_commit_sha": str, "state": str}
    pulls: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)
    # id -> {"id", "body", "user": {"login"}, "pull": (owner, repo, number)}; ids only grow
    comments: dict[int, dict[str, Any]] = field(default_factory=dict)
    comments_created: int = 0  # every comment the API created, deleted ones included
    comment_edits: int = 0
    comment_deletes: int = 0
    comment_lists: int = 0
    _next_id: int = 0
    _next_comment: int = 0

    _COMPARE = re.compile(r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/compare/"
                          r"(?P<base>[^/.]+)\.\.\.(?P<head>[^/.]+)$")
    _REPO = re.compile(r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)(?P<hooks>/hooks)?$")
    _PATH = re.compile(r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/"
                       r"(?:statuses/(?P<sha>[^/]+)|commits/(?P<ref>[^/]+)/statuses)$")

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.problems += self.validator.problems(request, self.prefix)
        # GET /version (read once at start, concurrently with what a test does) takes none of
        # the injected failures: `version = None` makes it fail.
        if request.url.path.removeprefix(self.prefix) == "/version" and request.method == "GET":
            self.version_reads += 1
            if self.version is None:
                return httpx.Response(404, json=NOT_FOUND)
            return httpx.Response(200, json={"version": self.version})
        if self.fail:
            failure = self.fail.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return httpx.Response(failure, json={"message": "injected failure", "url": ""})
        if request.headers.get("authorization") != f"token {self.token}":
            return httpx.Response(401, json={"message": "token is required", "url": ""})
        path = request.url.path.removeprefix(self.prefix)
        area = "issue" if "/issues/" in path else "repository"
        required = ("read:user" if path == "/user" else
                    f"write:{area}" if request.method != "GET" else f"read:{area}")
        if self.scopes is not None and not ({required, required.replace("read:", "write:")}
                                            & self.scopes):
            return httpx.Response(403, json={"message": (
                "token does not have at least one of required scope(s), required="
                f"[{required}], token scope={','.join(sorted(self.scopes))}"), "url": ""})
        org_hooks = re.fullmatch(r"/orgs/([^/]+)/hooks", path)
        if org_hooks is not None and request.method == "GET":
            found = self.org_hooks.get(unquote(org_hooks[1]))
            return (httpx.Response(404, json=NOT_FOUND) if found is None
                    else httpx.Response(200, json=found))
        if request.method == "GET" and path == "/user":
            return httpx.Response(200, json={"id": 1, "login": self.login})
        answer = self._pull_requests(request, path)
        if answer is not None:
            return answer
        repo_path = self._REPO.match(path)
        if repo_path is not None and request.method == "GET":
            return self._repository(unquote(repo_path["owner"]), unquote(repo_path["repo"]),
                                    bool(repo_path["hooks"]))
        compare = self._COMPARE.match(request.url.path.removeprefix(self.prefix))
        if compare is not None and request.method == "GET":
            return self._compare(unquote(compare["owner"]), unquote(compare["repo"]),
                                 compare["base"], compare["head"])
        m = self._PATH.match(request.url.path.removeprefix(self.prefix))
        if m is None or (m["ref"] is not None and request.method != "GET"):
            return httpx.Response(404, json=NOT_FOUND)
        owner, repo = unquote(m["owner"]), unquote(m["repo"])
        if self.repos is not None and (owner, repo) not in self.repos:
            return httpx.Response(404, json=NOT_FOUND)
        key = (owner, repo, unquote(m["sha"] or m["ref"]))
        if request.method == "GET":
            return self._list(key, request.url.params)
        if (owner, repo) in self.read_only:
            return httpx.Response(403, json={"message": "user should have write access",
                                             "url": ""})
        try:
            body = json.loads(request.content)
        except ValueError:
            return httpx.Response(422, json={"message": "[]: unexpected EOF", "url": ""})
        if body.get("state") == "skipped" and not _takes_skipped(self.version or "1.26"):
            return httpx.Response(400, json={"message": "invalid state: skipped", "url": ""})
        status = self.add(*key, body.get("context", ""), body.get("state", ""),
                          body.get("description", ""), body.get("target_url", ""))
        self.posts.append((*key, body))
        return httpx.Response(201, json=_public(status))

    _ISSUE_COMMENTS = re.compile(r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/issues/"
                                 r"(?P<number>\d+)/comments$")
    _COMMENT = re.compile(r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/issues/comments/"
                          r"(?P<id>\d+)$")
    _COMMIT_PULL = re.compile(r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/commits/"
                              r"(?P<sha>[^/]+)/pull$")

    def _pull_requests(self, request: httpx.Request, path: str) -> httpx.Response | None:
        """Comments and commit-to-pull lookups; None for any other path."""
        method = request.method
        if (m := self._ISSUE_COMMENTS.match(path)) is not None:
            pull = (unquote(m["owner"]), unquote(m["repo"]), int(m["number"]))
            if pull not in self.pulls:
                return httpx.Response(404, json=NOT_FOUND)
            if method == "GET":
                self.comment_lists += 1
                return httpx.Response(200, json=[_comment_json(c) for c in self.pull_comments(
                    *pull)])
            if method == "POST":
                self.comments_created += 1
                body = json.loads(request.content)["body"]
                return httpx.Response(201, json=_comment_json(self.add_comment(*pull, body)))
            return None
        if (m := self._COMMENT.match(path)) is not None:
            comment = self.comments.get(int(m["id"]))
            if comment is None or comment["pull"][:2] != (unquote(m["owner"]),
                                                          unquote(m["repo"])):
                return httpx.Response(404, json=NOT_FOUND)
            if method in ("PATCH", "DELETE") and comment["user"]["login"] != self.login:
                return httpx.Response(403, json={"message": "not the poster", "url": ""})
            if method == "PATCH":
                self.comment_edits += 1
                comment["body"] = json.loads(request.content)["body"]
                return httpx.Response(200, json=_comment_json(comment))
            if method == "DELETE":
                self.comment_deletes += 1
                del self.comments[comment["id"]]
                return httpx.Response(204)
            if method == "GET":
                return httpx.Response(200, json=_comment_json(comment))
            return None
        if (m := self._COMMIT_PULL.match(path)) is not None and method == "GET":
            owner, repo, sha = unquote(m["owner"]), unquote(m["repo"]), unquote(m["sha"])
            for (o, r, number), pull in sorted(self.pulls.items()):
                if (o, r) == (owner, repo) and pull.get("merged") and \
                        pull.get("merge_commit_sha") == sha:
                    return httpx.Response(200, json={
                        "number": number, "merged": True, "merge_commit_sha": sha,
                        "merged_at": pull["merged_at"], "state": "closed"})
            return httpx.Response(404, json=NOT_FOUND)
        return None

    def add_pull(self, owner: str, repo: str, number: int, *, merged: bool = False,
                 merge_commit_sha: str = "", merged_at: float | None = None) -> None:
        """A pull request; a merged one was merged `merged_at` (epoch seconds; default: now)."""
        stamp = datetime.fromtimestamp(
            merged_at if merged_at is not None else datetime.now(UTC).timestamp(), UTC)
        self.pulls[(owner, repo, number)] = {
            "merged": merged, "merge_commit_sha": merge_commit_sha,
            "merged_at": stamp.strftime("%Y-%m-%dT%H:%M:%SZ") if merged else None,
            "state": "closed" if merged else "open"}

    def add_comment(self, owner: str, repo: str, number: int, body: str,
                    login: str | None = None) -> dict[str, Any]:
        """Store a comment as Gitea would (also: a person commenting on the pull request)."""
        self._next_comment += 1
        comment = {"id": self._next_comment, "body": body,
                   "user": {"login": login or self.login}, "pull": (owner, repo, number)}
        self.comments[comment["id"]] = comment
        return comment

    def pull_comments(self, owner: str, repo: str, number: int) -> list[dict[str, Any]]:
        """The pull request's comments, oldest first."""
        return [c for _, c in sorted(self.comments.items())
                if c["pull"] == (owner, repo, number)]

    def _repository(self, owner: str, repo: str, hooks: bool) -> httpx.Response:
        if self.repos is not None and (owner, repo) not in self.repos:
            return httpx.Response(404, json=NOT_FOUND)
        admin = (owner, repo) not in self.not_admin
        if hooks:
            if not admin:
                return httpx.Response(403, json={"message": "Must be an owner or admin",
                                                 "url": ""})
            return httpx.Response(200, json=self.hooks.get((owner, repo), []))
        push = (owner, repo) not in self.read_only
        return httpx.Response(200, json={
            "id": 1, "name": repo, "full_name": f"{owner}/{repo}",
            "owner": {"id": 1, "login": owner},
            "clone_url": f"https://gitea.example.com/{owner}/{repo}.git",
            "html_url": f"https://gitea.example.com/{owner}/{repo}",
            "ssh_url": f"git@gitea.example.com:{owner}/{repo}.git",
            "permissions": {"admin": admin and push, "push": push, "pull": True}})

    def add_hook(self, owner: str, repo: str, url: str, *, active: bool = True,
                 org: bool = False) -> None:
        """A webhook as GET /repos/{owner}/{repo}/hooks lists it (swagger `Hook`); with `org`,
        one of the owner organisation's (GET /orgs/{org}/hooks)."""
        items = (self.org_hooks.setdefault(owner, []) if org
                 else self.hooks.setdefault((owner, repo), []))
        items.append({"id": len(items) + 1, "type": "gitea", "active": active,
                      "events": ["push"], "branch_filter": "*",
                      "config": {"url": url, "content_type": "json"},
                      "created_at": "2026-08-07T13:04:05Z", "updated_at": "2026-08-07T13:04:05Z"})

    def _reachable(self, commit: str) -> set[str]:
        seen: set[str] = set()
        todo = [commit]
        while todo:
            c = todo.pop()
            if c not in seen:
                seen.add(c)
                todo.extend(self.parents.get(c, ()))
        return seen

    def _compare(self, owner: str, repo: str, base: str, head: str) -> httpx.Response:
        """`base...head`: the commits reachable from head and not from base (swagger Compare)."""
        self.compares.append((owner, repo, base, head))
        if base not in self.parents or head not in self.parents:
            return httpx.Response(404, json=NOT_FOUND)
        ahead = sorted(self._reachable(head) - self._reachable(base))
        return httpx.Response(200, json={
            "commits": [{"sha": c, "url": "", "html_url": "", "created": "2026-01-01T00:00:00Z"}
                        for c in ahead],
            "total_commits": len(ahead)})

    def _list(self, key: tuple[str, str, str], params: httpx.QueryParams) -> httpx.Response:
        self.gets += 1
        page = max(int(params.get("page", "0") or 0), 1)
        limit = int(params.get("limit", "0") or 0)
        limit = DEFAULT_PAGE_SIZE if limit <= 0 else min(limit, MAX_PAGE_SIZE)
        self.reads.append((*key, page))
        items = self.statuses.get(key, [])
        if params.get("state"):
            items = [s for s in items if s["status"] == params["state"]]
        by, descending = _SORTS.get(params.get("sort", ""), _SORTS[""])
        ordered = sorted(items, key=lambda s: s[by], reverse=descending)
        shown = [_public(s) for s in ordered[(page - 1) * limit: page * limit]]
        return httpx.Response(200, json=shown, headers={"X-Total-Count": str(len(items))})

    def add(self, owner: str, repo: str, sha: str, context: str, state: str,
            description: str = "", target_url: str = "") -> dict[str, Any]:
        """Store a status as Gitea would (also: someone posting behind the bridge's back)."""
        items = self.statuses.setdefault((owner, repo, sha), [])
        self._next_id += 1
        stamp = "2026-08-07T13:04:05Z" if self.clock is None else datetime.fromtimestamp(
            self.clock(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {
            "id": self._next_id,
            "index": len(items) + 1,
            "status": state,
            "target_url": target_url.strip(),
            "description": description.strip(),
            "context": context.strip(),
            "url": f"https://gitea.test/api/v1/repos/{owner}/{repo}/statuses/{sha}",
            "created_at": stamp,
            "updated_at": stamp,
        }
        items.append(status)
        return status

    def latest(self, owner: str, repo: str, sha: str, context: str) -> dict[str, Any] | None:
        items = [s for s in self.statuses.get((owner, repo, sha), []) if s["context"] == context]
        return max(items, key=lambda s: s["index"]) if items else None

    def contexts(self, owner: str, repo: str, sha: str) -> dict[str, str]:
        """Latest state per context, as Gitea's combined view shows them."""
        out: dict[str, str] = {}
        for s in sorted(self.statuses.get((owner, repo, sha), []), key=lambda s: s["index"]):
            out[s["context"]] = s["status"]
        return out


def gitea_transport(
    fakes: dict[str, FakeGitea] | Iterable[tuple[str, FakeGitea]],
) -> tuple[httpx.MockTransport, respx.Router]:
    """A respx transport routing each host to its fake; the router keeps every call."""
    router = respx.Router(assert_all_called=False)
    for host, fake in dict(fakes).items():
        router.route(host=host).mock(side_effect=fake.handle)
    return httpx.MockTransport(router.handler), router
