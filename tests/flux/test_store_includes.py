"""A GitRepository's `spec.include`: the store answers who includes a repository as the
includes come, change and go."""

from __future__ import annotations

from typing import Any

from receiver.flux.objects import ObjectKey
from receiver.flux.store import ObjectStore
from receiver.giturls import normalise_repo_url


def repo(name: str, *includes: str) -> dict[str, Any]:
    return {"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
            "metadata": {"name": name, "namespace": "flux-system"},
            "spec": {"url": f"https://gitea.example/org/{name}.git",
                     "include": [{"repository": {"name": i}} for i in includes]}}


def includers(store: ObjectStore, name: str) -> set[str]:
    return {o.name for o in store.includers_of(ObjectKey("GitRepository", "flux-system", name))}


def test_includers_follow_includes_as_they_change_and_their_repositories_go() -> None:
    store = ObjectStore(lambda url: normalise_repo_url(url, {}))
    store.upsert(repo("lib"))
    store.upsert(repo("app", "lib"))
    store.upsert(repo("site", "lib", "theme"))
    assert includers(store, "lib") == {"app", "site"}
    assert includers(store, "theme") == {"site"}
    store.upsert(repo("site"))  # its includes removed
    assert (includers(store, "lib"), includers(store, "theme")) == ({"app"}, set())
    store.delete(ObjectKey("GitRepository", "flux-system", "app"))
    assert includers(store, "lib") == set()
    store.upsert(repo("app", "theme"))
    assert (includers(store, "lib"), includers(store, "theme")) == (set(), {"app"})
