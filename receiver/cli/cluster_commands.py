"""The commands that read a cluster (or --manifests) the way the service does: `doctor` and
`hook-url --receiver`. Argument handling only; the checks are `receiver.doctor`'s."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from receiver.cli.common import EXIT_OK, EXIT_PROBLEMS, fail, no_kube


def hook_url_of_receiver(args: argparse.Namespace) -> int:
    """The hook URL from the Receiver's own Secret, read as Flux reads it (raw)."""
    from receiver.doctor import checks

    namespace, _, name = args.receiver.partition("/")
    if not namespace or not name or "/" in name:
        return fail("--receiver must be NAMESPACE/NAME")
    try:
        facts = asyncio.run(_receiver_facts(args.manifests, args.config, namespace, name))
    except CommandError as exc:
        return fail(str(exc))
    if facts is None:
        return fail(f"no Receiver {args.receiver}", EXIT_PROBLEMS)
    base = args.base_url.rstrip("/") if args.base_url else ""
    found = checks.receiver_findings(facts, base)
    failed = {f.check: f.message for f in found
              if f.severity == "fail" and f.check.startswith(("token", "type"))}
    newline = failed.pop("token-trailing-newline", None)
    if failed:
        return fail(next(iter(failed.values())), EXIT_PROBLEMS)
    if newline is not None:
        print(f"gitea-flux-bridge: warning: {newline}", file=sys.stderr)
    print(base + checks.hook_readings(facts)["as_stored"])
    return EXIT_OK


class CommandError(Exception):
    """A command cannot run (bad configuration, manifests or Kubernetes client): exit 2."""


def _open_cluster(manifests: str | None, config: str | None, *,
                  impersonate: str = "") -> tuple[Any, Any, Any]:
    """(settings, cluster, Kubernetes client or None): manifests when the settings name them,
    else the cluster the environment points at. The cluster is not started here."""
    from receiver.config import ConfigError
    from receiver.config_load import load_settings
    from receiver.doctor.gather import kube_client
    from receiver.flux.memory import ManifestError, MemoryCluster
    from receiver.flux.store import ObjectStore
    from receiver.web.app import url_normaliser

    try:
        settings = load_settings(Path(config) if config else None,
                                 overrides={"manifests": manifests})
    except ConfigError as exc:
        raise CommandError(str(exc)) from None
    store = ObjectStore(url_normaliser(settings))
    if settings.manifests is not None:
        try:
            return settings, MemoryCluster.from_directory(store, settings.manifests), None
        except (ManifestError, OSError) as exc:
            raise CommandError(f"cannot load manifests: {exc}") from None
    try:
        from receiver.flux.kube import KubeCluster
    except ModuleNotFoundError as exc:
        raise CommandError(no_kube(exc)) from None
    try:
        client = kube_client(impersonate)
    except Exception as exc:  # the client raises several types for a missing config
        raise CommandError(f"cannot configure the Kubernetes client: {exc}") from None
    cluster = KubeCluster(store, client, settings.namespaces, secret_ttl_seconds=0,
                          lease_namespace=os.environ.get("POD_NAMESPACE") or None,
                          owns_client=True)
    return settings, cluster, client


async def _receiver_facts(manifests: str | None, config: str | None, namespace: str,
                          name: str) -> Any:
    from receiver.doctor.gather import receiver_facts, synced

    settings, cluster, _ = _open_cluster(manifests, config)
    try:
        await synced(cluster, 30.0)
        found = [r for r in await receiver_facts(settings, cluster)
                 if (r.namespace, r.name) == (namespace, name)]
    finally:
        await cluster.stop()
    return found[0] if found else None


def cmd_doctor(args: argparse.Namespace) -> int:
    from receiver.doctor import checks

    try:
        findings = asyncio.run(_doctor(args))
    except CommandError as exc:
        return fail(str(exc))
    if args.output == "json":
        print(json.dumps({"problems": checks.problems(findings),
                          "findings": [f.as_dict() for f in findings]}, indent=2))
    else:
        print(checks.render_text(findings))
    return EXIT_PROBLEMS if checks.problems(findings) else EXIT_OK


async def _doctor(args: argparse.Namespace) -> list[Any]:
    from receiver.doctor.checks import diagnose
    from receiver.doctor.gather import gather, notification_facts_from, synced
    from receiver.flux.memory import load_documents

    settings, cluster, client = _open_cluster(
        args.manifests, args.config, impersonate=args.as_user)
    notifications = None
    if settings.manifests is not None:
        notifications = notification_facts_from(load_documents(settings.manifests))
    try:
        ready = await synced(cluster, args.timeout)
        facts = await gather(
            settings, cluster, source=(f"manifests {settings.manifests}" if client is None
                                       else "cluster"),
            base_url=args.base_url or "", api_client=client,
            lease_namespace=args.namespace or os.environ.get("POD_NAMESPACE") or "flux-system",
            notifications=notifications, cluster_synced=ready)
    finally:
        await cluster.stop()
    return diagnose(facts)
