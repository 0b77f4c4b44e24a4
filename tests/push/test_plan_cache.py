"""Remembered plans: whatever the watch changes in between, a push is routed as if afresh.

A state machine over the fleet fixture: pushes (any repository, ref and files, each a new
commit) interleaved with the changes a watch brings (a source's ref or artifact revision, a
consumer's path or suspension, an object deleted and created again, a Receiver's resources,
the bridge's own marks). After every step the remembered plan equals a fresh one."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

from receiver.delivery.marks import DELIVERIES_ANNOTATION
from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import PATHS_ANNOTATION, ObjectKey
from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import Push
from receiver.giturls import normalise_repo_url
from receiver.push.package_routing import plan_selection
from receiver.push.plan_cache import PlanCache
from receiver.push.resources import resolve_resources
from receiver.push.selector import GITEA_PUSH, Selection
from tests.push.test_routing_properties import FLEET

# Few enough pushes that most repeat one remembered before (a hit), after changes or not.
repos = st.sampled_from(["https://gitea.example.com/platform/fleet.git",
                         "git@gitea.example.com:teams/apps.git"])
refs = st.sampled_from(["refs/heads/main", "refs/tags/v1.2.3", "refs/heads/production"])
paths = st.sampled_from([["clusters/eu-west/apps/x.yaml"], ["deploy/a.yaml", "releases/b"]])

_versions = itertools.count(10_000)


def _fresh_store() -> ObjectStore:
    store = ObjectStore(lambda url: normalise_repo_url(url, {}))
    MemoryCluster.from_directory(store, Path(FLEET))
    return store


class RememberedPlans(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = _fresh_store()
        self.cache = PlanCache(self.store, allow_cross_namespace=True,
                               gitea_prefixes=frozenset(), max_plans=64)
        self.gone: dict[ObjectKey, dict[str, Any]] = {}

    def _objects(self, kind: str) -> list[Any]:
        return sorted(self.store.list(kind), key=lambda o: o.key)

    def _change(self, kind: str, which: int, edit: Any) -> None:
        objects = self._objects(kind)
        if not objects:
            return
        raw = copy.deepcopy(objects[which % len(objects)].raw)
        raw.setdefault("metadata", {})["resourceVersion"] = str(next(_versions))
        edit(raw)
        self.store.upsert(raw)

    @rule(repo=repos, ref=refs, files=paths, complete=st.booleans(), which=st.integers(0, 9))
    def push(self, repo: str, ref: str, files: list[str], complete: bool, which: int) -> None:
        receivers = self._objects("Receiver")
        receiver = receivers[which % 2]
        push = Push((repo,), "", ref, f"{next(_versions):040x}", frozenset(files),
                    paths_complete=complete)
        selection = Selection(GITEA_PUSH, push)
        resolved = resolve_resources(receiver, self.store)
        fresh = plan_selection(receiver, selection, self.store, resolved=resolved).compact()
        assert self.cache.plan(receiver, selection, resolved) == fresh

    @rule(which=st.integers(0, 9), branch=st.sampled_from(["main", "staging", "master"]))
    def source_ref(self, which: int, branch: str) -> None:
        self._change("GitRepository", which, lambda r: r["spec"].update(ref={"branch": branch}))

    @rule(which=st.integers(0, 9), tag=st.sampled_from(["v1.0.0", "v1.5.0"]))
    def source_artifact(self, which: int, tag: str) -> None:
        self._change("GitRepository", which, lambda r: r.setdefault("status", {}).update(
            artifact={"revision": f"{tag}@sha1:{'c' * 40}"}))

    @rule(which=st.integers(0, 9),
          path=st.sampled_from(["./deploy", "./clusters/eu-west", "./", "./clusters/us-east"]))
    def consumer_path(self, which: int, path: str) -> None:
        self._change("Kustomization", which, lambda r: r["spec"].update(path=path))

    @rule(which=st.integers(0, 9), paths=st.sampled_from(["", "deploy", "releases;clusters"]))
    def consumer_paths_annotation(self, which: int, paths: str) -> None:
        self._change("Kustomization", which, lambda r: r["metadata"].setdefault(
            "annotations", {}).update({PATHS_ANNOTATION: paths}))

    @rule(which=st.integers(0, 9), suspend=st.booleans())
    def suspension(self, which: int, suspend: bool) -> None:
        kind = "Kustomization" if which % 2 else "GitRepository"
        self._change(kind, which, lambda r: r["spec"].update(suspend=suspend))

    @rule(which=st.integers(0, 9), mark=st.integers(0, 10**6))
    def bridge_marks(self, which: int, mark: int) -> None:
        self._change("GitRepository", which, lambda r: r["metadata"].setdefault(
            "annotations", {}).update({DELIVERIES_ANNOTATION: f"{mark:016x}@1"}))

    @rule(which=st.integers(0, 9))
    def receiver_lists_less(self, which: int) -> None:
        self._change("Receiver", which, lambda r: r["spec"].update(
            resources=r["spec"].get("resources", [])[1:]))

    @rule(which=st.integers(0, 9), kind=st.sampled_from(["GitRepository", "Kustomization"]))
    def delete(self, which: int, kind: str) -> None:
        objects = self._objects(kind)
        if objects:
            gone = objects[which % len(objects)]
            self.gone[gone.key] = gone.raw
            self.store.delete(gone.key)

    @rule()
    def created_again(self) -> None:
        if self.gone:
            key = next(iter(self.gone))
            self.store.upsert(self.gone.pop(key))


RememberedPlans.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                             deadline=None)
test_remembered_plans = RememberedPlans.TestCase


def test_a_semver_source_moving_to_a_higher_tag_stops_taking_a_lower_one() -> None:
    """The artifact revision is status, not spec: its change alone must drop the plan."""
    machine = RememberedPlans()
    names = [o.key.name for o in machine._objects("GitRepository")]
    push = {"repo": "https://gitea.example.com/platform/fleet.git", "ref": "refs/tags/v1.2.3",
            "files": ["releases/b"], "complete": False, "which": 1}
    machine.push(**push)
    machine.source_artifact(which=names.index("fleet-releases"), tag="v1.5.0")
    machine.push(**push)  # asserts the remembered plan equals a fresh one
    machine.source_artifact(which=names.index("fleet-releases"), tag="v1.0.0")
    machine.push(**push)


def test_a_paths_annotation_moves_a_consumer_under_the_changed_files() -> None:
    """The bridge's `paths` annotation is read by routing: its change alone must drop the plan."""
    machine = RememberedPlans()
    names = [o.key.name for o in machine._objects("Kustomization")]
    push = {"repo": "https://gitea.example.com/platform/fleet.git", "ref": "refs/heads/main",
            "files": ["deploy/a.yaml", "releases/b"], "complete": True, "which": 1}
    machine.push(**push)
    for name in names:
        machine.consumer_paths_annotation(which=names.index(name), paths="deploy")
        machine.push(**push)
