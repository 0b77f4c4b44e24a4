"""Gitea pull request, branch and tag events routed to flux-operator's input providers: the
pure rule (which events change which provider's inputs), and the service over HTTP (what ends
up annotated on the objects)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from receiver import signatures as sig
from receiver.flux.objects import INPUT_PROVIDER_KIND, RECONCILE_ANNOTATION, FluxObject, ObjectKey
from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import PayloadError
from receiver.gitea.ref_payloads import RefEvent, parse_gitea_pull_request, parse_gitea_ref_event
from receiver.push import input_providers as ip
from receiver.push.package_routing import plan_selection
from receiver.push.selector import GITEA_PULL_REQUEST, GITEA_REF, select_payload
from receiver.web.app import url_normaliser
from tests.conftest import FLEET, GITEA_TOKEN, Bridge, make_settings
from tests.gitea_payloads import (
    gitea_bytes,
    pull_request,
    push,
    ref_created,
    ref_deleted,
    sha_for,
)

API = "fluxcd.controlplane.io/v1"
REPO = "https://gitea.example.com/platform/fleet"


def provider(name: str, kind: str = ip.PULL_REQUEST_TYPE, url: str = REPO,
             filter_: dict[str, Any] | None = None, skip: list[str] | None = None,
             annotations: dict[str, str] | None = None,
             namespace: str = "flux-system") -> dict[str, Any]:
    spec: dict[str, Any] = {"type": kind, "url": url}
    if filter_ is not None:
        spec["filter"] = filter_
    if skip is not None:
        spec["skip"] = {"labels": skip}
    meta: dict[str, Any] = {"name": name, "namespace": namespace,
                            "labels": {"previews": "on"}}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": API, "kind": INPUT_PROVIDER_KIND, "metadata": meta, "spec": spec}


def pr_event(**kw: Any) -> Any:
    return parse_gitea_pull_request(pull_request(**kw))


def changes(doc: dict[str, Any], event: Any) -> tuple[bool, str]:
    return ip.changes(FluxObject(doc), event)


# -- the payloads ----------------------------------------------------------------------------


def test_a_pull_request_event_reads_what_a_preview_exports() -> None:
    pr = pr_event(number=12, action="synchronized", head="feat/x", labels=("preview", "bug"))
    assert (pr.action, pr.number, pr.head_ref, pr.base_ref) == ("synchronized", 12, "feat/x",
                                                                "main")
    assert pr.head_sha == sha_for("platform/fleet#12@feat/x")
    assert pr.labels == ("preview", "bug")
    assert "https://gitea.example.com/platform/fleet.git" in pr.repo_urls


@pytest.mark.parametrize(("mutate", "why"), [
    (lambda d: d.pop("number") and d["pull_request"].pop("number"), "no number"),
    (lambda d: d["pull_request"]["head"].update(sha="abc"), "head.sha"),
    (lambda d: d["pull_request"]["head"].update(ref=""), "head.ref"),
    (lambda d: d.update(action=""), "no action"),
    (lambda d: d["repository"].clear(), "clone_url"),
    (lambda d: d["pull_request"].update(labels=[{"name": "x"}] * 300), "more than"),
])
def test_a_garbled_pull_request_event_is_refused_with_what(mutate: Any, why: str) -> None:
    doc = pull_request()
    mutate(doc)
    with pytest.raises(PayloadError, match=why):
        parse_gitea_pull_request(doc)


def test_create_and_delete_events_name_a_branch_or_tag() -> None:
    created = parse_gitea_ref_event(ref_created("platform/fleet", "v1.2.0", "tag", "a" * 40))
    assert (created.event, created.ref_type, created.name, created.sha) == (
        "create", "tag", "v1.2.0", "a" * 40)
    deleted = parse_gitea_ref_event(ref_deleted("platform/fleet", "feature", "branch"))
    assert deleted.deleted and deleted.label == "branch feature deleted"
    with pytest.raises(PayloadError, match="ref_type"):
        parse_gitea_ref_event(ref_deleted("platform/fleet", "x", "commit"))


def test_the_selector_tells_these_events_by_their_body() -> None:
    assert select_payload("github", gitea_bytes(pull_request())).shape == GITEA_PULL_REQUEST
    assert select_payload("github", gitea_bytes(
        ref_created("platform/fleet", "b", "branch", "b" * 40))).shape == GITEA_REF
    # A comment on a pull request carries the pull request too: not a pull request event.
    comment = {**pull_request(action="edited"), "comment": {"id": 1}, "is_pull": True}
    comment.pop("number")
    assert select_payload("github", gitea_bytes(comment)).pull_request is None


# -- the rule --------------------------------------------------------------------------------


def test_opening_a_pull_request_changes_a_provider_whose_filters_it_passes() -> None:
    doc = provider("previews", filter_={"labels": ["preview"], "includeBranch": "^feat/"})
    ok, why = changes(doc, pr_event(head="feat/x", labels=("preview",)))
    assert ok and "feat/x" in why and "preview" in why
    ok, why = changes(doc, pr_event(head="feat/x"))
    assert not ok and why.endswith("lacks label preview of its filter.labels")
    ok, why = changes(doc, pr_event(head="fix/x", labels=("preview",)))
    assert not ok and why == "fix/x does not match its includeBranch '^feat/'"


def test_exclude_branch_drops_the_pull_requests_it_matches() -> None:
    doc = provider("previews", filter_={"excludeBranch": "^renovate/"})
    assert not changes(doc, pr_event(head="renovate/lib"))[0]
    assert changes(doc, pr_event(head="feature"))[0]


def test_actions_that_change_nothing_exported_are_not_routed() -> None:
    doc = provider("previews")
    for action in ("assigned", "milestoned", "review_requested", "reviewed"):
        ok, why = changes(doc, pr_event(action=action))
        assert not ok and action in why


def test_a_label_change_or_close_is_routed_whatever_the_labels_now() -> None:
    # The pull request may have been listed under a label it just lost.
    doc = provider("previews", filter_={"labels": ["preview"]})
    for action in ("label_updated", "label_cleared", "closed"):
        assert changes(doc, pr_event(action=action))[0], action
    # ... but not when its head branch is filtered out: it was never listed.
    doc = provider("previews", filter_={"includeBranch": "^feat/"})
    assert not changes(doc, pr_event(action="closed", head="main-fix"))[0]


def test_skip_labels_keep_a_pull_requests_inputs_as_they_were() -> None:
    doc = provider("previews", skip=["deploy/hold", "!deploy/ok"])
    ok, why = changes(doc, pr_event(action="synchronized", labels=("deploy/ok", "deploy/hold")))
    assert not ok and "'deploy/hold'" in why
    ok, why = changes(doc, pr_event(action="synchronized", labels=()))
    assert not ok and "'!deploy/ok'" in why
    assert changes(doc, pr_event(action="synchronized", labels=("deploy/ok",)))[0]
    # A label change may lift the hold: routed.
    assert changes(doc, pr_event(action="label_updated", labels=("deploy/hold",)))[0]


def test_the_last_include_pattern_set_is_the_one_applied() -> None:
    # flux-operator lets includeTag replace includeBranch, whatever the type.
    doc = provider("previews", filter_={"includeBranch": "^feat/", "includeTag": "^x"})
    ok, why = changes(doc, pr_event(head="xfeature"))
    assert ok and "includeTag" in why
    assert not changes(doc, pr_event(head="feat/a"))[0]


def test_an_invalid_pattern_routes_nothing_and_says_so() -> None:
    ok, why = changes(provider("p", filter_={"includeBranch": "(?=x)"}), pr_event())
    assert not ok and "not a valid Go regexp" in why


def test_a_paused_provider_or_another_type_is_not_routed() -> None:
    paused = provider("p", annotations={ip.RECONCILE_SWITCH: "Disabled"})
    assert changes(paused, pr_event()) == (False, f"paused ({ip.RECONCILE_SWITCH}: disabled)")
    ok, why = changes(provider("p", kind="GitHubPullRequest"), pr_event())
    assert not ok and "GitHubPullRequest" in why
    ok, why = changes(provider("p", kind=ip.BRANCH_TYPE), pr_event())
    assert not ok and "does not list pull requests" in why


def test_branches_and_tags_change_their_providers() -> None:
    created = parse_gitea_ref_event(ref_created("platform/fleet", "env/eu", "branch", "c" * 40))
    deleted = parse_gitea_ref_event(ref_deleted("platform/fleet", "env/eu", "branch"))
    branches = provider("envs", kind=ip.BRANCH_TYPE, filter_={"includeBranch": "^env/"})
    assert changes(branches, created)[0] and changes(branches, deleted)[0]
    assert not changes(provider("t", kind=ip.TAG_TYPE), created)[0]
    assert not changes(provider("p"), created)[0]  # pull requests come with their own event
    tags = provider("rel", kind=ip.TAG_TYPE, filter_={"semver": ">=1.0.0 <2.0.0"})
    v1 = parse_gitea_ref_event(ref_created("platform/fleet", "v1.4.0", "tag", "d" * 40))
    v2 = parse_gitea_ref_event(ref_created("platform/fleet", "v2.0.0", "tag", "e" * 40))
    assert changes(tags, v1)[0]
    ok, why = changes(tags, v2)
    assert not ok and why == "tag v2.0.0 is outside its filter.semver >=1.0.0 <2.0.0"


NAMES = st.text("abfx/-.", min_size=1, max_size=8)
LABELS = st.lists(st.sampled_from(["a", "b", "c", "hold"]), unique=True, max_size=4)


@given(head=NAMES, include=st.none() | NAMES, exclude=st.none() | NAMES, wanted=LABELS,
       have=LABELS, action=st.sampled_from(sorted(ip.CHANGING_ACTIONS | {"assigned"})))
def test_routing_agrees_with_flux_operators_listing(
    head: str, include: str | None, exclude: str | None, wanted: list[str], have: list[str],
    action: str,
) -> None:
    """Literal prefixes as patterns, so Python's `re` is a fair model of Go's here."""
    filter_: dict[str, Any] = {"labels": wanted}
    if include:
        filter_["includeBranch"] = "^" + re.escape(include)
    if exclude:
        filter_["excludeBranch"] = "^" + re.escape(exclude)
    doc = provider("p", filter_=filter_, skip=["hold"])
    listed_branch = (not include or head.startswith(include)) and not (
        exclude and head.startswith(exclude))
    listed = listed_branch and set(wanted) <= set(have)
    if action not in ip.CHANGING_ACTIONS:
        expected = False
    elif action in ip.LEAVING_ACTIONS:
        expected = listed_branch
    else:
        expected = listed and "hold" not in have
    ok, why = changes(doc, pr_event(head=head, labels=tuple(have), action=action))
    assert ok is expected, why


@given(name=NAMES, include=st.none() | NAMES, exclude=st.none() | NAMES,
       ref_type=st.sampled_from(["branch", "tag"]),
       event=st.sampled_from(["create", "delete", "push"]),
       kind=st.sampled_from([ip.BRANCH_TYPE, ip.TAG_TYPE]))
def test_a_branch_or_tag_changes_exactly_the_providers_that_list_it(
    name: str, include: str | None, exclude: str | None, ref_type: str, event: str, kind: str,
) -> None:
    field = "Branch" if kind == ip.BRANCH_TYPE else "Tag"
    filter_: dict[str, Any] = {}
    if include:
        filter_[f"include{field}"] = "^" + re.escape(include)
    if exclude:
        filter_[f"exclude{field}"] = "^" + re.escape(exclude)
    doc = provider("p", kind=kind, filter_=filter_)
    sha = "" if event == "delete" else "c" * 40
    ev = RefEvent(event, ref_type, name, sha, (REPO,), "platform/fleet")
    lists = (ref_type == ("branch" if kind == ip.BRANCH_TYPE else "tag")
             and (not include or name.startswith(include))
             and not (exclude and name.startswith(exclude)))
    ok, why = changes(doc, ev)
    assert ok is lists, why


# -- plans -----------------------------------------------------------------------------------


def _store(*docs: dict[str, Any]) -> ObjectStore:
    store = ObjectStore(url_normaliser(make_settings()))
    for doc in docs:
        store.upsert(doc)
    return store


def _receiver(*resources: dict[str, Any]) -> FluxObject:
    return FluxObject({"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
                       "metadata": {"name": "previews", "namespace": "flux-system"},
                       "spec": {"type": "github", "resources": list(resources)}})


def _entry(name: str = "*") -> dict[str, Any]:
    entry: dict[str, Any] = {"apiVersion": API, "kind": INPUT_PROVIDER_KIND, "name": name}
    if name == "*":
        entry["matchLabels"] = {"previews": "on"}
    return entry


def test_a_plan_names_the_providers_of_the_repository_with_host_aliases() -> None:
    store = _store(
        provider("fleet"),
        # The in-cluster address of the same Gitea (a configured host alias).
        provider("fleet-internal",
                 url="http://gitea-http.gitea.svc.cluster.local:3000/platform/fleet"),
        provider("other", url="https://gitea.example.com/platform/other"),
        provider("branches", kind=ip.BRANCH_TYPE),
    )
    selection = select_payload("github", gitea_bytes(pull_request()))
    plan = plan_selection(_receiver(_entry()), selection, store)
    assert [t.name for t in plan.targets] == ["fleet", "fleet-internal"]
    reasons = {t.name: t.reason for t in plan.skipped}
    assert reasons == {"other": "its spec.url is not repository platform/fleet",
                       "branches": "a GiteaBranch provider does not list pull requests"}
    assert plan.tracked == ()


def test_a_push_reaches_branch_providers_after_its_own_targets() -> None:
    git = {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
           "metadata": {"name": "fleet", "namespace": "flux-system"},
           "spec": {"url": REPO + ".git", "ref": {"branch": "main"}}}
    store = _store(git, provider("branches", kind=ip.BRANCH_TYPE), provider("prs"))
    receiver = _receiver({"kind": "GitRepository", "name": "fleet"}, _entry())
    plan = plan_selection(receiver, select_payload("github", gitea_bytes(push())), store)
    assert [(t.kind, t.name) for t in plan.targets] == [
        ("GitRepository", "fleet"), (INPUT_PROVIDER_KIND, "branches")]
    assert {t.name: t.reason for t in plan.skipped}["prs"].startswith(
        "a GiteaPullRequest provider changes with pull_request events")
    # An input provider entry without its apiVersion is refused, as Flux refuses it.
    bare = plan_selection(_receiver({"kind": INPUT_PROVIDER_KIND, "name": "prs"}),
                          select_payload("github", gitea_bytes(pull_request())), store)
    assert not bare.targets and "apiVersion must be specified" in bare.skipped[0].reason


# -- the service -----------------------------------------------------------------------------

GITEA_PATH = "/hook/" + sig.hook_digest(GITEA_TOKEN, "gitea", "flux-system")


async def _bridge(bridge_factory: Any, tmp_path: Path, events: list[str] | None = None,
                  settings: Any = None) -> Bridge:
    for item in FLEET.iterdir():
        if item.suffix == ".yaml":
            shutil.copy(item, tmp_path / item.name)
    docs = [d for d in yaml.safe_load_all((FLEET / "receivers.yaml").read_text()) if d]
    for doc in docs:
        if doc["kind"] == "Receiver" and doc["metadata"]["name"] == "gitea":
            doc["spec"]["resources"].append(_entry())
            if events is not None:
                doc["spec"]["events"] = events
    docs += [provider("previews", filter_={"labels": ["preview"]}),
             provider("envs", kind=ip.BRANCH_TYPE, filter_={"includeBranch": "^env/"})]
    (tmp_path / "receivers.yaml").write_text(yaml.safe_dump_all(docs))
    bridge: Bridge = await bridge_factory(settings, directory=tmp_path)
    return bridge


async def _post(bridge: Bridge, event: str, doc: Any, delivery: str = "") -> Any:
    body = gitea_bytes(doc)
    headers = {"Content-Type": "application/json", "X-GitHub-Event": event,
               "X-Gitea-Event": event, "X-Gitea-Signature": sig.hmac_hex(
                   "sha256", GITEA_TOKEN, body)}
    if delivery:
        headers["X-Gitea-Delivery"] = delivery
    return await bridge.client.post(GITEA_PATH, content=body, headers=headers)


def _requested(bridge: Bridge, name: str) -> str:
    obj = bridge.cluster.store.get(ObjectKey(INPUT_PROVIDER_KIND, "flux-system", name))
    assert obj is not None
    return obj.annotations.get(RECONCILE_ANNOTATION, "")


def _patched(bridge: Bridge, name: str) -> int:
    return sum(1 for p in bridge.cluster.patches
               if p[0] == ObjectKey(INPUT_PROVIDER_KIND, "flux-system", name))


@pytest.mark.anyio
async def test_opening_a_pull_request_annotates_its_provider_only(
    bridge_factory: Any, tmp_path: Path,
) -> None:
    bridge = await _bridge(bridge_factory, tmp_path)
    r = await _post(bridge, "pull_request", pull_request(labels=("preview",)), "d-1")
    assert r.status_code == 202, r.text
    assert [t["name"] for t in r.json()["targets"]] == ["previews"]
    assert r.json()["ref"] == "refs/pull/7/head"
    await _until_requested(bridge, "previews")
    assert _requested(bridge, "envs") == ""
    assert _patched(bridge, "envs") == 0
    # Gitea redelivers it: nothing annotated again.
    before = _patched(bridge, "previews")
    again = await _post(bridge, "pull_request", pull_request(labels=("preview",)), "d-1")
    assert again.json()["status"] == "duplicate"
    assert _patched(bridge, "previews") == before
    # Without the label the provider would not list it: nothing is annotated.
    r = await _post(bridge, "pull_request", pull_request(number=8), "d-2")
    assert r.status_code == 202 and r.json()["targets"] == []
    assert _patched(bridge, "previews") == before


async def _until_requested(bridge: Bridge, name: str) -> str:
    from tests.conftest import until
    value: str = await until(lambda: _requested(bridge, name), what=f"{name} annotated")
    return value


@pytest.mark.anyio
async def test_a_branch_created_or_pushed_annotates_the_branch_provider(
    bridge_factory: Any, tmp_path: Path,
) -> None:
    bridge = await _bridge(bridge_factory, tmp_path)
    r = await _post(bridge, "create", ref_created("platform/fleet", "env/eu", "branch", "f" * 40))
    assert r.status_code == 202, r.text
    assert [t["name"] for t in r.json()["targets"]] == ["envs"]
    first = await _until_requested(bridge, "envs")
    r = await _post(bridge, "push", push(ref="refs/heads/env/eu"))
    assert "envs" in [t["name"] for t in r.json()["targets"]]
    from tests.conftest import until
    await until(lambda: _requested(bridge, "envs") != first, what="envs annotated again")
    assert _requested(bridge, "previews") == ""


@pytest.mark.anyio
async def test_spec_events_still_refuses_what_it_does_not_name(
    bridge_factory: Any, tmp_path: Path,
) -> None:
    bridge = await _bridge(bridge_factory, tmp_path, events=["push"])
    r = await _post(bridge, "pull_request", pull_request(labels=("preview",)))
    assert r.status_code == 400 and "spec.events" in r.text
    assert _patched(bridge, "previews") == 0


def test_plan_gives_the_same_reasons_and_applies_both_filters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from receiver.cli import main

    receiver = {"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
                "metadata": {"name": "previews", "namespace": "flux-system"},
                "spec": {"type": "github", "secretRef": {"name": "t"},
                         "resourceFilter": "res.metadata.name != 'blocked'",
                         "resources": [
                             _entry("fleet"), _entry("blocked"),
                             {**_entry("labelled"),
                              "filter": "req.pull_request.head.ref == 'feature'"}]}}
    docs = [receiver, provider("fleet"), provider("blocked"), provider("labelled")]
    (tmp_path / "m.yaml").write_text(yaml.safe_dump_all(docs))
    payload = tmp_path / "pr.json"
    payload.write_bytes(gitea_bytes(pull_request(head="other")))
    code = main(["plan", "--manifests", str(tmp_path), "--payload", str(payload)])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0, plan
    assert [t["name"] for t in plan["targets"]] == ["fleet"]
    assert {t["name"]: t["reason"] for t in plan["skipped"]} == {
        "blocked": "resourceFilter is false",
        "labelled": "its spec.resources[].filter is false"}
    assert plan["targets"][0]["reason"].startswith(
        "repository platform/fleet, pull request #7 (opened): head branch other")


def _handled(bridge: Bridge, name: str) -> None:
    """Play flux-operator: the provider handled the request and is Ready."""
    obj = bridge.cluster.store.get(ObjectKey(INPUT_PROVIDER_KIND, "flux-system", name))
    assert obj is not None
    raw = json.loads(json.dumps(obj.raw))
    raw["status"] = {"lastHandledReconcileAt": obj.annotations[RECONCILE_ANNOTATION],
                     "conditions": [{"type": "Ready", "status": "True", "reason":
                                     "ReconciliationSucceeded", "message": "1 input"}]}
    bridge.cluster.apply(raw)


@pytest.mark.anyio
async def test_deliveries_settle_once_flux_operator_handled_the_request(
    bridge_factory: Any, tmp_path: Path,
) -> None:
    from tests.conftest import settled_delivery

    # A long grace for consumers: a provider is not one (nothing but the request starts it).
    settings = make_settings(reconcile={"coalesce_window_seconds": 0.2,
                                        "source_timeout_seconds": 30,
                                        "consumer_grace_seconds": 60})
    bridge = await _bridge(bridge_factory, tmp_path, settings=settings)
    r = await _post(bridge, "pull_request", pull_request(labels=("preview",)))
    await _until_requested(bridge, "previews")
    view = (await bridge.client.get(f"/deliveries/{r.json()['delivery']}", headers={
        "Authorization": f"Bearer {GITEA_TOKEN}"})).json()
    assert view["outcome"] == "in_progress", view
    _handled(bridge, "previews")
    view = await settled_delivery(bridge, r.json()["delivery"], GITEA_TOKEN)
    assert view["outcome"] == "ready", view
    assert [(t["name"], t["state"]) for t in view["targets"]] == [("previews", "ready")]
    # A push to a branch: the provider is annotated at once (no consumer grace), and the
    # delivery does not wait for a commit its status will never name.
    r = await _post(bridge, "push", push(ref="refs/heads/env/eu"))
    await _until_requested(bridge, "envs")
    view = await settled_delivery(bridge, r.json()["delivery"], GITEA_TOKEN)
    assert view["outcome"] == "ready", view
    assert [(t["name"], t["state"]) for t in view["targets"]] == [("envs", "skipped")], view
