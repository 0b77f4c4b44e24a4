"""The pull-request comment core: what a preview comment says, how it is found again, and the
plan that makes Gitea show exactly one, whatever order things happen in. Pure."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from receiver.flux.objects import FluxObject
from receiver.gitea.ref_payloads import parse_gitea_pull_request
from receiver.giturls import normalise_repo_url
from receiver.status import pr_comments as pc
from receiver.status.previews import (
    PreviewItem,
    pending_for_pull_request,
    preview_item,
    preview_status,
    preview_url,
    pull_of,
)
from receiver.templates import StatusTemplates

CLUSTER = "eu-west"
WEB = "https://gitea.example.com/team/webapp"
HEAD = "a" * 40
OLD = "b" * 40
TEMPLATES = StatusTemplates(CLUSTER)
STATES = ("success", "pending", "failure", "error")


def normalise(url: str) -> str | None:
    return normalise_repo_url(url, {})


names = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
hostile = st.text(alphabet=st.sampled_from(list("ab |`*_[]<>\n-!\\")), max_size=30)
items = st.builds(
    PreviewItem, kind=st.sampled_from(["GitRepository", "Kustomization", "HelmRelease"]),
    namespace=names, name=names, state=st.sampled_from(STATES), detail=hostile,
    commit=st.sampled_from([HEAD, OLD, None]),
    preview_url=st.sampled_from(["", "https://pr-7.preview.example.com"]),
    context=st.sampled_from(["", "flux/eu-west/kustomization/apps/pr-7"]))


def _rows(body: str) -> list[str]:
    return [line for line in body.splitlines()
            if line.startswith("| ") and line != "| --- | --- | --- | --- |"]


@given(st.lists(items, min_size=1, max_size=8, unique_by=lambda i: (i.kind, i.namespace,
                                                                    i.name)),
       st.randoms())
def test_the_comment_lists_every_object_once_in_a_stable_order(listed: list[PreviewItem],
                                                               rng: Any) -> None:
    body = pc.render_preview(CLUSTER, 7, listed, WEB)
    shuffled = list(listed)
    rng.shuffle(shuffled)
    assert pc.render_preview(CLUSTER, 7, shuffled, WEB) == body  # no churn from order
    assert body.startswith(pc.marker(pc.PREVIEW, CLUSTER) + "\n")
    rows = _rows(body)[1:]  # after the header row
    assert len(rows) == len(listed)
    for row in rows:  # a hostile detail never adds a column or a line
        assert len(re.findall(r"(?<!\\)\|", row)) == 5
    worst = max(listed, key=lambda i: ["success", "pending", "error", "failure"].index(i.state))
    assert body.splitlines()[1].endswith(f": {worst.state}")


def test_a_failing_preview_shows_failure_and_its_reason() -> None:
    listed = [PreviewItem("Kustomization", "apps", "pr-7", "failure",
                          "Health check failed: deployment/web not ready", HEAD,
                          "https://pr-7.preview.example.com",
                          "flux/eu-west/kustomization/apps/pr-7")]
    body = pc.render_preview(CLUSTER, 7, listed, WEB)
    assert "Preview of #7 on cluster `eu-west`: failure" in body
    assert "failure: Health check failed: deployment/web not ready" in body
    assert "Preview: <https://pr-7.preview.example.com>" in body
    assert f"[`{HEAD[:12]}`]({WEB}/commit/{HEAD})" in body
    assert f"[`flux/eu-west/kustomization/apps/pr-7`]({WEB}/commit/{HEAD})" in body


@given(st.text(max_size=20))
def test_no_cluster_name_ends_the_marker_early(cluster: str) -> None:
    mark = pc.marker(pc.PREVIEW, cluster)
    assert mark.count("-->") == 1 and mark.endswith("-->")
    assert "\n" not in mark


def test_only_our_users_comments_count_and_the_oldest_wins() -> None:
    mark = pc.marker(pc.PREVIEW, CLUSTER)
    comments = [pc.Posted(5, f"quoting {mark}", "alice"), pc.Posted(9, mark + " b", "bridge"),
                pc.Posted(7, mark + " a", "bridge"), pc.Posted(8, "unrelated", "bridge"),
                pc.Posted(10, pc.marker(pc.PREVIEW, "us-east"), "bridge")]
    found = pc.find(comments, mark, "bridge")
    assert found.comment is not None and found.comment.id == 7
    assert found.duplicates == (9,)


def test_no_comment_is_created_to_say_a_preview_is_gone() -> None:
    assert pc.wanted_preview(CLUSTER, 7, [], None, WEB) is None
    shown = pc.Posted(1, "x", "bridge")
    torn = pc.wanted_preview(CLUSTER, 7, [], shown, WEB)
    assert torn is not None and pc.is_torn_down(torn)
    assert not pc.is_torn_down(pc.render_preview(CLUSTER, 7, [PreviewItem(
        "Kustomization", "a", "b", "success", "", HEAD)], WEB))


def test_edits_are_coalesced_to_one_per_interval() -> None:
    assert pc.edit_delay(None, 100.0, 10.0) == 0.0
    assert pc.edit_delay(95.0, 100.0, 10.0) == 5.0
    assert pc.edit_delay(80.0, 100.0, 10.0) == 0.0


@given(st.lists(st.builds(pc.DeployedLine, kind=st.sampled_from(["Kustomization",
                                                                 "HelmRelease"]),
                          namespace=names, name=names, sha=st.sampled_from([HEAD, OLD])),
                max_size=6))
def test_a_deployment_comment_keeps_every_line_it_showed(lines: list[pc.DeployedLine]) -> None:
    body = pc.render_deployed(CLUSTER, 3, lines, WEB)
    assert set(pc.parse_deployed(body)) == set(lines)
    first, rest = lines[:1], lines[1:]
    shown = pc.Posted(1, pc.render_deployed(CLUSTER, 3, first, WEB), "bridge")
    assert pc.merge_deployed(shown, CLUSTER, 3, rest, WEB) == body


# -- the plan under any order of events, races and restarts --------------------------------


class OneCommentPerPull(RuleBasedStateMachine):
    """A cluster's preview objects change, replicas sync (some across a Lease handover, from a
    listing read before the other wrote), people comment, replicas restart (they keep
    nothing). After any replica's sync, Gitea shows exactly one comment by the bridge, saying
    what the cluster holds now; people's comments are never touched."""

    def __init__(self) -> None:
        super().__init__()
        self.objects: dict[str, str] = {}  # name -> state
        self.comments: dict[int, pc.Posted] = {}
        self.next_id = 0
        self.people: dict[int, str] = {}
        self.stale: pc.Found | None = None  # a listing a replica read before losing the race
        self.ever_wanted = False
        self.clean = False

    def _post(self, body: str, login: str) -> int:
        self.next_id += 1
        self.comments[self.next_id] = pc.Posted(self.next_id, body, login)
        return self.next_id

    def _items(self) -> list[PreviewItem]:
        return [PreviewItem("Kustomization", "previews", name, state, "", HEAD)
                for name, state in sorted(self.objects.items())]

    def _apply(self, found: pc.Found) -> None:
        wanted = pc.wanted_preview(CLUSTER, 7, self._items(), found.comment, WEB)
        todo = pc.plan(found, wanted)
        if todo.create is not None:
            self._post(todo.create, "bridge")
        if todo.edit is not None and todo.edit[0] in self.comments:
            ident, body = todo.edit
            self.comments[ident] = pc.Posted(ident, body, "bridge")
        for ident in todo.delete:
            self.comments.pop(ident, None)
        self.ever_wanted |= bool(self._items())

    def _list(self) -> pc.Found:
        return pc.find(self.comments.values(), pc.marker(pc.PREVIEW, CLUSTER), "bridge")

    @rule(name=st.sampled_from(["web", "api", "db"]), state=st.sampled_from(STATES))
    def object_changes(self, name: str, state: str) -> None:
        self.objects[name] = state
        self.clean = False

    @rule(name=st.sampled_from(["web", "api", "db"]))
    def object_deleted(self, name: str) -> None:
        self.objects.pop(name, None)
        self.clean = False

    @rule()
    def pull_request_closed(self) -> None:
        self.objects.clear()
        self.clean = False

    @rule(quote=st.booleans())
    def someone_comments(self, quote: bool) -> None:
        body = pc.marker(pc.PREVIEW, CLUSTER) if quote else "LGTM"
        self.people[self._post(body, "alice")] = body

    @rule()
    def replica_syncs(self) -> None:
        self._apply(self._list())
        self.clean = True

    @rule()
    def replica_lists_then_loses_the_lease(self) -> None:
        self.stale = self._list()

    @precondition(lambda self: self.stale is not None)
    @rule()
    def the_old_holder_writes_from_its_stale_listing(self) -> None:
        assert self.stale is not None
        self._apply(self.stale)
        self.stale = None
        self.clean = False

    @rule()
    def replica_restarts(self) -> None:
        self.stale = None  # whatever it read is gone; nothing else was kept

    @invariant()
    def peoples_comments_are_untouched(self) -> None:
        for ident, body in self.people.items():
            assert self.comments[ident] == pc.Posted(ident, body, "alice")

    @invariant()
    def after_a_sync_exactly_one_comment_says_what_the_cluster_holds(self) -> None:
        if not self.clean:
            return
        found = self._list()
        ours = [c for c in self.comments.values() if c.login == "bridge"]
        if not self.ever_wanted:
            assert ours == []
            return
        assert len(ours) == 1 and found.comment is not None and not found.duplicates
        items = self._items()
        expected = pc.render_preview(CLUSTER, 7, items, WEB) if items else \
            pc.render_torn_down(CLUSTER, 7)
        assert found.comment.body == expected


TestOneCommentPerPull = OneCommentPerPull.TestCase
TestOneCommentPerPull.settings = settings(max_examples=150, stateful_step_count=30,
                                          deadline=None)


# -- preview objects ------------------------------------------------------------------------

SOURCE_URL = "https://gitea.example.com/team/webapp.git"


def git_repository(ready: str = "True", revision: str = f"sha1:{HEAD}", reason: str = "",
                   message: str = "") -> FluxObject:
    return FluxObject({
        "kind": "GitRepository", "metadata": {"name": "pr-7", "namespace": "previews"},
        "spec": {"url": SOURCE_URL, "ref": {"commit": HEAD}},
        "status": {"artifact": {"revision": revision},
                   "conditions": [{"type": "Ready", "status": ready, "reason": reason,
                                   "message": message}]}})


def kustomization(ready: str = "True", revision: str = f"sha1:{HEAD}", reason: str = "",
                  message: str = "", **annotations: str) -> FluxObject:
    notes = {"event.toolkit.fluxcd.io/change_request": "7",
             "event.toolkit.fluxcd.io/commit": HEAD,
             "event.toolkit.fluxcd.io/preview-url": "https://pr-7.preview.example.com",
             **annotations}
    return FluxObject({
        "kind": "Kustomization",
        "metadata": {"name": "pr-7", "namespace": "previews", "annotations": notes},
        "spec": {"sourceRef": {"kind": "GitRepository", "name": "pr-7"}, "path": "./"},
        "status": {"lastAppliedRevision": revision, "lastAttemptedRevision": revision,
                   "conditions": [{"type": "Ready", "status": ready, "reason": reason,
                                   "message": message}]}})


def test_a_preview_ready_at_its_head_commit_is_success_there() -> None:
    item = preview_item(kustomization(reason="ReconciliationSucceeded"), git_repository(),
                        TEMPLATES, normalise)
    assert (item.state, item.commit, item.preview_url) == (
        "success", HEAD, "https://pr-7.preview.example.com")
    assert item.context == "flux/eu-west/kustomization/previews/pr-7"
    pull = pull_of(kustomization(), git_repository(), normalise)
    assert pull is not None and (pull.owner, pull.repo, pull.number) == ("team", "webapp", 7)


def test_a_preview_still_running_the_old_head_is_pending_on_the_new_one() -> None:
    obj, source = kustomization(revision=f"sha1:{OLD}"), git_repository(revision=f"sha1:{OLD}")
    item = preview_item(obj, source, TEMPLATES, normalise)
    assert (item.state, item.commit) == ("pending", HEAD)
    status = preview_status(obj, source, TEMPLATES, normalise)
    assert status is not None and (status.sha, status.state) == (HEAD, "pending")
    # Once it runs the head, the live-state status says it; no second one.
    assert preview_status(kustomization(), git_repository(), TEMPLATES, normalise) is None


def test_a_source_that_cannot_fetch_the_head_fails_the_preview() -> None:
    obj = kustomization(revision=f"sha1:{OLD}")
    source = git_repository("False", f"sha1:{OLD}", "GitOperationFailed",
                            f"failed to checkout commit {HEAD}")
    item = preview_item(obj, source, TEMPLATES, normalise)
    assert item.state == "error" and "GitOperationFailed" not in item.detail
    assert "Source previews/pr-7" in item.detail and "failed to checkout" in item.detail
    status = preview_status(obj, source, TEMPLATES, normalise)
    assert status is not None and (status.sha, status.state) == (HEAD, "error")


def test_a_failing_kustomization_shows_failure_and_the_reason() -> None:
    obj = kustomization("False", reason="HealthCheckFailed",
                        message="timeout waiting for: [Deployment/previews/web status: "
                                "'InProgress']")
    item = preview_item(obj, git_repository(), TEMPLATES, normalise)
    assert item.state == "failure" and "Deployment/previews/web" in item.detail


@given(st.text(max_size=40))
def test_only_plain_http_urls_are_linked(value: str) -> None:
    url = preview_url(value)
    assert url == "" or (url.startswith(("http://", "https://")) and " " not in url
                         and ")" not in url and ">" not in url)
    assert preview_url("javascript:alert(1)") == ""
    assert preview_url(" https://pr-7.example.com ") == "https://pr-7.example.com"


def pull_request_payload(action: str = "synchronized", state: str = "open") -> dict[str, Any]:
    return {"action": action, "number": 7,
            "pull_request": {"number": 7, "state": state, "merged": False,
                             "head": {"sha": HEAD, "ref": "feature"},
                             "base": {"ref": "main"}},
            "repository": {"clone_url": SOURCE_URL, "full_name": "team/webapp"}}


def test_a_pushed_pull_request_names_pending_statuses_for_its_running_previews() -> None:
    event = parse_gitea_pull_request(pull_request_payload())
    assert (event.number, event.head_sha) == (7, HEAD)
    running = kustomization(revision=f"sha1:{OLD}", **{"event.toolkit.fluxcd.io/commit": OLD})
    other = kustomization(**{"event.toolkit.fluxcd.io/change_request": "8"})
    wanted = pending_for_pull_request(event, [(running, git_repository()),
                                              (other, git_repository())], TEMPLATES, normalise)
    assert [(s.sha, s.state, s.context) for s in wanted] == [
        (HEAD, "pending", "flux/eu-west/kustomization/previews/pr-7")]
    closed = parse_gitea_pull_request(pull_request_payload("closed", "closed"))
    assert pending_for_pull_request(closed, [(running, git_repository())], TEMPLATES,
                                    normalise) == []
