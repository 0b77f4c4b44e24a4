"""The Helm chart and the Containerfile, checked without helm or a container engine.

The chart renders `config:` 1:1 into the service's configuration file (plus `listen` and
`namespaces`), so every value it documents must be a Settings key with the same default, and the
schema must describe exactly those keys. The real `helm lint` / `helm template` checks are in
test_chart_helm.py.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import BaseModel

from receiver.config import SecretSource, Settings
from receiver.config_load import env_overrides, load_settings

ROOT = Path(__file__).resolve().parent.parent.parent
CHART = ROOT / "charts" / "gitea-flux-bridge"
SECRETS_DIR = "/etc/gitea-flux-bridge/secrets/"
# Keys the chart sets itself rather than taking from `config:`.
CHART_OWNED = {"listen", "namespaces", "manifests", "cluster_name"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def helm_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's values coalescing: maps merge recursively, anything else replaces; null deletes."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = helm_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def rendered_config(values: dict[str, Any]) -> dict[str, Any]:
    """What templates/_helpers.tpl `gfb.config` writes into the ConfigMap."""
    config = copy.deepcopy(values.get("config") or {})
    config["listen"] = {"host": "0.0.0.0", "port": 8080}
    config["namespaces"] = list(values.get("watchNamespaces") or [])
    assert values.get("clusterName"), "the chart refuses to render without clusterName"
    config["cluster_name"] = values["clusterName"]
    return config


def grace_period(values: dict[str, Any]) -> int:
    """What templates/_helpers.tpl `gfb.terminationGracePeriodSeconds` computes: the preStop
    sleep, then the service's own shutdown (drain, requests in progress, status flush) as the
    rendered configuration sets it, and 5 s to close the watches and exit."""
    settings = load_settings(environ={}, overrides=rendered_config(values))
    return math.ceil(values["preStopSleepSeconds"] + settings.shutdown.worst_case_seconds + 5)


DEFAULTS = load_yaml(CHART / "values.yaml")
# What a user must set at the least (clusterName), everything else at its default.
MINIMAL = helm_merge(DEFAULTS, load_yaml(CHART / "ci" / "default-values.yaml"))
FULL = helm_merge(DEFAULTS, load_yaml(CHART / "ci" / "full-values.yaml"))
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUE_SETS = {"default": MINIMAL, "full": FULL}


def test_chart_metadata() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "gitea-flux-bridge"
    assert chart["kubeVersion"] == ">=1.28.0-0"
    assert chart["icon"].startswith("https://")
    assert chart["home"].startswith("https://")
    assert chart["sources"] and all(s.startswith("https://") for s in chart["sources"])


def test_values_files_are_mappings() -> None:
    assert isinstance(DEFAULTS, dict)
    assert isinstance(load_yaml(CHART / "ci" / "full-values.yaml"), dict)
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_config_is_accepted_by_the_service(name: str) -> None:
    values = VALUE_SETS[name]
    settings = load_settings(environ={}, overrides=rendered_config(values))
    assert settings.listen.host == "0.0.0.0"
    assert settings.listen.port == 8080
    assert settings.namespaces == list(values["watchNamespaces"])
    assert settings.manifests is None


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_rendered_config_file_is_accepted(name: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(rendered_config(VALUE_SETS[name])))
    settings = load_settings(path, environ={})
    assert settings.cluster_name == VALUE_SETS[name]["clusterName"]


def test_cluster_name_has_no_default() -> None:
    assert DEFAULTS["clusterName"] == ""
    assert "cluster_name" not in DEFAULTS["config"]
    assert "cluster_name" not in SCHEMA["properties"]["config"]["properties"]
    assert MINIMAL["clusterName"] and set(load_yaml(CHART / "ci" / "default-values.yaml")) == {
        "clusterName"}


def test_full_values_use_every_optional_part() -> None:
    assert FULL["ingress"]["enabled"]
    assert FULL["autoscaling"]["enabled"]
    assert FULL["serviceMonitor"]["enabled"]
    assert FULL["networkPolicy"]["enabled"]
    assert FULL["podDisruptionBudget"]["enabled"]
    assert FULL["watchNamespaces"]
    assert FULL["existingSecret"]
    assert len(FULL["config"]["gitea"]) == 2
    settings = load_settings(environ={}, overrides=rendered_config(FULL))
    assert settings.events.hmac_token is not None
    assert settings.badge_key is not None


def _secret_files(settings: Settings) -> list[Path]:
    sources: list[SecretSource | None] = [settings.events.hmac_token,
                                          settings.events.bearer_token, settings.badge_key]
    sources += [g.token for g in settings.gitea]
    return [s.file for s in sources if s is not None and s.file is not None]


def test_full_values_read_secrets_from_the_mounted_secret() -> None:
    files = _secret_files(load_settings(environ={}, overrides=rendered_config(FULL)))
    assert len(files) == 4
    assert all(str(f).startswith(SECRETS_DIR) for f in files)


def test_documented_defaults_equal_the_service_defaults() -> None:
    """values.yaml `config:` documents each key with the service's own default."""
    defaults = Settings().model_dump(mode="json")

    def compare(documented: dict[str, Any], actual: dict[str, Any], where: str) -> None:
        for key, value in documented.items():
            assert key in actual, f"{where}{key} is not a configuration key"
            if isinstance(value, dict) and isinstance(actual[key], dict) and value:
                compare(value, actual[key], f"{where}{key}.")
            elif isinstance(actual[key], dict) and not value:
                assert not actual[key] or all(v is None for v in actual[key].values()), where + key
            else:
                assert value == actual[key], f"{where}{key}: {value!r} != {actual[key]!r}"

    compare(DEFAULTS["config"], defaults, "config.")


def test_every_configuration_key_is_in_values_or_documented() -> None:
    text = (CHART / "values.yaml").read_text()
    for key in set(Settings.model_fields) - CHART_OWNED:
        assert key in DEFAULTS["config"] or re.search(rf"#\s*{key}:", text), key


# -- the schema describes exactly the Settings keys ---------------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `X`, `X | None` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            model = _model_of(arg)
            if model is not None:
                return model
    return None


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref:
        node: Any = SCHEMA
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return _resolve(node)
    if schema.get("type") == "array":
        return _resolve(schema["items"])
    return schema


def _compare_schema(model: type[BaseModel], schema: dict[str, Any], where: str,
                    skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    schema = _resolve(schema)
    assert schema.get("additionalProperties") is False, f"{where} accepts unknown keys"
    fields = set(model.model_fields) - skip
    assert set(schema["properties"]) == fields, where
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is not None and name in schema["properties"]:
            _compare_schema(sub, schema["properties"][name], f"{where}.{name}")


def test_schema_config_matches_settings() -> None:
    _compare_schema(Settings, SCHEMA["properties"]["config"], "config", CHART_OWNED)


def test_schema_log_levels_match_settings() -> None:
    levels = typing.get_args(Settings.model_fields["log_level"].annotation)
    assert SCHEMA["properties"]["config"]["properties"]["log_level"]["enum"] == list(levels)


def _keys_covered(values: Any, schema: dict[str, Any], where: str) -> None:
    schema = _resolve(schema) if "$ref" in schema else schema
    if isinstance(values, dict) and "properties" in schema:
        for key, value in values.items():
            if key in schema["properties"]:
                _keys_covered(value, schema["properties"][key], f"{where}.{key}")
            else:
                assert schema.get("additionalProperties", True) is not False, f"{where}.{key}"
    elif isinstance(values, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(values):
            _keys_covered(item, schema["items"], f"{where}[{i}]")


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_schema_knows_every_value(name: str) -> None:
    assert SCHEMA["additionalProperties"] is False
    _keys_covered(VALUE_SETS[name], SCHEMA, "values")


def test_schema_top_level_keys_are_all_documented() -> None:
    assert set(SCHEMA["properties"]) - {"global"} == set(DEFAULTS)


# -- rollouts: preStop, grace period, spread, no affinity ----------------------------------------


def test_grace_period_covers_prestop_drain_requests_and_flush() -> None:
    assert DEFAULTS["terminationGracePeriodSeconds"] is None  # computed by the template
    assert DEFAULTS["preStopSleepSeconds"] == 5
    assert grace_period(MINIMAL) == 5 + 5 + 10 + 10 + 5 == 35
    # An explicit value in the full values is at least what it must cover.
    assert FULL["terminationGracePeriodSeconds"] >= grace_period(FULL) == math.ceil(
        10 + 2.5 + 15 + 20 + 5)
    # The template names the same parts, and fails below their sum.
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    block = helpers.split('{{- define "gfb.terminationGracePeriodSeconds" -}}', 1)[1]
    for part in ("preStopSleepSeconds", '"drain_seconds" 5', '"in_flight_seconds" 10',
                 '"flush_seconds" 10', "addf $need 5", "fail"):
        assert part in block, part
    shutdown = Settings().shutdown
    assert (shutdown.drain_seconds, shutdown.in_flight_seconds, shutdown.flush_seconds) == (
        5, 10, 10)


def test_replicas_spread_across_nodes_by_default() -> None:
    assert DEFAULTS["replicaCount"] >= 2
    assert DEFAULTS["topologySpreadConstraints"] == [{
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway"}]
    assert DEFAULTS["podDisruptionBudget"]["enabled"] is True


def test_no_session_affinity_anywhere() -> None:
    """Any replica answers any request; nothing tells users to pin clients to one."""
    assert "sessionAffinity" not in DEFAULTS["service"]
    assert "sessionAffinity" not in SCHEMA["properties"]["service"]["properties"]
    places = [*CHART.rglob("*"), *(ROOT / "docs").rglob("*.md"), ROOT / "README.md",
              *(ROOT / ".gitea").rglob("*"), *(ROOT / "examples").rglob("*")]
    for path in places:
        if path.is_file():
            text = path.read_text(errors="replace").lower()
            for phrase in ("sessionaffinity", "session affinity", "ingress.kubernetes.io/affinity",
                           "cookie affinity"):
                assert phrase not in text, f"{path.relative_to(ROOT)}: {phrase}"


def test_schema_rejects_basic_mistakes() -> None:
    props = SCHEMA["properties"]
    assert props["replicaCount"] == {"type": "integer", "minimum": 1}
    assert props["service"]["properties"]["port"]["maximum"] == 65535
    assert props["service"]["properties"]["port"]["minimum"] == 1


# -- RBAC, as written in the helper the (Cluster)Roles include ----------------------------------


def test_rbac_rules_are_exactly_design_section_3() -> None:
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    block = helpers.split('{{- define "gfb.fluxRules" -}}', 1)[1].split("{{- end -}}", 1)[0]
    rules = yaml.safe_load(block)
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    read = {"get", "list", "watch"}
    expected = {("notification.toolkit.fluxcd.io", "receivers", v) for v in read}
    for group, resources in (("source.toolkit.fluxcd.io", ("gitrepositories", "ocirepositories")),
                             ("kustomize.toolkit.fluxcd.io", ("kustomizations",)),
                             ("helm.toolkit.fluxcd.io", ("helmreleases",)),
                             # cached for package events (receiver.flux.objects.OPTIONAL_KINDS)
                             ("source.toolkit.fluxcd.io", ("helmrepositories", "helmcharts")),
                             ("image.toolkit.fluxcd.io", ("imagerepositories", "imagepolicies")),
                             # cached for pull request, branch and tag events
                             ("fluxcd.controlplane.io", ("resourcesetinputproviders",))):
        expected |= {(group, r, v) for r in resources for v in read | {"patch"}}
    # Kinds a Receiver may list that the bridge annotates by name only: patch, nothing more.
    for group, resources in (
            ("source.toolkit.fluxcd.io", ("buckets", "externalartifacts")),
            ("image.toolkit.fluxcd.io", ("imageupdateautomations",)),
            ("source.extensions.fluxcd.io", ("artifactgenerators",))):
        expected |= {(group, r, "patch") for r in resources}
    expected.add(("", "secrets", "get"))
    # Kubernetes Events on Receivers and annotated objects: written, never read.
    expected |= {("", "events", "create"), ("", "events", "patch")}
    assert granted == expected


def test_rbac_patches_every_kind_a_receiver_may_list() -> None:
    from receiver.flux.kube_api import PLURALS, resource_for
    from receiver.flux.objects import RECEIVER_KINDS

    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    block = helpers.split('{{- define "gfb.fluxRules" -}}', 1)[1].split("{{- end -}}", 1)[0]
    patchable = {(g, r) for rule in yaml.safe_load(block) if "patch" in rule["verbs"]
                 for g in rule["apiGroups"] for r in rule["resources"]}
    for kind in RECEIVER_KINDS:
        group, _, plural = resource_for(kind)
        assert (group, plural) in patchable, kind
    assert set(RECEIVER_KINDS) <= set(PLURALS)


# -- the Containerfile ---------------------------------------------------------------------------


def _containerfile() -> list[tuple[str, str]]:
    text = (ROOT / "Containerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def test_containerfile_shape() -> None:
    lines = _containerfile()
    args = dict(rest.split("=", 1) for ins, rest in lines if ins == "ARG" and "=" in rest)
    # A tag, or the tag pinned by digest (docs/releasing.md, "The base image").
    assert re.fullmatch(r"python:3\.11-slim(@sha256:[0-9a-f]{64})?", args["PYTHON_IMAGE"])
    froms = [rest for ins, rest in lines if ins == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE}"]
    final = lines[max(i for i, (ins, _) in enumerate(lines) if ins == "FROM"):]
    final_text = " ".join(rest for _, rest in final)
    assert ("USER", "10001:10001") in final
    assert ("EXPOSE", "8080") in final
    assert ("ENTRYPOINT", '["gitea-flux-bridge"]') in final
    assert ("CMD", '["serve"]') in final
    assert "COPY --from=builder /opt/venv /opt/venv" in " ".join(f"{i} {r}" for i, r in final)
    # Nothing is built or installed in the final stage.
    for tool in ("apt-get", "pip", "gcc", "build-essential", "COPY . "):
        assert tool not in final_text, tool
    # The user the image runs as is the user the chart runs it as.
    assert DEFAULTS["securityContext"]["runAsUser"] == 10001
    assert DEFAULTS["podSecurityContext"]["runAsUser"] == 10001


# -- requirements.lock: the image's run-time dependencies, pinned and hashed ------------------------


def _lock() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock as {normalized name: (version, [sha256 hashes])}."""
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split()
        name, _, version = spec.partition("==")
        assert version, f"not pinned with ==: {line}"
        assert name == Requirement(name).name, f"extras or markers in the lock: {line}"
        hashes = [o.removeprefix("--hash=sha256:") for o in options]
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), line
        out[canonicalize_name(name)] = (version, hashes)
    return out


def _runtime_requirements() -> list[Requirement]:
    """What the image installs: the dependencies and the `kube` extra (it runs in a cluster)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [Requirement(r) for r in (*pyproject["project"]["dependencies"],
                                     *pyproject["project"]["optional-dependencies"]["kube"])]


def test_lock_pins_every_runtime_requirement_with_hashes() -> None:
    lock = _lock()
    for requirement in _runtime_requirements():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{requirement} is not in requirements.lock: run scripts/lock.sh"
        version, hashes = lock[name]
        assert requirement.specifier.contains(version, prereleases=True), (requirement, version)
        assert hashes, f"{name} has no hash"
    # The image builds the package offline with the build backend from the lock.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for requirement in map(Requirement, pyproject["build-system"]["requires"]):
        version, _ = lock[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version), (requirement, version)


def test_lock_is_closed_over_the_installed_dependencies() -> None:
    """Every requirement of a locked package (as installed here, at the locked version) is locked
    too: `pip install --require-hashes` fails on anything the lock lacks."""
    lock = _lock()
    checked = 0
    for name, (version, _) in lock.items():
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
        for requirement in map(Requirement, dist.requires or []):
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            assert canonicalize_name(requirement.name) in lock, (name, str(requirement))
    assert checked >= len(_runtime_requirements())


def test_runtime_requirements_are_only_what_the_service_uses() -> None:
    names = {canonicalize_name(r.name): r for r in _runtime_requirements()}
    # The server runs loop="uvloop" and http="httptools" (receiver/cli, server.http).
    assert {"uvicorn", "uvloop", "httptools"} <= set(names)
    assert not names["uvicorn"].extras, "uvicorn[standard] pulls in what the service never uses"
    assert "uvloop" in (ROOT / "receiver" / "cli" / "__init__.py").read_text()
    assert Settings().server.http == "httptools"
    for unused in ("watchfiles", "websockets", "python-dotenv"):
        assert unused not in _lock(), unused


def test_containerfile_installs_the_lock_with_hashes() -> None:
    runs = [rest for ins, rest in _containerfile() if ins == "RUN"]
    copies = [rest for ins, rest in _containerfile() if ins == "COPY"]
    assert "requirements.lock ./" in copies
    assert any("pip install --require-hashes" in r and "-r requirements.lock" in r for r in runs)
    # The project itself: nothing resolved, nothing downloaded.
    assert any("pip install --no-deps --no-index --no-build-isolation ." in r for r in runs)
    assert not any("pip wheel" in r for r in runs)


def test_lock_script_uses_a_throwaway_pip_tools() -> None:
    script = (ROOT / "scripts" / "lock.sh").read_text()
    assert "pip-compile" in script and "--generate-hashes" in script
    assert "requirements.lock" in script
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "pip-tools" not in pyproject


def test_containerfile_entrypoint_is_the_console_script() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["gitea-flux-bridge"] == "receiver.cli:main"


def test_container_environment_listens_on_all_interfaces() -> None:
    env = dict(item.split("=", 1) for ins, rest in _containerfile() if ins == "ENV"
               for item in rest.split())
    assert env["GFB_LISTEN__HOST"] == "0.0.0.0"
    settings = load_settings(environ={k: v for k, v in env.items() if k.startswith("GFB_")})
    assert settings.listen.host == "0.0.0.0"
    assert settings.listen.port == 8080
    assert env_overrides({"GFB_LISTEN__HOST": "0.0.0.0"}) == {"listen": {"host": "0.0.0.0"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_command_the_image_and_chart_run_works(tmp_path: Path) -> None:
    """`gitea-flux-bridge serve --config /etc/gitea-flux-bridge/config.yaml`, with the config the
    chart renders from its default values and the image's environment, serves and stops cleanly
    on SIGTERM (the in-memory cluster stands in for Kubernetes)."""
    port = _free_port()
    config = rendered_config(MINIMAL)
    config["listen"]["host"] = "127.0.0.1"  # the test binds loopback only
    config["listen"]["port"] = port
    config["manifests"] = str(ROOT / "examples" / "fleet")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GFB_")}
    env.update(PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", POD_NAMESPACE="flux-system")
    process = subprocess.Popen(
        [sys.executable, "-c", "import sys; from receiver.cli import main; sys.exit(main())",
         "serve", "--config", str(path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "not ready within 30 s"
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if response.status_code == 200:
                assert response.json()["status"] == "ready"
                break
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        process.terminate()
        # The drain (config.shutdown.drain_seconds), then the graceful shutdown, then exit 0;
        # all of it within the grace period the chart computes (the preStop sleep came first).
        code = process.wait(timeout=grace_period(MINIMAL) - DEFAULTS["preStopSleepSeconds"])
        assert code == 0
        output = process.stdout.read().decode() if process.stdout else ""
        assert "draining: not ready, still serving" in output
        assert "Application shutdown complete" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
