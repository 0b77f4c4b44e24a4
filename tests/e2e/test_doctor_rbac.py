"""`doctor` against a real kube-apiserver: the bridge's RBAC checked as the chart's
ServiceAccount (`--as`, SelfSubjectAccessReview per verb), the chart's own RBAC passing and a
grant taken away named with what the bridge needs it for; and a Receiver's Secret made with
`--from-file` (a trailing newline) named by doctor and read right by `hook-url --receiver`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from receiver.cli import main
from tests.e2e.realk8s import ControlPlane, control_plane  # noqa: F401
from tests.e2e.test_real_k8s import RBAC_KINDS, RELEASE_NS, _kubeconfig_env, helm_template

pytestmark = pytest.mark.realk8s
RELEASE = "doc"


def doctor(plane: ControlPlane, tmp_path: Path, config: dict[str, Any], sa: str,
           capsys: pytest.CaptureFixture[str], subject: str = "RBAC"
           ) -> tuple[int, list[dict[str, Any]]]:
    """`gitea-flux-bridge doctor --as <the ServiceAccount>` with an admin kubeconfig."""
    kubeconfig = plane.write_kubeconfig(tmp_path / "admin.yaml", plane.admin_token)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    acting = ["--as", f"system:serviceaccount:{RELEASE_NS}:{sa}"] if sa else []
    with _kubeconfig_env(kubeconfig):
        code = main(["doctor", "--config", str(config_file), "--output", "json", *acting,
                     "--namespace", RELEASE_NS, "--timeout", "60"])
    report = json.loads(capsys.readouterr().out)
    return code, [f for f in report["findings"] if f["subject"] == subject]


def test_doctor_passes_the_charts_rbac_and_names_a_missing_grant(
        control_plane: ControlPlane, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    docs = helm_template(control_plane, RELEASE)
    rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    config.pop("listen", None)
    (sa,) = [d["metadata"]["name"] for d in rbac if d["kind"] == "ServiceAccount"]
    control_plane.ensure_namespace(RELEASE_NS)
    api = control_plane.api_client()
    for doc in rbac:
        kubernetes.utils.create_from_dict(api, doc)  # type: ignore[no-untyped-call]

    code, findings = doctor(control_plane, tmp_path, config, sa, capsys)
    assert [f["check"] for f in findings] == ["rbac"], findings

    # Take away the Lease grants: the resync leader election would fail, and doctor says so.
    (lease_binding,) = [d for d in rbac if d["kind"] == "RoleBinding"
                        and d["metadata"]["name"].endswith("-lease")]
    kubernetes.client.RbacAuthorizationV1Api(api).delete_namespaced_role_binding(
        lease_binding["metadata"]["name"], RELEASE_NS)
    code, findings = doctor(control_plane, tmp_path, config, sa, capsys)
    denied = sorted(f["message"] for f in findings if f["check"] == "rbac-denied")
    assert code == 1
    assert [m.split(" (")[0] for m in denied] == [
        f"the bridge may not create leases.coordination.k8s.io in {RELEASE_NS}",
        f"the bridge may not get leases/{config['statuses']['lease_name']}"
        f".coordination.k8s.io in {RELEASE_NS}",
        f"the bridge may not update leases/{config['statuses']['lease_name']}"
        f".coordination.k8s.io in {RELEASE_NS}"]
    assert all("resync leader" in m for m in denied)


def test_a_secret_made_from_a_file_is_named_and_hook_url_reads_it_as_flux_does(
        control_plane: ControlPlane, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    from receiver import signatures as sig

    namespace, token = "doctor-newline", "from-a-file\n"  # `echo token > f; --from-file`
    control_plane.ensure_namespace(namespace)
    control_plane.request("POST", f"/api/v1/namespaces/{namespace}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "webhook-token"},
        "stringData": {"token": token}})
    control_plane.request(
        "POST", f"/apis/notification.toolkit.fluxcd.io/v1/namespaces/{namespace}/receivers", {
            "apiVersion": "notification.toolkit.fluxcd.io/v1", "kind": "Receiver",
            "metadata": {"name": "gitea"},
            "spec": {"type": "github", "secretRef": {"name": "webhook-token"},
                     "resources": [{"kind": "GitRepository", "name": "absent"}]}})
    stored = "/hook/" + sig.hook_digest(token, "gitea", namespace)
    stripped = "/hook/" + sig.hook_digest(token[:-1], "gitea", namespace)
    code, findings = doctor(control_plane, tmp_path, {"namespaces": [namespace]}, "",
                            capsys, subject=f"Receiver {namespace}/gitea")  # as the admin
    checks = {f["check"]: f for f in findings}
    assert code == 1
    assert checks["token-trailing-newline"]["detail"] == {
        "hook_url": stored, "hook_url_without_newline": stripped}
    assert "absent" in checks["no-targets"]["message"]

    kubeconfig = control_plane.write_kubeconfig(tmp_path / "admin.yaml",
                                                control_plane.admin_token)
    with _kubeconfig_env(kubeconfig):
        assert main(["hook-url", "--receiver", f"{namespace}/gitea"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == stored and stripped in out.err


def test_with_canaries_on_doctor_passes_the_charts_grants_and_names_them_when_missing(
        control_plane: ControlPlane, tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    """The chart rendered with canaries on grants what doctor asks for them; the same
    configuration run with the grants of a chart rendered with canaries off is named."""
    lease = ("--set", "config.statuses.lease_name=canary-doctor-resync")  # one for both
    on = (*lease, "--set", "config.statuses.canaries.enabled=true")
    control_plane.ensure_namespace(RELEASE_NS)
    api = control_plane.api_client()
    accounts = {}
    config: dict[str, Any] = {}
    for release, args in (("can-on", on), ("can-off", lease)):
        docs = helm_template(control_plane, release, *args)
        rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
        if release == "can-on":
            (configmap,) = [d for d in docs if d["kind"] == "ConfigMap"]
            config = yaml.safe_load(configmap["data"]["config.yaml"])
            config.pop("listen", None)
        (accounts[release],) = [d["metadata"]["name"] for d in rbac
                                if d["kind"] == "ServiceAccount"]
        for doc in rbac:
            kubernetes.utils.create_from_dict(api, doc)  # type: ignore[no-untyped-call]
    assert config["statuses"]["canaries"]["enabled"] is True

    code, findings = doctor(control_plane, tmp_path, config, accounts["can-on"], capsys)
    assert [f["check"] for f in findings] == ["rbac"], findings

    code, findings = doctor(control_plane, tmp_path, config, accounts["can-off"], capsys)
    denied = {f["message"].split(" (")[0] for f in findings if f["check"] == "rbac-denied"}
    scopes = [f" in {ns}" for ns in config.get("namespaces") or []] or [" cluster-wide"]
    assert code == 1
    assert denied == {f"the bridge may not {verb} {resource}{scope}"
                      for verb in ("get", "list", "watch") for scope in scopes
                      for resource in ("canaries.flagger.app", "deployments.apps",
                                       "daemonsets.apps")}, denied
