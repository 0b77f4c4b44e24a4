"""Routing cost against cache size, and patches per object under a burst of pushes.

    python -m benchmarks.bench_routing

1. `plan_push` time per push (median of many) with 100 ... 100,000 cached objects: it must
   stay flat, because every lookup is an index hit, never a scan.
2. 1,000 signed pushes to one repository within one second, through the ASGI app on the
   in-memory cluster: annotation patches per object (bar: at most 2).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from typing import Any

import httpx

from benchmarks.fleetgen import repo_url
from receiver.config_load import load_settings
from receiver.flux.memory import MemoryCluster
from receiver.flux.objects import ObjectKey
from receiver.flux.store import ObjectStore
from receiver.gitea.payloads import parse_gitea_push
from receiver.push.resources import resolve_resources
from receiver.push.routing import plan_push
from receiver.signatures import hmac_hex, hook_digest
from receiver.web.app import create_app, url_normaliser
from tests import gitea_payloads as gp

RECEIVER_REPOS = 10


def docs_for(total: int) -> list[dict[str, Any]]:
    """One sixth GitRepositories, five sixths Kustomizations, one Receiver per 10 repos."""
    repos = max(1, total // 6)
    kustomizations = total - repos
    out: list[dict[str, Any]] = []
    for i in range(repos):
        out.append({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
                    "metadata": {"name": f"repo-{i}", "namespace": "flux-system"},
                    "spec": {"url": repo_url(i), "ref": {"branch": "main"}}})
    for k in range(kustomizations):
        i = k % repos
        out.append({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                    "metadata": {"name": f"ks-{k}", "namespace": "flux-system",
                                 "labels": {"bench/receiver": str(i // RECEIVER_REPOS)}},
                    "spec": {"path": f"./clusters/region-{k // repos % 5}/apps",
                             "sourceRef": {"kind": "GitRepository", "name": f"repo-{i}"}}})
    resources: list[dict[str, Any]] = [{"kind": "GitRepository", "name": f"repo-{i}"}
                                       for i in range(min(RECEIVER_REPOS, repos))]
    resources.append({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                      "name": "*", "matchLabels": {"bench/receiver": "0"}})
    out.append({"apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
                "metadata": {"name": "hook", "namespace": "flux-system"},
                "spec": {"type": "github", "secretRef": {"name": "hook"}, "resources": resources}})
    out.append({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "hook", "namespace": "flux-system"},
                "stringData": {"token": "bench-token"}})
    return out


def push_doc(seq: int) -> dict[str, Any]:
    full_name = "org-0/repo-0"
    root = "https://gitea.bench.example/"
    commit = gp.commit(full_name, f"c{seq}", modified=["clusters/region-0/apps/app.yaml"],
                       root=root)
    return gp.push(full_name, "refs/heads/main", [commit], root=root)


def _median_us(fn: Any, runs: int) -> float:
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(runs // 5):
            fn()
        samples.append((time.perf_counter() - start) / (runs // 5) * 1e6)
    return statistics.median(samples)


def routing_cost(sizes: list[int], runs: int = 3000) -> list[tuple[int, float, float]]:
    """(objects, us per push resolving the Receiver each time, us with the resolution cached
    as the service keeps it)."""
    settings = load_settings(environ={})
    rows = []
    push = parse_gitea_push(push_doc(0))
    for size in sizes:
        store = ObjectStore(url_normaliser(settings))
        MemoryCluster(store).load(docs_for(size))
        receiver = store.get(ObjectKey("Receiver", "flux-system", "hook"))
        assert receiver is not None
        plan = plan_push(receiver, push, store)
        assert [t.name for t in plan.targets][:1] == ["repo-0"], plan
        resolved = resolve_resources(receiver, store)
        rows.append((
            len(store),
            _median_us(lambda: plan_push(receiver, push, store), runs),  # noqa: B023
            _median_us(lambda: plan_push(receiver, push, store, resolved=resolved), runs),  # noqa: B023
        ))
    return rows


async def burst(pushes: int = 1000, seconds: float = 1.0) -> tuple[int, Counter[str], float]:
    settings = load_settings(environ={}, overrides={
        "log_level": "warning", "rate_limit": {"requests_per_second": 1e9, "burst": 10**9}})
    store = ObjectStore(url_normaliser(settings))
    cluster = MemoryCluster(store)
    cluster.load(docs_for(1200))
    app = create_app(settings, cluster)
    path = "/hook/" + hook_digest("bench-token", "hook", "flux-system")
    bodies = [gp.gitea_bytes(push_doc(i)) for i in range(pushes)]
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            start = time.perf_counter()

            async def send(i: int) -> int:
                await asyncio.sleep(i * seconds / pushes)
                body = bodies[i]
                r = await client.post(path, content=body, headers={
                    "Content-Type": "application/json", "X-Gitea-Event": "push",
                    "X-Gitea-Delivery": f"burst-{i}",
                    "X-Gitea-Signature": hmac_hex("sha256", "bench-token", body)})
                return r.status_code

            codes = await asyncio.gather(*(send(i) for i in range(pushes)))
            elapsed = time.perf_counter() - start
            await asyncio.sleep(settings.reconcile.coalesce_window_seconds * 2)
    assert set(codes) == {202}, Counter(codes)
    per_object = Counter(f"{k.kind}/{k.name}" for k, _ in cluster.patches)
    return pushes, per_object, elapsed


def main() -> None:
    print("| cached objects | plan_push, resolving the Receiver (us) | with resolution cached (us) |")
    print("|---:|---:|---:|")
    for size, full, cached in routing_cost([100, 1_000, 10_000, 100_000]):
        print(f"| {size:,} | {full:.0f} | {cached:.0f} |")
    pushes, per_object, elapsed = asyncio.run(burst())
    print(f"\n{pushes} pushes to one repository in {elapsed:.2f} s (coalescing window "
          f"{load_settings(environ={}).reconcile.coalesce_window_seconds:g} s): patches per "
          f"object: {dict(per_object)} (max {max(per_object.values())})")


if __name__ == "__main__":
    main()
