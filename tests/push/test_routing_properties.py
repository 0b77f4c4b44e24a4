"""Routing properties over the fleet fixture, for arbitrary pushes (hypothesis)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import ObjectKey
from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import Push
from receiver.giturls import normalise_repo_url
from receiver.push.resources import resolve_resources
from receiver.push.routing import plan_push

FLEET = Path(__file__).parent.parent / "fixtures" / "fleet"
STORE = ObjectStore(lambda url: normalise_repo_url(url, {}))
MemoryCluster.from_directory(STORE, FLEET)
RECEIVERS = [r for r in STORE.list("Receiver")]

repos = st.sampled_from([
    "https://gitea.example.com/platform/fleet.git", "git@gitea.example.com:platform/fleet.git",
    "https://gitea.example.com/platform/shared-lib", "ssh://git@gitea.example.com/teams/apps.git",
    "https://gitea.example.com/someone/else.git",
])
refs = st.sampled_from([
    "refs/heads/main", "refs/heads/staging", "refs/heads/hotfix", "refs/heads/production",
    "refs/heads/master", "refs/tags/v1.2.3", "refs/tags/v2.0.0", "refs/tags/v1.0.0-rc.1",
])
segments = st.sampled_from(["clusters", "eu-west", "us-east", "apps", "infrastructure",
                            "monitoring", "bases", "charts", "podinfo", "values", "deploy",
                            "policies", "releases", "lib", "x.yaml", "README.md"])
paths = st.lists(st.lists(segments, min_size=1, max_size=5).map("/".join), max_size=12)


@st.composite
def pushes(draw: st.DrawFn) -> Push:
    files = draw(paths)
    return Push(repo_urls=(draw(repos),), full_name="", ref=draw(refs), sha="e" * 40,
                paths=frozenset(files), paths_complete=bool(files) and draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(push=pushes(), which=st.integers(0, len(RECEIVERS) - 1))
def test_never_annotates_outside_the_receiver_resources(push: Push, which: int) -> None:
    receiver = RECEIVERS[which]
    listed = resolve_resources(receiver, STORE).keys
    plan = plan_push(receiver, push, STORE)
    assert {t.key for t in plan.targets} <= listed
    # sources always precede consumers, and no object appears twice
    keys = [t.key for t in plan.targets]
    assert len(keys) == len(set(keys))
    phases = [t.phase for t in plan.targets]
    assert phases == sorted(phases, key=lambda p: p != "source")


@settings(max_examples=300, deadline=None)
@given(push=pushes(), which=st.integers(0, len(RECEIVERS) - 1))
def test_incomplete_file_list_never_reconciles_less(push: Push, which: int) -> None:
    receiver = RECEIVERS[which]
    complete = Push(push.repo_urls, "", push.ref, push.sha, push.paths, paths_complete=True)
    incomplete = Push(push.repo_urls, "", push.ref, push.sha, frozenset(), paths_complete=False)
    full = plan_push(receiver, complete, STORE)
    partial = plan_push(receiver, incomplete, STORE)
    assert {t.key for t in full.targets} <= {t.key for t in partial.targets}
    assert {t.key for t in full.tracked} <= {t.key for t in partial.tracked}


@settings(max_examples=200, deadline=None)
@given(push=pushes())
def test_suspended_objects_are_never_annotated(push: Push) -> None:
    for receiver in RECEIVERS:
        plan = plan_push(receiver, push, STORE)
        assert ObjectKey("Kustomization", "flux-system", "legacy") not in {t.key for t in plan.targets}
