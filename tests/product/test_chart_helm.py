"""The Helm chart through the real `helm` binary: lint, template, schema, RBAC, NOTES.

helm comes from PATH or from the cache `scripts/testbin.sh` builds it into (built on demand when
missing). A missing helm fails these tests: it never skips them silently.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from receiver.config_load import load_settings

pytestmark = pytest.mark.realk8s

ROOT = Path(__file__).resolve().parent.parent.parent
CHART = ROOT / "charts" / "gitea-flux-bridge"
FULL_VALUES = CHART / "ci" / "full-values.yaml"
# The least a user must set (clusterName); the chart refuses to render without it.
DEFAULT_VALUES = CHART / "ci" / "default-values.yaml"
NAMED = ("--set", "clusterName=eu-west")
RELEASE, NAMESPACE = "bridge", "flux-system"
FULLNAME = "bridge-gitea-flux-bridge"
SECRETS_DIR = "/etc/gitea-flux-bridge/secrets"

READ = {"get", "list", "watch"}
# Kinds a Receiver may list that the bridge annotates by name only.
PATCH_ONLY = ("buckets", "externalartifacts", "imageupdateautomations", "artifactgenerators")
FLUX_RULES = (
    {("notification.toolkit.fluxcd.io", "receivers", v) for v in READ}
    | {("source.toolkit.fluxcd.io", r, v) for r in ("gitrepositories", "ocirepositories")
       for v in READ | {"patch"}}
    | {("kustomize.toolkit.fluxcd.io", "kustomizations", v) for v in READ | {"patch"}}
    | {("helm.toolkit.fluxcd.io", "helmreleases", v) for v in READ | {"patch"}}
    # Kinds a Receiver may list that the bridge annotates by name only.
    | {("source.toolkit.fluxcd.io", r, "patch") for r in ("buckets", "externalartifacts")}
    # Cached for package events when their CRD is installed.
    | {("source.toolkit.fluxcd.io", r, v) for r in ("helmrepositories", "helmcharts")
       for v in READ | {"patch"}}
    | {("image.toolkit.fluxcd.io", r, v) for r in ("imagerepositories", "imagepolicies")
       for v in READ | {"patch"}}
    | {("image.toolkit.fluxcd.io", "imageupdateautomations", "patch")}
    | {("source.extensions.fluxcd.io", "artifactgenerators", "patch")}
    # flux-operator's input providers, cached for pull request, branch and tag events.
    | {("fluxcd.controlplane.io", "resourcesetinputproviders", v) for v in READ | {"patch"}}
    | {("", "secrets", "get")}
    | {("", "events", v) for v in ("create", "patch")}
)


def _testbin_dir() -> Path:
    out = subprocess.run(["bash", str(ROOT / "scripts" / "testbin.sh"), "--print-dir"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return Path(out.stdout.strip())


@cache
def helm_path() -> str:
    found = shutil.which("helm")
    if found:
        return found
    cached = _testbin_dir() / "helm"
    if not cached.exists():
        # Build it (pinned, from its Go module) into the cache; reused afterwards.
        build = subprocess.run(["bash", str(ROOT / "scripts" / "testbin.sh"), "helm"],
                               capture_output=True, text=True, cwd=ROOT, timeout=3600)
        if build.returncode != 0 or not cached.exists():
            pytest.fail("helm is not on PATH and `scripts/testbin.sh helm` could not build it:\n"
                        + build.stdout[-2000:] + build.stderr[-4000:])
    return str(cached)


@pytest.fixture(scope="session")
def helm() -> str:
    return helm_path()


def run_helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([helm_path(), *args], capture_output=True, text=True, timeout=120,
                            cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@cache
def render(values: tuple[str, ...] = (), sets: tuple[str, ...] = ()) -> tuple[dict[str, Any], ...]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for path in values:
        args += ["-f", path]
    for item in sets:
        args += ["--set", item]
    out = run_helm(*args).stdout
    docs = [d for d in yaml.safe_load_all(out) if d is not None]
    for doc in docs:
        assert isinstance(doc, dict), doc
    return tuple(docs)


DEFAULT: tuple[str, ...] = (str(DEFAULT_VALUES),)
FULL: tuple[str, ...] = (str(FULL_VALUES),)
VARIANTS = {"default": DEFAULT, "full": FULL}


def objects(variant: str, kind: str | None = None) -> list[dict[str, Any]]:
    return [d for d in render(VARIANTS[variant]) if kind is None or d["kind"] == kind]


def config_map(variant: str) -> dict[str, Any]:
    """The configuration's ConfigMap (the dashboard may have one too)."""
    (found,) = [d for d in objects(variant, "ConfigMap") if "config.yaml" in d.get("data", {})]
    return found


def one(variant: str, kind: str) -> dict[str, Any]:
    (found,) = objects(variant, kind)
    return found


# -- lint and template ---------------------------------------------------------------------------


def test_helm_version(helm: str) -> None:
    out = run_helm("version", "--short").stdout
    assert out.startswith("v3."), out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lint(helm: str, variant: str) -> None:
    args = ["lint", str(CHART), "--strict", "--namespace", NAMESPACE]
    args += ["-f", str(FULL_VALUES if variant == "full" else DEFAULT_VALUES)]
    result = run_helm(*args)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_is_well_formed(helm: str, variant: str) -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    seen = set()
    for doc in objects(variant):
        assert doc.get("apiVersion") and doc.get("kind"), doc
        meta = doc["metadata"]
        assert meta["name"]
        key = (doc["kind"], meta.get("namespace"), meta["name"])
        assert key not in seen, f"duplicate object {key}"
        seen.add(key)
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in meta
        else:
            assert meta["namespace"], doc["kind"]
        assert meta["labels"]["app.kubernetes.io/name"] == "gitea-flux-bridge"
        assert meta["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_default_objects(helm: str) -> None:
    kinds = sorted(d["kind"] for d in objects("default"))
    assert kinds == sorted([
        "ConfigMap", "Deployment", "Service", "ServiceAccount", "NetworkPolicy",
        "PodDisruptionBudget", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
    ])


def test_full_objects(helm: str) -> None:
    kinds = sorted(d["kind"] for d in objects("full"))
    assert kinds == sorted([
        "ConfigMap", "Deployment", "Service", "ServiceAccount", "NetworkPolicy",
        "PodDisruptionBudget", "HorizontalPodAutoscaler", "Ingress", "ServiceMonitor",
        # extraObjects: the Flux side shipped with the release
        "Provider", "Alert", "Receiver",
        # alerts and the Grafana dashboard
        "PrometheusRule", "ConfigMap",
        # a Role + RoleBinding per watched namespace, and the Lease's
        "Role", "RoleBinding", "Role", "RoleBinding", "Role", "RoleBinding",
    ])
    assert one("full", "ServiceMonitor")["apiVersion"] == "monitoring.coreos.com/v1"
    assert one("full", "HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"


def test_kube_version_is_enforced(helm: str) -> None:
    result = run_helm("template", RELEASE, str(CHART), *NAMED, "--kube-version", "1.27.9",
                      check=False)
    assert result.returncode != 0
    assert "kubeVersion" in result.stderr or "incompatible" in result.stderr
    run_helm("template", RELEASE, str(CHART), *NAMED, "--kube-version", "1.28.0")


# -- the Deployment ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deployment_security(helm: str, variant: str) -> None:
    pod = one(variant, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc.get("privileged", False) is False
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) >= {"cpu", "memory"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deployment_runtime(helm: str, variant: str) -> None:
    deployment = one(variant, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["gitea-flux-bridge"]
    assert container["args"] == ["serve", "--config", "/etc/gitea-flux-bridge/config.yaml"]
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # Computed (default) or set and at least what a shutdown takes (full).
    assert pod["terminationGracePeriodSeconds"] == (60 if variant == "full" else 35)
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    config_mount = mounts["/etc/gitea-flux-bridge/config.yaml"]
    assert config_mount["readOnly"] is True
    assert volumes[config_mount["name"]]["configMap"]["name"] == config_map(variant)[
        "metadata"]["name"]
    assert pod["serviceAccountName"] == one(variant, "ServiceAccount")["metadata"]["name"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert one(variant, "Service")["spec"]["selector"] == selector
    if variant == "full":
        assert "replicas" not in deployment["spec"]  # the HPA owns it
        secret_mount = mounts[SECRETS_DIR]
        assert secret_mount["readOnly"] is True
        secret = volumes[secret_mount["name"]]["secret"]
        assert secret["secretName"] == "gitea-flux-bridge-secrets"
        assert env["GFB_STATUSES__MAX_ATTEMPTS"]["value"] == "6"
    else:
        assert deployment["spec"]["replicas"] == 2
        assert SECRETS_DIR not in mounts


# -- rollouts: preStop, grace period, spread --------------------------------------------------------


def _pod(*sets: str, kube_version: str | None = None) -> dict[str, Any]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *NAMED]
    for item in sets:
        args += ["--set-json", item]
    if kube_version:
        args += ["--kube-version", kube_version]
    docs = [d for d in yaml.safe_load_all(run_helm(*args).stdout) if d]
    pod: dict[str, Any] = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"][
        "spec"]
    return pod


def test_prestop_is_the_native_sleep(helm: str) -> None:
    (container,) = _pod()["containers"]
    assert container["lifecycle"] == {"preStop": {"sleep": {"seconds": 5}}}
    # Before 1.30 the sleep action is off by default: the image's sleep does it.
    (old,) = _pod("preStopSleepSeconds=7", kube_version="1.29.4")["containers"]
    assert old["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "7"]}}}
    (none,) = _pod("preStopSleepSeconds=0")["containers"]
    assert "lifecycle" not in none


@pytest.mark.parametrize(("sets", "grace"), [
    ((), 35),  # 5 preStop + 5 drain + 10 in flight + 10 flush + 5
    (("preStopSleepSeconds=0",), 30),
    (('config.shutdown={"drain_seconds": 0.5, "flush_seconds": 30}',), 51),
    (("config.shutdown.in_flight_seconds=60",), 85),
    (("terminationGracePeriodSeconds=35",), 35),
    (("terminationGracePeriodSeconds=600",), 600),
])
def test_grace_period_covers_every_step_of_the_shutdown(
    helm: str, sets: tuple[str, ...], grace: int
) -> None:
    assert _pod(*sets)["terminationGracePeriodSeconds"] == grace


@pytest.mark.parametrize("sets", [
    ("terminationGracePeriodSeconds=34",),
    ("terminationGracePeriodSeconds=30", "preStopSleepSeconds=10"),
    ("terminationGracePeriodSeconds=40", 'config.shutdown={"flush_seconds": 20.5}'),
])
def test_a_grace_period_shorter_than_the_shutdown_fails(helm: str, sets: tuple[str, ...]) -> None:
    args = ["template", RELEASE, str(CHART), *NAMED]
    for item in sets:
        args += ["--set-json", item]
    result = run_helm(*args, check=False)
    assert result.returncode != 0
    assert "is shorter than a shutdown may take" in result.stderr


def test_replicas_spread_across_nodes(helm: str) -> None:
    deployment = one("default", "Deployment")
    (spread,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread == {
        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "ScheduleAnyway",
        "labelSelector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}}
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    for variant in VARIANTS:
        assert "sessionAffinity" not in one(variant, "Service")["spec"]
        assert one(variant, "PodDisruptionBudget")


def test_config_checksum_rolls_the_pods(helm: str) -> None:
    def checksum(*sets: str) -> str:
        deployment = next(d for d in render(DEFAULT, sets) if d["kind"] == "Deployment")
        value: str = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return value

    assert checksum() != checksum("clusterName=us-east")


# -- the configuration file ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_configuration_is_accepted_by_the_service(
    helm: str, variant: str, tmp_path: Path
) -> None:
    configmap = config_map(variant)
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    settings = load_settings(path, environ={})
    assert settings.listen.host == "0.0.0.0"
    assert settings.listen.port == 8080
    values = yaml.safe_load(FULL_VALUES.read_text()) if variant == "full" else {}
    assert settings.namespaces == values.get("watchNamespaces", [])
    assert settings.cluster_name == "eu-west"
    if variant == "full":
        assert [g.name for g in settings.gitea] == ["eu", "us"]
        files = [g.token.file for g in settings.gitea]
        files += [settings.events.hmac_token.file if settings.events.hmac_token else None,
                  settings.badge_key.file if settings.badge_key else None]
        assert all(f is not None and str(f).startswith(SECRETS_DIR + "/") for f in files)


def test_secret_files_without_existing_secret_fail(helm: str) -> None:
    result = run_helm("template", RELEASE, str(CHART), "-f", str(FULL_VALUES),
                      "--set", "existingSecret=", check=False)
    assert result.returncode != 0
    assert "existingSecret" in result.stderr


# -- alerts and dashboard ---------------------------------------------------------------------


def test_prometheus_rule_is_the_promtool_tested_file(helm: str) -> None:
    rule = one("full", "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    (dashboard,) = [d for d in objects("full", "ConfigMap") if "dashboard" in d["metadata"]["name"]]
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["gitea-flux-bridge.json"]) == json.loads(
        (CHART / "files" / "grafana-dashboard.json").read_text())
    assert not objects("default", "PrometheusRule")


# -- the cluster name is required ------------------------------------------------------------------


@pytest.mark.parametrize("unset", [(), ("--set", "clusterName=")])
def test_cluster_name_is_required(helm: str, unset: tuple[str, ...]) -> None:
    """Two clusters installed with a default name would overwrite each other's statuses."""
    result = run_helm("template", RELEASE, str(CHART), *unset, check=False)
    assert result.returncode != 0
    assert "clusterName is required" in result.stderr
    # helm lint treats `required` leniently by design (charts lint without values), but says so.
    lint = run_helm("lint", str(CHART), *unset, check=False)
    assert "clusterName is required" in lint.stdout + lint.stderr


def test_cluster_name_is_validated_and_chart_owned(helm: str) -> None:
    result = run_helm("template", RELEASE, str(CHART), "--set", "clusterName=a{b}", check=False)
    assert result.returncode != 0
    # config.cluster_name is the chart's to write (from clusterName): the schema refuses it.
    result = run_helm("lint", str(CHART), *NAMED, "--set", "config.cluster_name=x", check=False)
    assert result.returncode != 0
    assert "cluster_name" in result.stdout + result.stderr


# -- extraObjects --------------------------------------------------------------------------------


def test_extra_objects_ship_with_the_release_rendered_with_tpl(helm: str) -> None:
    provider = one("full", "Provider")
    assert provider["metadata"]["namespace"] == NAMESPACE
    assert provider["spec"]["address"] == (
        f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local/events")
    alert = one("full", "Alert")
    assert alert["spec"]["providerRef"] == {"name": "gitea-flux-bridge"}
    receiver = one("full", "Receiver")  # given as a string of YAML
    assert receiver["metadata"] == {"name": "platform", "namespace": NAMESPACE, "labels": {
        "app.kubernetes.io/name": "gitea-flux-bridge", "app.kubernetes.io/instance": RELEASE}}
    assert receiver["spec"]["resources"][0]["kind"] == "GitRepository"
    assert not [d for d in objects("default") if d["kind"] in ("Provider", "Alert", "Receiver")]


# -- RBAC ------------------------------------------------------------------------------------------


def _rules(role: dict[str, Any]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    return {(g, r, v, tuple(rule.get("resourceNames", ())))
            for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


def _plain(rules: Iterable[tuple[str, str, str, tuple[str, ...]]]) -> set[tuple[str, str, str]]:
    out = set()
    for group, resource, verb, names in rules:
        assert not names
        out.add((group, resource, verb))
    return out


def _lease_rules(name: str) -> set[tuple[str, str, str, tuple[str, ...]]]:
    return {("coordination.k8s.io", "leases", "create", ()),
            ("coordination.k8s.io", "leases", "get", (name,)),
            ("coordination.k8s.io", "leases", "update", (name,))}


def _check_bindings(variant: str) -> None:
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
             for d in objects(variant) if d["kind"] in ("Role", "ClusterRole")}
    sa = one(variant, "ServiceAccount")["metadata"]
    bindings = [d for d in objects(variant) if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert bindings
    for binding in bindings:
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        assert (ref["kind"], namespace, ref["name"]) in roles, ref
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"],
                                        "namespace": sa["namespace"]}]


def test_rbac_cluster_wide_by_default(helm: str) -> None:
    cluster_role = one("default", "ClusterRole")
    assert _plain(_rules(cluster_role)) == FLUX_RULES
    (lease_role,) = objects("default", "Role")
    assert lease_role["metadata"]["namespace"] == NAMESPACE
    # One Lease per release by default, so two releases in a namespace never share a leader.
    assert _rules(lease_role) == _lease_rules(FULLNAME + "-resync")
    _check_bindings("default")


def test_rbac_per_watched_namespace(helm: str) -> None:
    assert not objects("full", "ClusterRole")
    assert not objects("full", "ClusterRoleBinding")
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]): r for r in objects("full", "Role")}
    assert set(roles) == {("flux-system", FULLNAME), ("apps", FULLNAME),
                          (NAMESPACE, FULLNAME + "-lease")}
    for namespace in ("flux-system", "apps"):
        assert _plain(_rules(roles[(namespace, FULLNAME)])) == FLUX_RULES
    assert _rules(roles[(NAMESPACE, FULLNAME + "-lease")]) == _lease_rules(
        "gitea-flux-bridge-eu-west")
    _check_bindings("full")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rbac_grants_nothing_more(helm: str, variant: str) -> None:
    for role in objects(variant):
        if role["kind"] not in ("Role", "ClusterRole"):
            continue
        for group, resource, verb, _ in _rules(role):
            assert "*" not in (group, resource, verb)
            if resource == "secrets":
                assert verb == "get", "Secrets may only be read by name"
            if verb not in READ:
                assert (resource, verb) in {
                    ("gitrepositories", "patch"), ("ocirepositories", "patch"),
                    ("kustomizations", "patch"), ("helmreleases", "patch"),
                    ("imagerepositories", "patch"), ("imagepolicies", "patch"),
                    ("helmrepositories", "patch"), ("helmcharts", "patch"),
                    ("resourcesetinputproviders", "patch"),
                    *((r, "patch") for r in PATCH_ONLY),
                    ("leases", "create"), ("leases", "update"),
                    ("events", "create"), ("events", "patch")}, (resource, verb)
            if resource == "events":
                assert verb in ("create", "patch"), "Events are written, never read"
            if resource in PATCH_ONLY:
                assert verb == "patch", "kinds the bridge only annotates are never read"


def test_rbac_can_be_left_to_the_operator(helm: str) -> None:
    docs = render(DEFAULT, ("rbac.create=false", "serviceAccount.create=false",
                            "serviceAccount.name=bridge"))
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding",
                        "ServiceAccount"}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "bridge"


# -- network, availability, exposure ---------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_network_policy(helm: str, variant: str) -> None:
    policy = one(variant, "NetworkPolicy")["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["ingress"]
    assert ingress["ports"] == [{"port": 8080, "protocol": "TCP"}]
    egress_ports = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert {(53, "UDP"), (53, "TCP")} <= egress_ports
    assert (6443, "TCP") in egress_ports  # the API server
    assert (443, "TCP") in egress_ports  # Gitea
    if variant == "full":
        assert len(ingress["from"]) == 3
        assert all(rule.get("to") for rule in policy["egress"])
    else:
        assert "from" not in ingress


def test_pod_disruption_budget(helm: str) -> None:
    assert one("default", "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert one("full", "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_ingress_routes_only_public_endpoints(helm: str) -> None:
    ingress = one("full", "Ingress")["spec"]
    (rule,) = ingress["rules"]
    paths = {p["path"] for p in rule["http"]["paths"]}
    assert paths == {"/hook/", "/deliveries/", "/badge/"}
    for path in rule["http"]["paths"]:
        assert path["backend"]["service"] == {"name": FULLNAME, "port": {"name": "http"}}
    assert ingress["tls"][0]["secretName"] == "flux-bridge-tls"


def test_service_monitor_scrapes_metrics(helm: str) -> None:
    monitor = one("full", "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == "monitoring"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


# -- the schema rejects bad values -------------------------------------------------------------------


@pytest.mark.parametrize("setting", [
    "replicaCount=0",
    "replicaCount=two",
    "config.log_level=loud",
    "service.port=70000",
    "service.port=0",
    "unknownTopLevel=1",
    "config.unknown_key=1",
    "config.listen.port=9000",  # the chart owns listen
    "config.rate_limit.burst=0",
    "config.statuses.lease_duration_seconds=5",
    "image.pullPolicy=Sometimes",
    "watchNamespaces[0]=Not_A_Namespace",
    "config.gitea[0].name=only-a-name",
    "config.badge_key.key=token",  # neither file nor secret
    "networkPolicy.egress.dns.ports[0].port=0",
    "autoscaling.minReplicas=0",
    "ingress.hosts[0].paths[0].pathType=Anything",
    "preStopSleepSeconds=-1",
    "terminationGracePeriodSeconds=0",
    "config.shutdown.drain_seconds=-1",
    "config.shutdown.in_flight_seconds=0",
    "config.shutdown.later=1",
    "service.sessionAffinity=ClientIP",
])
def test_schema_rejects(helm: str, setting: str) -> None:
    result = run_helm("lint", str(CHART), *NAMED, "--set", setting, check=False)
    assert result.returncode != 0, setting
    assert "schema" in (result.stdout + result.stderr).lower(), result.stdout


@pytest.mark.parametrize("setting", [
    "config.log_level=debug",
    "replicaCount=1",
    "config.badge_key.file=/etc/gitea-flux-bridge/secrets/badge-key",
])
def test_schema_accepts(helm: str, setting: str) -> None:
    args = ["lint", str(CHART), *NAMED, "--set", setting]
    if "secrets/" in setting:
        args += ["--set", "existingSecret=bridge-secrets"]
    run_helm(*args)


# -- NOTES.txt ---------------------------------------------------------------------------------------


def _render_notes(tmp_path: Path, *args: str) -> str:
    """helm template does not print NOTES.txt: render a copy of it as a ConfigMap."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_for_test.tpl").write_text(
        '{{- define "test.notes" -}}\n' + notes + "\n{{- end -}}\n")
    (chart / "templates" / "notes-for-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n"
        '  notes: {{ include "test.notes" . | toJson }}\n')
    out = run_helm("template", RELEASE, str(chart), "--namespace", NAMESPACE,
                   "--show-only", "templates/notes-for-test.yaml", *NAMED, *args).stdout
    text: str = yaml.safe_load(out)["data"]["notes"]
    return text


def test_notes_tell_how_to_get_hook_urls(helm: str, tmp_path: Path) -> None:
    notes = _render_notes(tmp_path)
    assert "kubectl get receivers -A" in notes
    assert ".status.webhookPath" in notes
    # From the Receiver's own Secret, read as Flux reads it (a file recipe would drop a
    # trailing newline the Secret may hold, and give another path).
    assert "gitea-flux-bridge hook-url --receiver NAMESPACE/RECEIVER" in notes
    assert "base64 -d" not in notes
    assert "gitea-flux-bridge doctor" in notes
    assert f"http://{FULLNAME}.{NAMESPACE}.svc.cluster.local:80/events" in notes
    assert "generic-hmac" in notes
    assert "config.gitea is empty" in notes
    full = _render_notes(tmp_path / "full", "-f", str(FULL_VALUES))
    assert "https://flux-bridge.example.com" in full
    assert "config.gitea is empty" not in full
    assert "flux-system, apps" in full
    assert "Cluster name in commit statuses: eu-west" in full


CANARY_RULES = {("flagger.app", "canaries", v) for v in READ} | {
    ("apps", r, v) for r in ("deployments", "daemonsets") for v in READ}


def test_rbac_reads_canaries_and_workloads_only_when_canaries_are_on(helm: str) -> None:
    assert not _plain(_rules(one("default", "ClusterRole"))) & CANARY_RULES
    on = ("config.statuses.canaries.enabled=true",)
    (cluster_role,) = [d for d in render(DEFAULT, on) if d["kind"] == "ClusterRole"]
    assert _plain(_rules(cluster_role)) == FLUX_RULES | CANARY_RULES
    roles = [d for d in render(FULL, on) if d["kind"] == "Role"
             and d["metadata"]["name"] == FULLNAME]
    assert len(roles) == 2
    for role in roles:
        assert _plain(_rules(role)) == FLUX_RULES | CANARY_RULES
