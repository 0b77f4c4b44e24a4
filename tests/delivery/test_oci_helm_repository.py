"""A chart pushed to an OCI registry, with the in-memory cluster doing what source-controller
and helm-controller really do (as `tests/e2e/test_e2e_helm.py` sees them): source-controller never
reconciles a HelmRepository of type `oci`. Since Flux 2.3 it is a static object: its events are
filtered out and its status is cleared once, so it never gets `lastHandledReconcileAt` or a
Ready condition, whatever is annotated. The HelmChart pulls the chart from the registry itself
and helm-controller releases it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from receiver.flux.objects import RECONCILE_ANNOTATION, ObjectKey
from tests.conftest import BridgeFactory, make_settings, send_package_event, until
from tests.push.test_helm_package_routing import (
    ALIASES,
    GENERATED,
    NS,
    TOKEN,
    _chart,
    _event,
    _receiver,
    _release,
    _repo,
)

VERSION = "1.4.0"
SOURCE_TIMEOUT = 1.0  # what the delivery gives its sources (the HelmRepository among them)


async def _push(bridge_factory: BridgeFactory, tmp_path: Path) -> tuple[Any, str]:
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": "registry-token", "namespace": NS},
              "stringData": {"token": TOKEN}}
    docs = [_receiver(), secret, _repo(url="oci://gitea-http.gitea.svc.cluster.local:3000/platform"),
            _chart(version=">=1.0.0"), _release()]
    (tmp_path / "helm.yaml").write_text("\n---\n".join(json.dumps(d) for d in docs))
    settings = make_settings(host_aliases=ALIASES, reconcile={
        "coalesce_window_seconds": 0.2, "source_timeout_seconds": SOURCE_TIMEOUT,
        "consumer_grace_seconds": 0})
    bridge = await bridge_factory(settings, tmp_path)
    doc = await send_package_event(bridge, "registry", TOKEN,
                                   json.dumps(_event(version=VERSION)).encode())
    return bridge, doc["delivery"]


def _handle(bridge: Any, kind: str, name: str, status: dict[str, Any]) -> None:
    """The controller handles the bridge's request on `kind`/`name` and reports `status`."""
    obj = bridge.cluster.store.get(ObjectKey(kind, NS, name))
    assert obj is not None and RECONCILE_ANNOTATION in obj.annotations, (kind, name)
    raw = json.loads(json.dumps(obj.raw))
    raw["status"] = {**status, "observedGeneration": 1,
                     "lastHandledReconcileAt": obj.annotations[RECONCILE_ANNOTATION]}
    bridge.cluster.apply(raw)


@pytest.mark.anyio
async def test_a_released_chart_settles_ready_though_the_oci_repository_never_reports(
    bridge_factory: BridgeFactory, tmp_path: Path,
) -> None:
    bridge, delivery = await _push(bridge_factory, tmp_path)

    def annotated(kind: str, name: str) -> bool:
        obj = bridge.cluster.store.get(ObjectKey(kind, NS, name))
        return obj is not None and RECONCILE_ANNOTATION in obj.annotations

    await until(lambda: annotated("HelmChart", GENERATED), what="the HelmChart annotated")
    _handle(bridge, "HelmChart", GENERATED, {
        "artifact": {"revision": VERSION},
        "conditions": [{"type": "Ready", "status": "True", "reason": "ChartPullSucceeded",
                        "message": f"pulled 'web' chart with version '{VERSION}'"}]})
    await until(lambda: annotated("HelmRelease", "web"), what="the HelmRelease annotated")
    _handle(bridge, "HelmRelease", "web", {
        "history": [{"chartName": "web", "chartVersion": VERSION, "status": "deployed"}],
        "lastAttemptedRevision": VERSION,
        "conditions": [{"type": "Ready", "status": "True", "reason": "UpgradeSucceeded",
                        "message": f"Helm upgrade succeeded with chart web@{VERSION}"}]})
    # The HelmRepository stays as source-controller leaves it: no status at all.
    repo = bridge.cluster.store.get(ObjectKey("HelmRepository", NS, "charts"))
    assert repo is not None and not repo.status

    reply = await bridge.client.get(f"/deliveries/{delivery}?wait={SOURCE_TIMEOUT + 5:g}",
                                    headers={"Authorization": f"Bearer {TOKEN}"})
    last = json.loads(reply.text.splitlines()[-1])
    states = {t["kind"]: t["state"] for t in last.get("targets", [])}
    assert (last.get("outcome"), states) == ("ready", dict.fromkeys(
        ("HelmRepository", "HelmChart", "HelmRelease"), "ready")), last
