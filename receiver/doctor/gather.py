"""`doctor`'s shell: read the cluster (or manifests), the configuration and Gitea into `Facts`.

Nothing here decides; every read that fails becomes a fact (`readable=False`, `detail`), so one
unreachable peer never hides what the others say. Nothing is written anywhere, and no secret
value leaves this module except inside `Facts` (the checks hash it, never print it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from receiver.config import Settings
from receiver.doctor.checks import required_access
from receiver.doctor.facts import (
    AccessFacts,
    AlertFacts,
    Facts,
    GiteaFacts,
    HookFacts,
    NotificationFacts,
    ProviderFacts,
    ReceiverFacts,
    RepositoryFacts,
    TokenFacts,
)
from receiver.flux.cluster import Cluster, ClusterError
from receiver.flux.objects import FluxObject, consumer_source
from receiver.gitea.client import GiteaClient, GiteaError
from receiver.metrics import Metrics
from receiver.push.receiver_specs import ReceiverSpecs
from receiver.status.locator import Locator
from receiver.status.repos import repo_of
from receiver.status.secrets import SecretReader

NOTIFICATION_GROUP, NOTIFICATION_VERSION = "notification.toolkit.fluxcd.io", "v1beta3"
MAX_REPOSITORIES = 100  # per Gitea instance: a doctor run stays a handful of seconds


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


async def token_facts(cluster: Cluster, receiver: FluxObject) -> TokenFacts:
    ref = receiver.spec.get("secretRef")
    name = _str(ref.get("name")) if isinstance(ref, dict) else ""
    if not name:
        return TokenFacts("")
    secret = f"{receiver.namespace}/{name}"
    try:
        data = await cluster.read_secret(receiver.namespace, name, fresh=True)
    except ClusterError as exc:
        return TokenFacts(secret, readable=False, detail=str(exc))
    if data is None:
        return TokenFacts(secret)
    raw = data.get("token")
    if raw is None:
        return TokenFacts(secret, found=True)
    try:
        value = raw.decode()
    except UnicodeDecodeError:
        return TokenFacts(secret, found=True, has_key=True, utf8=False)
    return TokenFacts(secret, found=True, has_key=True, value=value)


def receiver_repositories(receiver: FluxObject, specs: ReceiverSpecs, locator: Locator,
                          cluster: Cluster) -> tuple[tuple[str, str, str], ...]:
    """(instance, owner, repo) of every Gitea repository the Receiver's objects come from."""
    store = cluster.store
    found: dict[tuple[str, str, str], None] = {}
    for obj in specs.resolved(receiver).objects(store):
        ref = consumer_source(obj)
        source = store.get(ref.key) if ref is not None else None
        repo = repo_of(obj, source, locator.normalise)
        if repo is None:
            continue
        for instance in locator.instances(repo.key):
            found[(instance, repo.owner, repo.name)] = None
    return tuple(found)


async def receiver_facts(settings: Settings, cluster: Cluster) -> list[ReceiverFacts]:
    specs = ReceiverSpecs(settings, cluster.store, Metrics())
    locator = Locator(settings, cluster)
    out: list[ReceiverFacts] = []
    for receiver in sorted(cluster.store.list("Receiver"), key=lambda r: r.key):
        resolved = specs.resolved(receiver)
        compiled, entries = specs.resource_filter(receiver), specs.entry_filters(receiver)
        filter_error = (f"invalid spec.resourceFilter: {compiled}" if isinstance(compiled, str)
                        else f"invalid spec.resources[].filter: {entries}"
                        if isinstance(entries, str) else None)
        events = receiver.spec.get("events")
        out.append(ReceiverFacts(
            receiver.namespace, receiver.name, _str(receiver.spec.get("type")),
            await token_facts(cluster, receiver), receiver.suspended,
            tuple(e for e in events if isinstance(e, str)) if isinstance(events, list) else (),
            len(resolved.ordered) + len(resolved.annotate_only),
            tuple(f"{i.kind} {i.namespace}/{i.name}: {i.reason}" for i in resolved.issues),
            filter_error, receiver_repositories(receiver, specs, locator, cluster)))
    return out


Sources = dict[str, dict[tuple[str, str], set[tuple[str, str]]]]


def status_repositories(settings: Settings, cluster: Cluster) -> tuple[Sources, list[str]]:
    """instance -> (owner, repo) -> the GitRepositories (ns/name, normalised URL) in the cache
    that pull from it (statuses go there, whether or not a Receiver lists them); and the
    GitRepositories no configured instance serves."""
    locator = Locator(settings, cluster)
    found: Sources = {}
    unserved: list[str] = []
    for source in sorted(cluster.store.list("GitRepository"), key=lambda o: o.key):
        repo = repo_of(source, None, locator.normalise)
        if repo is None:
            continue
        instances = locator.instances(repo.key)
        if not instances:
            unserved.append(f"{source.namespace}/{source.name} {source.spec.get('url')}")
        for instance in instances:
            found.setdefault(instance, {}).setdefault((repo.owner, repo.name), set()).add(
                (f"{source.namespace}/{source.name}", repo.key))
    return found, unserved


async def repository_facts(client: GiteaClient, instance: str, owner: str, repo: str,
                           sources: Iterable[tuple[str, str]],
                           normalise: Callable[[str], str | None]) -> RepositoryFacts:
    path = f"repos/{quote(owner, safe='')}/{quote(repo, safe='')}"
    known = tuple(sorted(sources))
    try:
        body = (await client.get(instance, path)).json()
    except GiteaError as exc:
        return RepositoryFacts(owner, repo, found=False, error=str(exc), sources=known)
    urls = [body.get(k) for k in ("clone_url", "html_url", "ssh_url")] if isinstance(
        body, dict) else []
    push_keys = tuple(sorted({k for u in urls if isinstance(u, str) and u
                              for k in [normalise(u)] if k}))
    permissions = body.get("permissions") if isinstance(body, dict) else None
    pushes = permissions.get("push") if isinstance(permissions, dict) else None
    can_push = pushes if isinstance(pushes, bool) else None
    try:
        status, why = await client.status_write_probe(instance, owner, repo)
        can_post, post_error = (True, "") if status == 422 else (
            (False, why) if status in (401, 403, 404) else (None, why))
    except GiteaError as exc:
        can_post, post_error = None, str(exc)
    try:
        listed = (await client.get(instance, path + "/hooks", params={"limit": 50})).json()
    except GiteaError as exc:
        return RepositoryFacts(owner, repo, can_push=can_push, can_post=can_post,
                               post_error=post_error, hooks_error=str(exc),
                               push_keys=push_keys, sources=known)
    try:  # an organisation's webhooks fire for its repositories too
        org = (await client.get(instance, f"orgs/{quote(owner, safe='')}/hooks",
                                params={"limit": 50})).json()
    except GiteaError:
        org = []  # a user's repository (404), or not the organisation's admin
    hooks = tuple(
        HookFacts(_str((h.get("config") or {}).get("url")), bool(h.get("active")),
                  tuple(e for e in h.get("events") or [] if isinstance(e, str)),
                  _str(h.get("type")))
        for h in [*(listed if isinstance(listed, list) else []),
                  *(org if isinstance(org, list) else [])] if isinstance(h, dict))
    return RepositoryFacts(owner, repo, can_push=can_push, can_post=can_post,
                           post_error=post_error, hooks=hooks, push_keys=push_keys,
                           sources=known)


async def gitea_facts(settings: Settings, reader: SecretReader, client: GiteaClient,
                      repositories: Sources,
                      normalise: Callable[[str], str | None]) -> list[GiteaFacts]:
    out: list[GiteaFacts] = []
    for instance in settings.gitea:
        name = instance.name
        try:
            token = await reader.read(instance.token, fresh=True)
        except Exception as exc:  # a file or Secret that is missing: a fact, not a crash
            out.append(GiteaFacts(name, instance.url, token_problem=f"token: {exc}"))
            continue
        if not token.strip():
            out.append(GiteaFacts(name, instance.url, token_problem="token is blank"))  # noqa: S106
            continue
        try:
            version = _str((await client.get(name, "version")).json().get("version"))
        except GiteaError as exc:
            if exc.status == 0:
                out.append(GiteaFacts(name, instance.url, reachable=False,
                                      reach_error=str(exc)))
                continue
            version = ""
        try:
            user = _str((await client.get(name, "user")).json().get("login"))
            authenticated, auth_error = True, ""
        except GiteaError as exc:
            # 403: the token is good but may not read its user (no read:user scope, which the
            # bridge does not need); 401: Gitea does not know the token.
            user, authenticated, auth_error = "", exc.status == 403, str(exc)
        repos: list[RepositoryFacts] = []
        if authenticated:
            served = repositories.get(name, {})
            wanted = sorted(served)[:MAX_REPOSITORIES]
            repos = list(await asyncio.gather(
                *(repository_facts(client, name, owner, repo, served[(owner, repo)], normalise)
                  for owner, repo in wanted)))
        out.append(GiteaFacts(name, instance.url, version=version, authenticated=authenticated,
                              auth_error=auth_error, user=user, repositories=tuple(repos)))
    return out


def notification_facts_from(docs: Iterable[Mapping[str, Any]]) -> NotificationFacts:
    """Alerts and Providers from objects as the API server or manifests hold them."""
    providers: list[ProviderFacts] = []
    alerts: list[AlertFacts] = []
    for doc in docs:
        meta = doc.get("metadata") or {}
        spec = doc.get("spec") or {}
        namespace, name = _str(meta.get("namespace")) or "default", _str(meta.get("name"))
        if doc.get("kind") == "Provider":
            address = _str(spec.get("address"))
            providers.append(ProviderFacts(
                namespace, name, _str(spec.get("type")), address, spec.get("suspend") is True,
                address_in_secret=not address and isinstance(spec.get("secretRef"), dict)))
        elif doc.get("kind") == "Alert":
            ref = spec.get("providerRef") or {}
            alerts.append(AlertFacts(namespace, name, _str(ref.get("name")),
                                     spec.get("suspend") is True))
    return NotificationFacts(True, "", tuple(providers), tuple(alerts))


# -- the Kubernetes API (only when doctor reads a cluster) -------------------------------------


def access_reviews(api_client: Any, needs: Sequence[AccessFacts]) -> list[AccessFacts]:
    """One SelfSubjectAccessReview per need, as the identity the client runs as (the bridge's
    ServiceAccount in its pod, or `--as`)."""
    import kubernetes

    from receiver.flux.kube_api import read_json, status_message

    auth = kubernetes.client.AuthorizationV1Api(api_client)
    out: list[AccessFacts] = []
    for need in needs:
        attributes = {"verb": need.verb, "group": need.group, "resource": need.resource}
        if need.namespace:
            attributes["namespace"] = need.namespace
        if need.name:
            attributes["name"] = need.name
        body: Any = {"apiVersion": "authorization.k8s.io/v1",
                     "kind": "SelfSubjectAccessReview",
                     "spec": {"resourceAttributes": attributes}}
        try:
            answer = auth.create_self_subject_access_review(body, _preload_content=False)
            status = read_json(answer).get("status") or {}
            out.append(replace(need, allowed=bool(status.get("allowed"))))
        except Exception as exc:
            out.append(replace(need, allowed=None, detail=(
                f"cannot ask the API server: {status_message(exc) or type(exc).__name__}")))
    return out


def list_notifications(api_client: Any, namespaces: Sequence[str]) -> NotificationFacts:
    import kubernetes

    from receiver.flux.kube_api import read_json, status_message

    custom = kubernetes.client.CustomObjectsApi(api_client)
    docs: list[dict[str, Any]] = []
    for plural, kind in (("providers", "Provider"), ("alerts", "Alert")):
        scopes: list[str | None] = [*namespaces] or [None]
        for namespace in scopes:
            try:
                if namespace is None:
                    answer = custom.list_cluster_custom_object(
                        NOTIFICATION_GROUP, NOTIFICATION_VERSION, plural, _preload_content=False)
                else:
                    answer = custom.list_namespaced_custom_object(
                        NOTIFICATION_GROUP, NOTIFICATION_VERSION, namespace, plural,
                        _preload_content=False)
            except Exception as exc:
                return NotificationFacts(False, f"cannot list {plural}: "
                                                f"{status_message(exc) or type(exc).__name__}")
            docs += [{**item, "kind": kind} for item in read_json(answer).get("items") or []]
    return notification_facts_from(docs)


async def gather(settings: Settings, cluster: Cluster, *, source: str, base_url: str = "",
                 api_client: Any = None, lease_namespace: str = "",
                 notifications: NotificationFacts | None = None,
                 gitea_transport: Any = None, cluster_synced: bool = True) -> Facts:
    """Everything `diagnose` reads. `api_client`: the Kubernetes client for the RBAC reviews
    and the Alerts (None on manifests); `notifications` given when read elsewhere."""
    reader = SecretReader(settings, cluster, time.monotonic)
    unreadable = await reader.unreadable()
    receivers = await receiver_facts(settings, cluster)
    repositories, unserved = status_repositories(settings, cluster)
    for r in receivers:
        for instance, owner, repo in r.repositories:
            repositories.setdefault(instance, {}).setdefault((owner, repo), set())

    async def read_token(source_: Any, fresh: bool) -> str:
        return await reader.read(source_, fresh)

    client = GiteaClient(settings.gitea, read_token, transport=gitea_transport)
    try:
        gitea = await gitea_facts(settings, reader, client, repositories,
                                  cluster.store.normalise_url)
    finally:
        await client.aclose()
    access: list[AccessFacts] = []
    if api_client is not None:
        from receiver.flux.kube_api import resource_for

        def plural(kind: str) -> tuple[str, str]:
            group, _, resource = resource_for(kind)
            return group, resource

        needs = required_access(settings.namespaces, lease_namespace,
                                settings.statuses.lease_name, plural,
                                settings.statuses.canaries.enabled)
        access = await asyncio.to_thread(access_reviews, api_client, needs)
        if notifications is None:
            notifications = await asyncio.to_thread(
                list_notifications, api_client, settings.namespaces)
    return Facts(source, tuple(receivers), tuple(gitea), tuple(access), notifications,
                 unreadable, bool(settings.gitea), base_url, dict(cluster.sync_errors),
                 cluster_synced, tuple(unserved))



def kube_client(impersonate: str = "") -> Any:
    """The Kubernetes client as `serve` configures it (in-cluster config in a pod, else
    KUBECONFIG), acting as `impersonate` when given (like `kubectl --as`)."""
    import kubernetes

    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=config)
    client = kubernetes.client.ApiClient(config)
    if impersonate:
        client.set_default_header(  # type: ignore[no-untyped-call]
            "Impersonate-User", impersonate)
    return client


async def synced(cluster: Cluster, timeout: float, *, give_up_after: float = 3.0) -> bool:
    """Start the cluster's caches and wait (up to `timeout`) for every kind to be listed. A
    kind whose list keeps failing (403, a missing CRD) stops the wait after `give_up_after`:
    the failure is a finding, not a reason to wait out the timeout."""
    await cluster.start()
    deadline = time.monotonic() + timeout
    failing_since: float | None = None
    while not cluster.synced and time.monotonic() < deadline:
        if cluster.sync_errors:
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since >= give_up_after:
                break
        else:
            failing_since = None
        await asyncio.sleep(0.1)
    return cluster.synced
