"""What the cache keeps of an object (`slim`): every reader of the cache sees the same answer.

The cache drops `metadata.managedFields`, a consumer's values, post-renderers, patches and
substitutions, a source artifact's storage address, a Kustomization's `status.inventory` and a
HelmRelease's release history past the latest snapshot, and shares equal strings between
objects. The readers routing, delivery states, statuses and badges use are asked the same
questions about an object as listed and as cached.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from receiver.flux.objects import (
    API_VERSIONS,
    FluxObject,
    consumer_paths,
    consumer_source,
    helm_chart_of,
    slim,
)
from receiver.flux.origin import (
    artifact_commit,
    artifact_metadata,
    artifact_revision,
    consumer_at_artifact,
    consumer_commits,
    has_pushed_artifact,
    is_oci,
    source_url,
)
from receiver.flux.revisions import (
    applied_revision,
    at_rest,
    attempted_revision,
    followable,
    handled_since,
    progress_at,
)
from receiver.push.cel_filter import resource_document

SHA = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"
KINDS = ("GitRepository", "OCIRepository", "Kustomization", "HelmRelease")
words = st.sampled_from(["main", "prod", "apps", "Ready", "True", "False", "Unknown",
                         "Succeeded", "ReconciliationFailed", "Progressing", "1.2.3",
                         f"main@sha1:{SHA}", f"1.2.3+{SHA[:12]}", f"sha256:{'ab' * 32}",
                         "2026-12-07T10:00:00Z", "./apps/web", "x"])
conditions = st.lists(st.fixed_dictionaries({
    "type": st.sampled_from(["Ready", "Stalled", "Reconciling"]),
    "status": st.sampled_from(["True", "False", "Unknown"]),
    "reason": words, "message": words, "observedGeneration": st.integers(0, 3),
    "lastTransitionTime": st.just("2026-12-07T10:00:00Z")}), max_size=3)
managed = st.lists(st.fixed_dictionaries({
    "manager": st.sampled_from(["kustomize-controller", "kubectl", "helm-controller"]),
    "operation": st.sampled_from(["Apply", "Update"]), "time": words,
    "fieldsType": st.just("FieldsV1"),
    "fieldsV1": st.just({"f:status": {"f:conditions": {}}})}), max_size=3)
snapshot = st.fixed_dictionaries({
    "name": words, "namespace": words, "version": st.integers(1, 9), "status": words,
    "chartName": words, "chartVersion": words, "digest": words, "configDigest": words})
inventory = st.fixed_dictionaries({"entries": st.lists(st.fixed_dictionaries({
    "id": st.sampled_from(["apps_web_apps_Deployment", "apps_web__Service"]),
    "v": st.just("v1")}), max_size=4)})


@st.composite
def listed_objects(draw: st.DrawFn) -> dict[str, Any]:
    """An object as the API server lists it, any of the kinds whose status the cache trims."""
    kind = draw(st.sampled_from(KINDS))
    annotations = draw(st.dictionaries(st.sampled_from([
        "event.toolkit.fluxcd.io/commit", "reconcile.fluxcd.io/requestedAt",
        "gitea-flux-bridge.io/paths", "kubectl.kubernetes.io/last-applied-configuration"]),
        words, max_size=3))
    metadata: dict[str, Any] = {
        "name": draw(words), "namespace": draw(words), "generation": draw(st.integers(1, 3)),
        "resourceVersion": str(draw(st.integers(1, 10**6))), "uid": "0d1e2f",
        "labels": draw(st.dictionaries(st.sampled_from(["app", "tier"]), words, max_size=2)),
        "annotations": annotations}
    if draw(st.booleans()):
        metadata["managedFields"] = draw(managed)
    spec: dict[str, Any] = {"interval": "10m", "suspend": draw(st.booleans())}
    if kind in ("GitRepository", "OCIRepository"):
        spec["url"] = draw(st.sampled_from(["https://gitea.example/org/fleet.git",
                                            "oci://registry.example/charts/web"]))
    elif kind == "Kustomization":
        spec.update(path=draw(words), sourceRef={"kind": "GitRepository", "name": draw(words)})
        if draw(st.booleans()):
            spec.update(patches=[{"patch": draw(words), "target": {"kind": "Deployment"}}],
                        postBuild={"substitute": {"cluster": draw(words)}})
    else:
        spec.update(chartRef={"kind": "OCIRepository", "name": draw(words)})
        if draw(st.booleans()):
            spec.update(values={"image": {"tag": draw(words)}, "replicaCount": 2},
                        postRenderers=[{"kustomize": {"patches": [{"patch": draw(words)}]}}])
    status: dict[str, Any] = {
        "observedGeneration": draw(st.integers(0, 3)), "conditions": draw(conditions),
        "lastHandledReconcileAt": draw(words), "lastAttemptedRevision": draw(words),
        "lastAppliedRevision": draw(words)}
    if kind in ("GitRepository", "OCIRepository"):
        status["artifact"] = {"revision": draw(words), "digest": draw(words),
                              "metadata": draw(st.dictionaries(words, words, max_size=2)),
                              "lastUpdateTime": draw(words), "size": 40960,
                              "path": f"gitrepository/apps/{draw(words)}.tar.gz",
                              "url": f"http://source-controller/apps/{draw(words)}.tar.gz"}
    elif kind == "Kustomization" and draw(st.booleans()):
        status["inventory"] = draw(inventory)
    elif kind == "HelmRelease":
        status["history"] = draw(st.lists(snapshot, max_size=5))
    raw = {"apiVersion": API_VERSIONS[kind], "kind": kind, "metadata": metadata, "spec": spec}
    if draw(st.booleans()):
        raw["status"] = status
    return raw


READERS: dict[str, Callable[[FluxObject], object]] = {
    "key": lambda o: (o.key, o.api_version),
    "labels": lambda o: o.labels,
    "annotations": lambda o: o.annotations,
    "generation, resourceVersion, suspended": lambda o: (
        o.generation, o.resource_version, o.suspended),
    # All of it but what no reader reads: a consumer's values, post-renderers, patches and
    # substitutions (routing reads its source, paths and chart; nothing renders it).
    "spec": lambda o: {k: v for k, v in o.spec.items()
                       if k not in ("values", "postRenderers", "patches", "postBuild")},
    "conditions": lambda o: [o.condition(t) for t in ("Ready", "Stalled", "Reconciling")],
    "routing": lambda o: (consumer_source(o), consumer_paths(o), helm_chart_of(o)),
    "revisions": lambda o: (applied_revision(o), attempted_revision(o), at_rest(o),
                            followable(o), handled_since(o, 0.0)),
    "progress": lambda o: progress_at(o, SHA),
    "source": lambda o: (is_oci(o), artifact_revision(o), artifact_metadata(o),
                         source_url(o), artifact_commit(o), has_pushed_artifact(
                             o, artifact_revision(o).rpartition("@")[0], 0.0, False)),
    "resource filter's res": lambda o: resource_document(o.api_version, o.kind, {
        k: v for k, v in o.metadata.items() if k != "managedFields"}),
}


@settings(max_examples=300, deadline=None)
@given(listed_objects(), listed_objects())
def test_every_reader_of_the_cache_answers_alike_for_the_object_as_listed_and_as_cached(
        raw: dict[str, Any], source_raw: dict[str, Any]) -> None:
    listed, listed_source = FluxObject(copy.deepcopy(raw)), FluxObject(copy.deepcopy(source_raw))
    cached, cached_source = FluxObject(slim(raw)), FluxObject(slim(source_raw))
    for name, read in READERS.items():
        assert read(cached) == read(listed), name
    assert consumer_at_artifact(cached, cached_source) == consumer_at_artifact(
        listed, listed_source)
    assert consumer_commits(cached, cached_source) == consumer_commits(listed, listed_source)


def test_the_cache_keeps_neither_field_ownership_nor_inventories_nor_old_releases() -> None:
    """What goes: what no reader reads, and what grows with the cluster."""
    entries = [{"id": f"apps_web-{i}_apps_Deployment", "v": "v1"} for i in range(200)]
    kustomization = slim({"kind": "Kustomization", "metadata": {
        "name": "apps", "managedFields": [{"manager": "kubectl", "fieldsV1": {}}]},
        "status": {"inventory": {"entries": entries}, "lastAppliedRevision": "main@sha1:1"}})
    assert kustomization == {"kind": "Kustomization", "metadata": {"name": "apps"},
                             "status": {"lastAppliedRevision": "main@sha1:1"}}
    releases = [{"version": v, "chartVersion": f"1.0.{v}"} for v in (5, 4, 3, 2, 1)]
    release = slim({"kind": "HelmRelease", "metadata": {"name": "web"},
                    "status": {"history": releases, "lastAttemptedRevision": "1.0.5"}})
    assert release["status"] == {"history": releases[:1], "lastAttemptedRevision": "1.0.5"}


def test_the_cache_keeps_no_chart_values_patches_or_artifact_addresses() -> None:
    """A consumer's values and patches are most of its bytes in a real fleet (kilobytes of
    chart values each), and nothing the bridge does reads them; nor where an artifact is
    stored. What routing and statuses read stays."""
    values = {"image": {"repository": "registry.example/web", "tag": "1.2.3"},
              "resources": {"limits": {"memory": "256Mi"}}, "ingress": {"hosts": ["web"] * 50}}
    release = slim({"kind": "HelmRelease", "metadata": {"name": "web"}, "spec": {
        "chartRef": {"kind": "OCIRepository", "name": "web"}, "values": values,
        "postRenderers": [{"kustomize": {"patches": [{"patch": "- op: add"}]}}]}})
    assert release["spec"] == {"chartRef": {"kind": "OCIRepository", "name": "web"}}
    kustomization = slim({"kind": "Kustomization", "metadata": {"name": "apps"}, "spec": {
        "path": "./apps", "sourceRef": {"kind": "GitRepository", "name": "fleet"},
        "patches": [{"patch": "- op: replace"}], "postBuild": {"substitute": {"env": "prod"}}}})
    assert kustomization["spec"] == {"path": "./apps",
                                     "sourceRef": {"kind": "GitRepository", "name": "fleet"}}
    artifact = {"revision": "main@sha1:1", "digest": "sha256:2", "lastUpdateTime": "T",
                "metadata": {"a": "b"}, "size": 4096, "path": "gitrepository/a/b/1.tar.gz",
                "url": "http://source-controller/gitrepository/a/b/1.tar.gz"}
    source = slim({"kind": "GitRepository", "metadata": {"name": "fleet"},
                   "spec": {"url": "https://gitea.example/org/fleet.git"},
                   "status": {"artifact": artifact, "observedGeneration": 1}})
    assert source["status"] == {"observedGeneration": 1, "artifact": {
        "revision": "main@sha1:1", "digest": "sha256:2", "lastUpdateTime": "T",
        "metadata": {"a": "b"}}}
    assert source["spec"] == {"url": "https://gitea.example/org/fleet.git"}


def test_equal_strings_of_cached_objects_are_one_string() -> None:
    """The memory a fleet's repeated values take is one copy per value, not one per object."""
    def listed(name: str) -> dict[str, Any]:
        # Built at run time, as a JSON decoder builds them: equal but distinct strings.
        ready = "".join(["Rea", "dy"])
        return {"kind": "Kustomization", "metadata": {"name": name, "namespace": "".join(
            ["tenant-", "a"])}, "status": {"conditions": [{"type": ready, "status": "True"}]}}

    a, b = listed("".join(["a", "pps"])), listed("".join(["in", "fra"]))
    assert a["metadata"]["namespace"] is not b["metadata"]["namespace"]
    a, b = slim(a), slim(b)
    assert a["metadata"]["namespace"] is b["metadata"]["namespace"]
    assert a["status"]["conditions"][0]["type"] is b["status"]["conditions"][0]["type"]
    assert (a["metadata"]["name"], b["metadata"]["name"]) == ("apps", "infra")
