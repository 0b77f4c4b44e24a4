"""/metrics as an operator expects it: Prometheus naming conventions, process and build info,
the Gitea instance on status metrics, leadership and cache health gauges."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

import receiver
from receiver.metrics import Metrics
from tests.conftest import Bridge
from tests.status.test_status_service import eventually, fixture, rig


def test_names_follow_prometheus_conventions() -> None:
    for family in Metrics().registry.collect():
        name = family.name
        if not name.startswith("gfb_"):
            continue
        if family.type == "counter":
            # prometheus_client strips `_total` from a counter family's name; samples have it.
            assert all(s.name in (name + "_total", name + "_created") for s in family.samples)
        elif family.type == "histogram":
            assert name.endswith("_seconds"), name
        elif family.type == "gauge" and "timestamp" in name:
            assert name.endswith("_timestamp_seconds"), name
        assert family.documentation, name


@pytest.mark.anyio
async def test_metrics_endpoint(bridge: Bridge) -> None:
    text = (await bridge.client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("process_cpu_seconds", "process_resident_memory_bytes",
                 "python_info", "python_gc_objects_collected"):
        assert name in families, name
    (build,) = families["gfb_build_info"].samples
    assert build.labels["version"] == receiver.__version__ and build.value == 1
    assert families["gfb_cache_synced"].samples[0].value == 1
    assert families["gfb_watches_failing"].samples[0].value == 0
    assert families["gfb_resync_leader"].samples[0].value in (0, 1)
    assert "gfb_resync_last_success_timestamp_seconds" in families
    assert "gfb_pushes_unmatched" in families


@pytest.mark.anyio
async def test_status_metrics_name_the_gitea_instance() -> None:
    async with rig() as r:
        await r.send(fixture("kustomization-succeeded.json"))
        await eventually(lambda: r.metric("gfb_statuses_total", result="posted") == 1)
        registry = r.metrics.registry
        assert registry.get_sample_value(
            "gfb_statuses_total", {"gitea_instance": "eu", "result": "posted"}) == 1
        assert registry.get_sample_value(
            "gfb_status_reads_total", {"gitea_instance": "eu", "purpose": "check"})
        count = registry.get_sample_value(
            "gfb_gitea_request_duration_seconds_count",
            {"gitea_instance": "eu", "call": "post_status", "code": "201"})
        assert count == 1
        assert registry.get_sample_value(
            "gfb_gitea_request_duration_seconds_count",
            {"gitea_instance": "eu", "call": "version", "code": "200"}) == 1
        await eventually(lambda: r.metric("gfb_resync_leader") == 1)
