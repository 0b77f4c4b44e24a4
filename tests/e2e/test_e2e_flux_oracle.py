"""Flux's own notification-controller as the oracle for the bridge's `/hook/{digest}`.

The same requests (empty body, a Gitea push body, arbitrary JSON, non-JSON text) go, with the
signature each Receiver type needs, to notification-controller's receiver server and to the
bridge, for Receivers of every type: `github` with `events: ["push"]` and with none, `generic`,
`generic-hmac`, and two with a `resourceFilter` (one on `res`, one on `req`). For each request
the test records both status codes and the objects whose `reconcile.fluxcd.io/requestedAt`
changed (read from the API server), prints the table, and asserts:

- every request Flux answers 200 the bridge answers 2xx;
- the bridge's annotated set is a subset of Flux's, and every object of Flux's set the bridge
  left alone is named in its reply or in its delivery (`skipped` with a reason, `tracked`, or
  a target whose state says why it was not annotated).

Design: twin object sets. Each case has two namespaces of identical shape, `orc-nc-<case>`
(listed by the Receiver notification-controller is sent to) and `orc-br-<case>` (listed by the
Receiver the bridge is sent to), each with a GitRepository `fleet` and Kustomizations `apps`
and `infra`, and one token for both. Sending to one and then the other on one set would make
the second see the first's annotations and patches in flight (the bridge's coalescing and
delivery marks, controllers reacting to NC's patch); twins keep every measurement independent
and let all cases run in parallel. Both processes index every Receiver: the test checks that
NC's `status.webhookPath` is the digest the bridge computes.

The GitRepositories point at a loopback port where nothing listens and whose repository is the
one the push body names, so no Gitea is needed: notification-controller annotates regardless,
and source-controller answers the bridge's annotation at once (Ready=False). The bridge
annotates consumers only once their source has the commit (Flux's `--with-source` order), so
its Kustomizations stay unannotated here and the reply/delivery says why. The bridge runs with
`insecure.allow_unsigned_generic: true`: Flux's `generic` Receiver takes unsigned requests and
the bridge refuses them unless that switch is on.

    python -m pytest tests/e2e/test_e2e_flux_oracle.py -q -s     (-s prints the table)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests import gitea_payloads
from tests.e2e import e2e_env as e2e
from tests.e2e.e2e_harness import BridgeProcess, FluxControllers, e2e_peers
from tests.e2e.realk8s import ControlPlane, ControlPlaneError, free_port, wait_until

pytestmark = pytest.mark.e2e

OBJECTS = (("GitRepository", "fleet"), ("Kustomization", "apps"), ("Kustomization", "infra"))
RECEIVER = "hook"
BRIDGE_WAIT = 4.0  # seconds a delivery may take to settle before the bridge's set is read
NC_WAIT = 1.5  # after a 200 from NC: its patches are synchronous, this only bounds a slow read


@dataclass(frozen=True)
class Case:
    name: str
    type: str
    events: tuple[str, ...] = ()
    resource_filter: str = ""

    @property
    def repo(self) -> str:
        """Each case's twins follow their own repository: a push names one case only."""
        return f"platform/{self.name}"

    @property
    def label(self) -> str:
        extra = f" events={list(self.events)}" if self.type == "github" else ""
        if self.resource_filter:
            extra += f" filter={self.resource_filter}"
        return f"{self.type}{extra}"


CASES = (
    Case("gh-push", "github", events=("push",)),
    Case("gh-any", "github"),
    Case("generic", "generic"),
    Case("hmac", "generic-hmac"),
    Case("filter-res", "generic-hmac", resource_filter="res.metadata.name == 'apps'"),
    Case("filter-req", "github", events=("push",),
         resource_filter="req.ref == 'refs/heads/main'"),
)
KINDS = ("empty", "json", "text", "gitea-push")


@dataclass
class Row:
    kind: str
    case: Case
    nc_code: int = 0
    bridge_code: int = 0
    nc_set: set[str] = field(default_factory=set)
    bridge_set: set[str] = field(default_factory=set)
    explained: dict[str, str] = field(default_factory=dict)
    bridge_reply: dict[str, Any] = field(default_factory=dict)

    def explanation(self) -> str:
        parts = [f"{k}: {v}" for k, v in sorted(self.explained.items())]
        if not parts and self.bridge_code >= 400:
            parts.append(str(self.bridge_reply.get("error") or self.bridge_reply)[:60])
        return "; ".join(parts) or "-"


@dataclass
class Oracle:
    plane: ControlPlane
    flux: FluxControllers
    bridge: BridgeProcess
    token: str
    repo_root: str
    paths: dict[str, str] = field(default_factory=dict)  # namespace -> webhook path

    def requested(self, ns: str) -> dict[str, str]:
        found = {}
        for kind, name in OBJECTS:
            obj = e2e.get_object(self.plane, kind, ns, name)
            found[f"{kind}/{name}"] = (obj["metadata"].get("annotations") or {}).get(e2e.RECONCILE, "")
        return found

    def changed(self, ns: str, before: dict[str, str]) -> set[str]:
        return {k for k, v in self.requested(ns).items() if v != before.get(k, "")}


def _objects(plane: ControlPlane, ns: str, case: Case, token: str, repo_url: str) -> None:
    e2e.create_secret(plane, ns, "hook-token", {"token": token})
    e2e.git_repository(plane, ns, "fleet", repo_url, timeout="10s", auth=None)
    for name in ("apps", "infra"):
        e2e.kustomization(plane, ns, name, f"./{name}", source=("GitRepository", "fleet"),
                          timeout=None)
    e2e.receiver(plane, ns, RECEIVER, case.type, "hook-token", OBJECTS,
                 events=list(case.events) if case.type == "github" else None,
                 resource_filter=case.resource_filter)


def _webhook_path(plane: ControlPlane, ns: str) -> str | None:
    obj = e2e.get_object(plane, "Receiver", ns, RECEIVER)
    status = obj.get("status") or {}
    ready = e2e.condition(obj, "Ready").get("status") == "True"
    path = status.get("webhookPath")
    return str(path) if ready and path else None


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Oracle]:
    bin_dir, _ = e2e_peers(gitea=False)
    workdir = tmp_path_factory.mktemp("oracle")
    with e2e.stopping() as teardown:
        plane = e2e.start_plane(bin_dir, teardown, e2e.FLUX_NS)
        flux = e2e.start_flux(bin_dir, plane, workdir / "flux", teardown,
                              ("source-controller", "notification-controller"))
        bridge = BridgeProcess({
            "log_level": "info",
            "insecure": {"allow_unsigned_generic": True},
            "reconcile": {"coalesce_window_seconds": 0.05, "source_timeout_seconds": 60},
        }, plane.kubeconfig, workdir)
        bridge.start()
        teardown.append(bridge.stop)

        # Nothing listens on this port: sources fail at once, never fetch.
        repo_root = f"http://127.0.0.1:{free_port()}/"
        env = Oracle(plane, flux, bridge, secrets.token_hex(16), repo_root)
        for case in CASES:
            for side in ("nc", "br"):
                ns = f"orc-{side}-{case.name}"
                plane.ensure_namespace(ns)
                _objects(plane, ns, case, env.token, f"{repo_root}{case.repo}.git")
        bridge.wait_receivers(2 * len(CASES))
        for case in CASES:
            nc_ns, br_ns = f"orc-nc-{case.name}", f"orc-br-{case.name}"
            path = wait_until(f"NC's Receiver in {nc_ns} to be ready",
                              lambda ns=nc_ns: _webhook_path(plane, ns), 60,  # type: ignore[misc]
                              interval=0.2, on_timeout=lambda: flux.logs(20))
            assert path == e2e.hook_path(env.token, RECEIVER, nc_ns), path
            env.paths[nc_ns] = path
            env.paths[br_ns] = e2e.hook_path(env.token, RECEIVER, br_ns)
        yield env


# -- requests ---------------------------------------------------------------------------------


def _body(kind: str, repo: str, repo_root: str) -> tuple[bytes, str]:
    if kind == "empty":
        return b"", "application/json"
    if kind == "json":
        return b'{"action":"deploy"}', "application/json"
    if kind == "text":
        return b"deploy please", "text/plain"
    commit = gitea_payloads.commit(repo, "apps: release 2", modified=["apps/settings.yaml"],
                                   root=repo_root)
    doc = gitea_payloads.push(repo, commits=[commit], root=repo_root)
    return gitea_payloads.gitea_bytes(doc), "application/json"


def _headers(case: Case, kind: str, body: bytes, content_type: str, token: str) -> dict[str, str]:
    headers = {"Content-Type": content_type}
    digest = hmac.new(token.encode(), body, hashlib.sha256).hexdigest()
    if case.type == "github":
        # As Gitea sends a webhook: both signatures, both event headers, a delivery id.
        headers.update({"X-Gitea-Signature": digest, "X-Hub-Signature-256": f"sha256={digest}",
                        "X-GitHub-Event": "push", "X-Gitea-Event": "push",
                        "X-Gitea-Delivery": str(uuid.uuid4())})
    elif case.type == "generic-hmac":
        headers["X-Signature"] = f"sha256={digest}"
    return headers


def _explain(row: Row, ns: str, reply: dict[str, Any], view: dict[str, Any]) -> None:
    """Why each object of NC's set the bridge did not annotate was left: from its reply (skipped,
    tracked) and its delivery (each target's final state), for the objects of namespace `ns`."""
    reasons: dict[str, str] = {}

    def mine(entries: Any) -> list[dict[str, Any]]:
        return [e for e in entries or [] if e.get("namespace") == ns]

    for entry in mine(reply.get("skipped")):
        reasons[f"{entry['kind']}/{entry['name']}"] = f"skipped ({entry.get('reason', '')})"
    for entry in mine(reply.get("tracked")):
        reasons.setdefault(f"{entry['kind']}/{entry['name']}", "tracked")
    for entry in mine(view.get("targets") or reply.get("targets")):
        key = f"{entry['kind']}/{entry['name']}"
        detail = entry.get("detail") or {}
        why = detail.get("reason") or detail.get("message") or ""
        reasons[key] = f"{entry.get('state', '?')}" + (f" ({why})" if why else "")
    if reply.get("status"):  # answered without a delivery (ignored, pong, duplicate)
        said = f"{reply['status']}: {reply.get('reason', '')}".rstrip(": ")
        reasons.update(dict.fromkeys(row.nc_set, said))
    row.explained = {k: reasons[k] for k in row.nc_set - row.bridge_set if k in reasons}


def _delivery_view(env: Oracle, delivery_id: str) -> dict[str, Any]:
    """The delivery's last state, waiting up to BRIDGE_WAIT for it to settle."""
    with httpx.Client(trust_env=False, timeout=BRIDGE_WAIT + 10) as client:
        response = client.get(f"{env.bridge.url}/deliveries/{delivery_id}",
                              params={"wait": str(BRIDGE_WAIT)},
                              headers={"Authorization": f"Bearer {env.token}"})
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
    views = [v for v in lines if "targets" in v]
    return views[-1] if views else {}


def _run(env: Oracle, case: Case, kind: str) -> Row:
    row = Row(kind, case)
    body, content_type = _body(kind, case.repo, env.repo_root)
    headers = _headers(case, kind, body, content_type, env.token)
    nc_ns, br_ns = f"orc-nc-{case.name}", f"orc-br-{case.name}"
    with httpx.Client(trust_env=False, timeout=30.0) as client:
        before = env.requested(nc_ns)
        response = client.post(env.flux.receiver_url + env.paths[nc_ns], content=body,
                               headers=headers)
        row.nc_code = response.status_code
        if row.nc_code == 200:
            # NC patches before it answers; wait (bounded) in case a read lags behind.
            try:
                row.nc_set = wait_until("NC's annotations",
                                        lambda: env.changed(nc_ns, before) or None,
                                        NC_WAIT, interval=0.1)
            except ControlPlaneError:
                row.nc_set = set()
        else:
            row.nc_set = env.changed(nc_ns, before)

        before = env.requested(br_ns)
        response = client.post(env.bridge.url + env.paths[br_ns], content=body, headers=headers)
        row.bridge_code = response.status_code
    with_json = response.headers.get("content-type", "").startswith("application/json")
    reply: dict[str, Any] = response.json() if with_json and response.content else {}
    row.bridge_reply = reply
    view: dict[str, Any] = {}
    if row.bridge_code == 202:
        view = _delivery_view(env, str(reply["delivery"]))
        # What the delivery says was annotated must be on the API server by now.
        said = {f"{t['kind']}/{t['name']}" for t in view.get("targets") or []
                if t.get("namespace") == br_ns and t.get("role") == "annotate"
                and t.get("state") in ("annotated", "reconciling", "ready")
                and (t.get("detail") or {}).get("reason") != "AlreadyStarted"}

        def annotated() -> set[str] | None:
            found = env.changed(br_ns, before)
            return found if found >= said else None

        wait_until("the bridge's annotations on the API server", annotated, 10, interval=0.1,
                   on_timeout=lambda: f"{said} / {view}\n{env.bridge.tail(20)}")
    row.bridge_set = env.changed(br_ns, before)
    _explain(row, br_ns, reply, view)
    return row


def _table(rows: list[Row]) -> str:
    head = ("request", "receiver", "NC", "bridge", "NC set", "bridge set", "explanation")

    def short(names: set[str]) -> str:
        return ",".join(sorted(n.replace("GitRepository/", "src/").replace("Kustomization/", "ks/")
                               for n in names)) or "-"

    lines = [(r.kind, r.case.label, str(r.nc_code), str(r.bridge_code), short(r.nc_set),
              short(r.bridge_set), r.explanation()) for r in rows]
    widths = [max(len(x[i]) for x in (head, *lines)) for i in range(len(head) - 1)]
    out = []
    for line in (head, *lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False))
                   + "  " + line[-1])
    return "\n".join(out)


def test_bridge_answers_and_annotates_within_flux(oracle: Oracle) -> None:
    started = time.monotonic()

    def case_rows(case: Case) -> list[Row]:
        return [_run(oracle, case, kind) for kind in KINDS]

    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        rows = [row for found in pool.map(case_rows, CASES) for row in found]
    print(f"\n=== Flux notification-controller vs the bridge ({time.monotonic() - started:.1f}s;"
          " bridge with insecure.allow_unsigned_generic: true for the generic Receiver) ===")
    print(_table(rows))

    problems = []
    for row in rows:
        where = f"{row.kind} -> {row.case.label}"
        if row.nc_code == 200 and not 200 <= row.bridge_code < 300:
            problems.append(f"{where}: Flux 200, bridge {row.bridge_code} {row.bridge_reply}")
        if not row.bridge_set <= row.nc_set:
            problems.append(f"{where}: the bridge annotated {row.bridge_set - row.nc_set} "
                            f"beyond Flux's {row.nc_set}")
        unexplained = row.nc_set - row.bridge_set - set(row.explained)
        if unexplained and 200 <= row.bridge_code < 300:
            problems.append(f"{where}: {unexplained} left out without a reason "
                            f"({row.bridge_reply})")
    assert not problems, "\n".join(problems)
    # The oracle is not vacuous: Flux annotated something, and so did the bridge.
    assert any(r.nc_set for r in rows) and any(r.bridge_set for r in rows)
