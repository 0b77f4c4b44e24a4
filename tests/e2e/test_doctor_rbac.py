"""`doctor` checks the bridge's RBAC against a real kube-apiserver, as the chart's ServiceAccount
(`--as`, SelfSubjectAccessReview per verb): the chart's own RBAC passes, and a grant taken
away is named with what the bridge needs it for."""

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
           capsys: pytest.CaptureFixture[str]) -> tuple[int, list[dict[str, Any]]]:
    """`gitea-flux-bridge doctor --as <the ServiceAccount>` with an admin kubeconfig."""
    kubeconfig = plane.write_kubeconfig(tmp_path / "admin.yaml", plane.admin_token)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    with _kubeconfig_env(kubeconfig):
        code = main(["doctor", "--config", str(config_file), "--output", "json",
                     "--as", f"system:serviceaccount:{RELEASE_NS}:{sa}",
                     "--namespace", RELEASE_NS, "--timeout", "60"])
    report = json.loads(capsys.readouterr().out)
    return code, [f for f in report["findings"] if f["subject"] == "RBAC"]


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
