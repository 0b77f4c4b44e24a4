"""Generate a large Flux layout for benchmarks: GitRepositories, Kustomizations, Receivers."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

HOST = "gitea.bench.example"


def repo_url(i: int) -> str:
    return f"https://{HOST}/org-{i % 50}/repo-{i}.git"


ALL_LABEL = {"bench/all": "true"}
ALL_RECEIVER, ALL_TOKEN = "hook-all", "bench-token-all"


def generate(directory: Path, repos: int, kustomizations: int, receivers: int,
             receiver_type: str = "github", receiver_for_all: bool = False) -> None:
    """The fleet; `receiver_for_all` adds one more Receiver, `hook-all` (generic, token
    `bench-token-all`), that selects every GitRepository and Kustomization by label, as an
    organisation-wide Receiver does: pushes of every repository through one hook path."""
    directory.mkdir(parents=True, exist_ok=True)
    per_repo = max(1, kustomizations // repos)
    sources: list[dict[str, Any]] = []
    consumers: list[dict[str, Any]] = []
    hooks: list[dict[str, Any]] = []
    for i in range(repos):
        sources.append({
            "apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
            "metadata": {"name": f"repo-{i}", "namespace": "flux-system",
                         **({"labels": ALL_LABEL} if receiver_for_all else {})},
            "spec": {"interval": "10m", "url": repo_url(i), "ref": {"branch": "main"}},
        })
    for k in range(kustomizations):
        i = k % repos
        consumers.append({
            "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
            "metadata": {"name": f"ks-{k}", "namespace": "flux-system",
                         "labels": {"bench/receiver": str(i % receivers),
                                    **(ALL_LABEL if receiver_for_all else {})}},
            "spec": {"interval": "10m", "path": f"./clusters/region-{k // repos % per_repo}/apps",
                     "sourceRef": {"kind": "GitRepository", "name": f"repo-{i}"}},
        })
    for r in range(receivers):
        resources: list[dict[str, Any]] = [{"kind": "GitRepository", "name": f"repo-{i}"}
                     for i in range(r, repos, receivers)]
        resources.append({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                          "name": "*", "matchLabels": {"bench/receiver": str(r)}})
        hooks.append({
            "apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
            "metadata": {"name": f"hook-{r}", "namespace": "flux-system"},
            "spec": {"type": receiver_type, "secretRef": {"name": f"hook-{r}"}, "resources": resources},
        })
        hooks.append({"apiVersion": "v1", "kind": "Secret",
                      "metadata": {"name": f"hook-{r}", "namespace": "flux-system"},
                      "stringData": {"token": f"bench-token-{r}"}})
    if receiver_for_all:
        hooks.append({
            "apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
            "metadata": {"name": ALL_RECEIVER, "namespace": "flux-system"},
            "spec": {"type": "generic", "secretRef": {"name": ALL_RECEIVER}, "resources": [
                {"kind": "GitRepository", "name": "*", "matchLabels": ALL_LABEL},
                {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
                 "name": "*", "matchLabels": ALL_LABEL}]}})
        hooks.append({"apiVersion": "v1", "kind": "Secret",
                      "metadata": {"name": ALL_RECEIVER, "namespace": "flux-system"},
                      "stringData": {"token": ALL_TOKEN}})
    for name, docs in (("sources", sources), ("consumers", consumers), ("receivers", hooks)):
        (directory / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("directory", type=Path)
    p.add_argument("--repos", type=int, default=2000)
    p.add_argument("--kustomizations", type=int, default=10000)
    p.add_argument("--receivers", type=int, default=200)
    a = p.parse_args()
    generate(a.directory, a.repos, a.kustomizations, a.receivers)


if __name__ == "__main__":
    main()
