"""The release's chart step against the real Gitea of the end-to-end suite: `helm package`,
`helm registry login` and `helm push` to Gitea's own OCI registry, then `helm template` from
the pushed reference renders exactly what the local chart renders.

The same layout as `.gitea/workflows/release.yml`: the chart goes to `oci://<host>/<owner>/charts`
(the image is `<host>/<owner>/gitea-flux-bridge`, so the two never share a repository and tag).
Gitea runs on 127.0.0.1 over plain HTTP, hence `--plain-http`; a real Gitea serves HTTPS.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.e2e_harness import (
    CHART,
    ROOT,
    Gitea,
    child_env,
    e2e_peers,
)

pytestmark = pytest.mark.e2e

OWNER = "platform"
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
NAME, VERSION = CHART_META["name"], CHART_META["version"]
RENDER = ("--namespace", "flux-system", "--set", "clusterName=x")


@dataclass
class Registry:
    gitea: Gitea
    helm_bin: Path
    home: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.gitea.port}"

    def helm(self, *args: str, stdin: str | None = None, ok: bool = True
             ) -> subprocess.CompletedProcess[str]:
        # Helm's config, cache and registry credentials live in the test's own directory.
        env = child_env(HOME=str(self.home), HELM_CONFIG_HOME=str(self.home / "config"),
                        HELM_CACHE_HOME=str(self.home / "cache"),
                        HELM_DATA_HOME=str(self.home / "data"))
        result = subprocess.run([str(self.helm_bin), *args], input=stdin, capture_output=True,
                                text=True, cwd=ROOT, env=env, timeout=120, check=False)
        if ok:
            assert result.returncode == 0, (f"helm {' '.join(args)}: exit {result.returncode}\n"
                                            f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        return result


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    bin_dir, static_root = e2e_peers(("helm", "gitea"))
    assert static_root is not None
    workdir = tmp_path_factory.mktemp("release-oci")
    gitea = Gitea(bin_dir / "gitea", static_root, workdir=workdir / "gitea")
    gitea.workdir.mkdir()
    gitea.start()
    try:
        gitea.create_org(OWNER)
        home = workdir / "helm-home"
        home.mkdir()
        yield Registry(gitea, bin_dir / "helm", home)
    finally:
        gitea.close()


def _docs(manifest: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(manifest) if isinstance(d, dict)]


@pytest.fixture(scope="module")
def pushed(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Package, log in, push (as the release workflow does); returns the pushed digest."""
    dist = tmp_path_factory.mktemp("dist")
    registry.helm("package", str(CHART), "--destination", str(dist))
    package = dist / f"{NAME}-{VERSION}.tgz"
    assert package.is_file(), sorted(p.name for p in dist.iterdir())
    login = registry.helm("registry", "login", registry.host, "--plain-http",
                          "--username", registry.gitea.admin, "--password-stdin",
                          stdin=registry.gitea.token)
    assert "Login Succeeded" in login.stdout + login.stderr
    push = registry.helm("push", str(package), f"oci://{registry.host}/{OWNER}/charts",
                         "--plain-http")
    out = push.stdout + push.stderr
    assert f"Pushed: {registry.host}/{OWNER}/charts/{NAME}:{VERSION}" in out, out
    digest = re.search(r"Digest: (sha256:[0-9a-f]{64})", out)
    assert digest, out
    return digest.group(1)


def test_gitea_lists_the_chart_as_a_package_of_the_owner(registry: Registry, pushed: str
                                                         ) -> None:
    packages = registry.gitea.api("GET", f"/packages/{OWNER}", params={"type": "container"})
    found = {(p["name"], p["version"]) for p in packages}
    assert (f"charts/{NAME}", VERSION) in found, found


def _template(registry: Registry, chart: str, *args: str) -> subprocess.CompletedProcess[str]:
    return registry.helm("template", "bridge", chart, *RENDER, *args)


def test_template_from_the_pushed_reference_equals_the_local_render(registry: Registry,
                                                                    pushed: str) -> None:
    local = _docs(_template(registry, str(CHART)).stdout)
    remote = _docs(_template(registry, f"oci://{registry.host}/{OWNER}/charts/{NAME}",
                             "--version", VERSION, "--plain-http").stdout)
    assert local, "the local render is empty"
    assert remote == local
    kinds = {d["kind"] for d in remote}
    assert {"Deployment", "ConfigMap", "ServiceAccount"} <= kinds, kinds


def test_pulled_chart_is_the_packaged_one(registry: Registry, pushed: str,
                                          tmp_path: Path) -> None:
    pulled = registry.helm("pull", f"oci://{registry.host}/{OWNER}/charts/{NAME}",
                           "--version", VERSION, "--plain-http", "--destination", str(tmp_path))
    assert f"Digest: {pushed}" in pulled.stdout + pulled.stderr
    chart = tmp_path / f"{NAME}-{VERSION}.tgz"
    shown = registry.helm("show", "chart", str(chart)).stdout
    assert yaml.safe_load(shown)["appVersion"] == CHART_META["appVersion"]


def test_pushed_chart_still_requires_a_cluster_name(registry: Registry, pushed: str) -> None:
    refused = registry.helm("template", "bridge", f"oci://{registry.host}/{OWNER}/charts/{NAME}",
                            "--version", VERSION, "--plain-http", ok=False)
    assert refused.returncode != 0
    assert "clusterName is required" in refused.stderr
