"""The in-memory cluster's log of applied patches stays bounded in a long-running server."""

from __future__ import annotations

import pytest

from receiver.flux.memory import PATCH_LOG, MemoryCluster
from receiver.flux.objects import RECONCILE_ANNOTATION, ObjectKey
from receiver.flux.store import ObjectStore

KEY = ObjectKey("GitRepository", "flux-system", "apps")


@pytest.mark.anyio
async def test_the_patch_log_keeps_the_newest_patches_within_its_bound() -> None:
    store = ObjectStore(lambda url: url)
    store.upsert({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
                  "metadata": {"name": "apps", "namespace": "flux-system"}})
    cluster = MemoryCluster(store)
    for n in range(3 * PATCH_LOG):
        await cluster.annotate(KEY, {RECONCILE_ANNOTATION: str(n)})
    assert PATCH_LOG <= len(cluster.patches) <= 2 * PATCH_LOG
    # The newest are the ones kept, in order, and the object carries the last one.
    values = [int(a[RECONCILE_ANNOTATION]) for _, a in cluster.patches]
    assert values == list(range(3 * PATCH_LOG - len(values), 3 * PATCH_LOG))
    obj = store.get(KEY)
    assert obj is not None and obj.annotations[RECONCILE_ANNOTATION] == str(3 * PATCH_LOG - 1)
