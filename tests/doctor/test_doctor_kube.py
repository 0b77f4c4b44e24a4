"""`doctor` on a Kubernetes API that refuses to list a kind: it does not wait out its timeout,
and says which kind could not be read (the in-process fake API server, `tests/kubefake.py`)."""

from __future__ import annotations

import base64
import time

import kubernetes
import pytest

from receiver.config_load import load_settings
from receiver.doctor.checks import diagnose
from receiver.doctor.gather import gather, synced
from receiver.flux.kube import KubeCluster
from receiver.flux.store import ObjectStore
from receiver.retry import Backoff
from receiver.web.app import url_normaliser
from tests.kubefake import FakeKube

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_kind_it_may_not_list_is_named_without_waiting_out_the_timeout() -> None:
    settings = load_settings(environ={})
    with FakeKube() as fake:
        fake.put({"apiVersion": "v1", "kind": "Secret",
                  "metadata": {"name": "webhook-token", "namespace": "flux-system"},
                  "data": {"token": base64.b64encode(b"t0ken").decode()}})
        fake.put({"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
                  "metadata": {"name": "gitea", "namespace": "flux-system"},
                  "spec": {"type": "github", "secretRef": {"name": "webhook-token"},
                           "resources": [{"kind": "GitRepository", "name": "fleet"}]}})
        fake.forbid("kustomize.toolkit.fluxcd.io/v1", "Kustomization")
        client = kubernetes.client.ApiClient(kubernetes.client.Configuration(host=fake.url))
        cluster = KubeCluster(ObjectStore(url_normaliser(settings)), client,
                              backoff=Backoff(initial=0.05, maximum=0.2))
        started = time.monotonic()
        try:
            ready = await synced(cluster, 60.0, give_up_after=0.5)
            facts = await gather(settings, cluster, source="cluster", cluster_synced=ready)
        finally:
            await cluster.stop()
            client.close()
    assert not ready and time.monotonic() - started < 30
    found = {f.check: f.message for f in diagnose(facts) if f.severity == "fail"}
    assert "Kustomization" in found["not-synced"] and "403" in found["not-synced"]
