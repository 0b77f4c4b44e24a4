"""`doctor`'s verdicts: everything that would fail without a word, named from gathered facts. Pure.

Each check reads `Facts` only. A `fail` is something that makes pushes or statuses go nowhere
silently (a 404 with no log line, a 202 with no targets, a status never posted); a `warn` is
something doctor could not check, or that works but surprises; `ok` says what was checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from receiver import signatures
from receiver.doctor.facts import (
    AccessFacts,
    Facts,
    GiteaFacts,
    HookFacts,
    NotificationFacts,
    ReceiverFacts,
    RepositoryFacts,
)
from receiver.flux.objects import (
    ANNOTATE_ONLY_KINDS,
    API_VERSIONS,
    CANARY_WATCHED_KINDS,
    OPTIONAL_KINDS,
    ROUTED_KINDS,
)
from receiver.push.hookindex import SUPPORTED_TYPES, usable_token

Severity = Literal["ok", "warn", "fail"]
# Provider types that post Flux's event JSON as it is (the bridge's /events reads that).
FORWARDING_PROVIDER_TYPES = frozenset({"generic", "generic-hmac"})


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    subject: str  # "Receiver ns/name", "Gitea eu", "RBAC", "Flux notifications", "Settings"
    check: str  # a stable name for scripts (`--output json`)
    message: str
    detail: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"severity": self.severity, "subject": self.subject, "check": self.check,
                "message": self.message, **({"detail": dict(self.detail)} if self.detail else {})}


# -- what the bridge needs of the API server --------------------------------------------------


def required_access(namespaces: Sequence[str], lease_namespace: str, lease_name: str,
                    plural: Callable[[str], tuple[str, str]],
                    canaries: bool = False) -> list[AccessFacts]:
    """Every (verb, resource, namespace) the bridge's RBAC must grant, unanswered yet.
    `plural(kind)` is the kind's (group, plural); `canaries`: `statuses.canaries.enabled`
    (then Flagger's Canaries and the workloads they target are read too)."""
    scopes = list(dict.fromkeys(namespaces)) or [""]
    needs: list[AccessFacts] = []
    for namespace in scopes:
        for kind in (*ROUTED_KINDS, *OPTIONAL_KINDS):
            group, resource = plural(kind)
            optional = kind in OPTIONAL_KINDS
            for verb in ("list", "watch"):
                needs.append(AccessFacts(verb, group, resource, namespace, optional=optional,
                                         why=f"cache {kind} objects"))
        for kind in (*ROUTED_KINDS[1:], *ANNOTATE_ONLY_KINDS):
            if kind not in API_VERSIONS:
                continue
            group, resource = plural(kind)
            needs.append(AccessFacts("patch", group, resource, namespace,
                                     why=f"annotate {kind} objects a Receiver lists"))
        needs.append(AccessFacts("get", "", "secrets", namespace,
                                 why="read the Secrets Receivers name"))
        if canaries:
            # The bridge serves without them, but the statuses the settings ask for would
            # never be posted: a failure here, not a warning.
            for kind in CANARY_WATCHED_KINDS:
                group, resource = plural(kind)
                needs += [AccessFacts(verb, group, resource, namespace,
                                      why=f"cache {kind} objects for Flagger canary statuses "
                                          "(statuses.canaries)")
                          for verb in ("get", "list", "watch")]
        needs += [AccessFacts(verb, "", "events", namespace, optional=True,
                              why="write Kubernetes Events on Receivers and annotated objects")
                  for verb in ("create", "patch")]
    group = "coordination.k8s.io"
    needs += [AccessFacts("create", group, "leases", lease_namespace,
                          why="elect the status resync leader"),
              AccessFacts("get", group, "leases", lease_namespace, lease_name,
                          why="elect the status resync leader"),
              AccessFacts("update", group, "leases", lease_namespace, lease_name,
                          why="elect the status resync leader")]
    return needs


# -- hook paths --------------------------------------------------------------------------------


def hook_path(token: str, receiver: ReceiverFacts) -> str:
    return "/hook/" + signatures.hook_digest(token, receiver.name, receiver.namespace)


def hook_readings(receiver: ReceiverFacts) -> dict[str, str]:
    """The hook path Flux and the bridge use (the token as stored), and, for a token ending in
    a newline, the one a tool that drops it computes (`hook-url --token-file`)."""
    token = receiver.token.value
    if token is None:
        return {}
    readings = {"as_stored": hook_path(token, receiver)}
    if token.endswith("\n"):
        readings["without_newline"] = hook_path(token[:-1], receiver)
    return readings


def _url(base: str, path: str) -> str:
    return base.rstrip("/") + path if base else path


# -- the checks --------------------------------------------------------------------------------


def _token_findings(r: ReceiverFacts, base: str) -> list[Finding]:
    subject, t = f"Receiver {r.ref}", r.token
    dead = "its hook path answers 404 and nothing is logged per request"
    if not t.secret:
        return [Finding("fail", subject, "token-missing",
                        f"no spec.secretRef: {dead}")]
    if not t.readable:
        return [Finding("fail", subject, "token-unreadable",
                        f"cannot read Secret {t.secret}: {t.detail}")]
    if not t.found:
        return [Finding("fail", subject, "token-missing", f"Secret {t.secret} not found: {dead}")]
    if not t.has_key:
        return [Finding("fail", subject, "token-missing",
                        f"Secret {t.secret} has no key `token`: {dead}")]
    if not t.utf8 or t.value is None:
        return [Finding("fail", subject, "token-unusable",
                        f"Secret {t.secret} key `token` is not UTF-8 text: {dead}")]
    if not usable_token(t.value):
        return [Finding("fail", subject, "token-blank",
                        f"Secret {t.secret} key `token` is blank (anyone could compute its hook "
                        f"path): {dead}")]
    readings = hook_readings(r)
    urls = {k: _url(base, v) for k, v in readings.items()}
    if "without_newline" in readings:
        return [Finding("fail", subject, "token-trailing-newline", (
            f"Secret {t.secret} key `token` ends in a newline (as `kubectl create secret "
            f"--from-file` keeps it). Flux and the bridge use it as stored: the hook URL is "
            f"{urls['as_stored']}. A tool that drops the newline (hook-url --token-file, a "
            f"secret pasted into Gitea's webhook form) gets {urls['without_newline']}, which "
            "answers 404, or signs with another key (401). Recreate the Secret with "
            "--from-literal, or use `gitea-flux-bridge hook-url --receiver "
            f"{r.ref}`."), {"hook_url": urls["as_stored"],
                            "hook_url_without_newline": urls["without_newline"]})]
    found = [Finding("ok", subject, "token", f"token readable; hook URL {urls['as_stored']}",
                     {"hook_url": urls["as_stored"]})]
    if t.value != t.value.strip():
        found.append(Finding("warn", subject, "token-whitespace", (
            f"Secret {t.secret} key `token` begins or ends with whitespace: Flux and the "
            "bridge keep it, a copy pasted elsewhere may not")))
    return found


def receiver_findings(r: ReceiverFacts, base: str = "") -> list[Finding]:
    subject = f"Receiver {r.ref}"
    if r.type not in SUPPORTED_TYPES:
        return [Finding("fail", subject, "type-unsupported", (
            f"type {r.type or '(none)'!r} is not served by the bridge "
            f"(it serves {', '.join(sorted(SUPPORTED_TYPES))}): its hook path answers 404"))]
    found = _token_findings(r, base)
    if r.suspended:
        found.append(Finding("warn", subject, "suspended",
                             "spec.suspend is true: its hook answers 503"))
    if r.filter_error:
        found.append(Finding("fail", subject, "filter-invalid",
                             f"{r.filter_error}: every request answers 503"))
    issues = "; ".join(r.resource_issues)
    if r.matched == 0:
        found.append(Finding("fail", subject, "no-targets", (
            "its resources name no object the bridge can annotate: every push answers 202 "
            "with `targets: []`, green in Gitea's delivery list" + (f" ({issues})" if issues
                                                                   else ""))))
    else:
        found.append(Finding("ok", subject, "targets", f"{r.matched} object(s) listed"))
        for issue in r.resource_issues:
            found.append(Finding("warn", subject, "resource-entry", issue))
    if r.type == "github" and any(e.lower() == "ping" for e in r.events):
        found.append(Finding("warn", subject, "ping-listed", (
            "spec.events lists ping: Gitea's test delivery reconciles every listed object, "
            "as Flux does (with spec.events empty a ping is answered `pong`; left out of a "
            "non-empty list it is refused, 400)")))
    return found


def _matches(hook: HookFacts, path: str, base: str) -> bool:
    if base:
        return hook.url.rstrip("/") == _url(base, path)
    return urlsplit(hook.url).path.rstrip("/").endswith(path)


def webhook_findings(repo: RepositoryFacts, instance: str, receivers: Iterable[ReceiverFacts],
                     base: str) -> list[Finding]:
    """Does the repository have an active webhook to each github Receiver that routes it?"""
    subject = f"Gitea {instance} {repo.owner}/{repo.repo}"
    found: list[Finding] = []
    for r in receivers:
        readings = hook_readings(r)
        if r.type != "github" or "as_stored" not in readings:
            continue  # a generic Receiver is called from CI; an unusable one is named above
        if repo.hooks is None:
            found.append(Finding("warn", subject, "webhook-unchecked", (
                f"webhooks not listed ({repo.hooks_error}); listing them needs a token whose "
                "user administers the repository")))
            continue
        wanted = readings["as_stored"]
        hooks = repo.hooks
        exact = [h for h in hooks if _matches(h, wanted, base)]
        if exact and any(h.active for h in exact):
            found.append(Finding("ok", subject, "webhook",
                                 f"webhook to Receiver {r.ref} ({_url(base, wanted)})"))
        elif exact:
            found.append(Finding("fail", subject, "webhook-inactive",
                                 f"the webhook to Receiver {r.ref} is not active"))
        elif "without_newline" in readings and any(
                _matches(h, readings["without_newline"], base) for h in hooks):
            found.append(Finding("fail", subject, "webhook-newline", (
                f"the webhook uses {readings['without_newline']}, the hook path of Receiver "
                f"{r.ref}'s token without its trailing newline: Gitea's deliveries answer 404; "
                f"the Receiver's path is {wanted}")))
        else:
            others = sorted({urlsplit(h.url).path for h in hooks if "/hook/" in h.url})
            found.append(Finding("fail", subject, "webhook-missing", (
                f"no webhook to Receiver {r.ref} ({_url(base, wanted)})"
                + (f"; webhooks point at {', '.join(others)} instead" if others else ""))))
    return found


def gitea_findings(g: GiteaFacts, receivers: Sequence[ReceiverFacts], base: str) -> list[Finding]:
    subject = f"Gitea {g.name}"
    if g.token_problem:
        return [Finding("fail", subject, "gitea-token",
                        f"{g.token_problem}: no status can be posted")]
    if not g.reachable:
        return [Finding("fail", subject, "gitea-unreachable",
                        f"{g.url} cannot be reached: {g.reach_error}")]
    found = [Finding("ok", subject, "gitea-reachable",
                     f"{g.url} answers (Gitea {g.version or 'version unknown'})")]
    if g.authenticated is False:
        return [*found, Finding("fail", subject, "gitea-auth",
                                f"the token is refused: {g.auth_error}")]
    if g.authenticated:
        found.append(Finding("ok", subject, "gitea-auth", f"the token authenticates as {g.user}"
                             if g.user else "the token authenticates"))
    for repo in g.repositories:
        rsubject = f"Gitea {g.name} {repo.owner}/{repo.repo}"
        if not repo.found:
            found.append(Finding("fail", rsubject, "repository-missing", (
                f"not found or not visible to the token's user ({repo.error}): statuses "
                "for it are refused")))
            continue
        if repo.can_post is False:
            found.append(Finding("fail", rsubject, "status-permission", (
                f"Gitea would refuse a commit status from this token ({repo.post_error}): it "
                "needs the write:repository scope and write access to the repository")))
        elif repo.can_push is False:
            found.append(Finding("fail", rsubject, "status-permission", (
                "the token's user may not write to it: posting a commit status needs write "
                "access (and a token with the write:repository scope)")))
        elif repo.can_post or repo.can_push:
            found.append(Finding("ok", rsubject, "status-permission",
                                 "the token's user may post commit statuses"))
        if repo.push_keys:
            for source, key in repo.sources:
                if key not in repo.push_keys:
                    found.append(Finding("fail", rsubject, "push-unmatched", (
                        f"GitRepository {source} pulls it as {key}, but Gitea's pushes name it "
                        f"{', '.join(repo.push_keys)}: every push answers 202 with "
                        "`targets: []` (map one host to the other in host_aliases)")))
        routed = [r for r in receivers if (g.name, repo.owner, repo.repo) in r.repositories]
        found += webhook_findings(repo, g.name, routed, base)
    return found


def access_findings(access: Sequence[AccessFacts]) -> list[Finding]:
    found: list[Finding] = []
    for a in access:
        where = f" in {a.namespace}" if a.namespace else " cluster-wide"
        what = f"{a.verb} {a.resource}{'/' + a.name if a.name else ''}" + (
            f".{a.group}" if a.group else "") + where
        if a.allowed is None:
            found.append(Finding("warn", "RBAC", "rbac-unchecked", f"{what}: {a.detail}"))
        elif not a.allowed:
            found.append(Finding("warn" if a.optional else "fail", "RBAC", "rbac-denied",
                                 f"the bridge may not {what} (needed to {a.why})"))
    if access and not found:
        found.append(Finding("ok", "RBAC", "rbac", f"all {len(access)} permissions granted"))
    return found


def forwards_to_bridge(address: str, base: str) -> bool:
    if base:
        return address.rstrip("/") == base.rstrip("/") + "/events"
    return urlsplit(address).path.rstrip("/").endswith("/events")


def notification_findings(n: NotificationFacts | None, statuses: bool,
                          base: str) -> list[Finding]:
    subject = "Flux notifications"
    if not statuses:
        return []
    if n is None:
        return [Finding("warn", subject, "alerts-unchecked",
                        "Alerts and Providers not checked (no cluster)")]
    if not n.listed:
        return [Finding("warn", subject, "alerts-unchecked",
                        f"Alerts and Providers not listed: {n.detail}")]
    providers = {(p.namespace, p.name) for p in n.providers
                 if not p.suspended and p.type in FORWARDING_PROVIDER_TYPES
                 and forwards_to_bridge(p.address, base)}
    alerts = [a for a in n.alerts if not a.suspended and (a.namespace, a.provider) in providers]
    hidden = [f"{p.namespace}/{p.name}" for p in n.providers
              if p.address_in_secret and not p.suspended and p.type in FORWARDING_PROVIDER_TYPES]
    if not providers and hidden:
        return [Finding("warn", subject, "alerts-unchecked", (
            f"Provider(s) {', '.join(hidden)} keep their address in a Secret: doctor cannot tell "
            "whether they post to /events"))]
    if not providers:
        return [Finding("fail", subject, "no-provider", (
            "no generic or generic-hmac Provider posts to the bridge's /events: Flux events never "
            "arrive, and no commit status is posted"))]
    if not alerts:
        return [Finding("fail", subject, "no-alert", (
            "Providers post to /events (" + ", ".join(f"{ns}/{name}" for ns, name in
                                                        sorted(providers))
            + ") but no active Alert uses them: Flux events never arrive"))]
    return [Finding("ok", subject, "alerts", f"{len(alerts)} Alert(s) forward Flux events to "
                                             "/events")]


def diagnose(facts: Facts) -> list[Finding]:
    """Every finding, in the order a reader fixes them: settings, RBAC, Receivers, Gitea,
    then the way back from Flux."""
    base = facts.base_url.rstrip("/")
    found: list[Finding] = []
    for setting, why in sorted(facts.unreadable_secrets.items()):
        found.append(Finding("fail", "Settings", "secret-unreadable",
                             f"{setting}: {why} (/readyz answers 503 until it can be read)"))
    failing = "; ".join(f"{label}: {why}" for label, why in sorted(facts.sync_errors.items()))
    if not facts.synced:
        found.append(Finding("fail", "Cluster", "not-synced", (
            f"the Flux objects could not all be listed ({facts.source})"
            + (f": {failing}" if failing else ""))))
    elif failing:
        found.append(Finding("warn", "Cluster", "cannot-list", failing))
    found += access_findings(facts.access)
    if not facts.receivers:
        found.append(Finding("fail", "Receivers", "no-receivers",
                             f"no Receiver found ({facts.source}): every hook path answers 404"))
    for receiver in facts.receivers:
        found += receiver_findings(receiver, base)
    for instance in facts.gitea:
        found += gitea_findings(instance, facts.receivers, base)
    if facts.statuses_configured:
        for source in facts.unserved_sources:
            found.append(Finding("warn", "Gitea", "source-unserved", (
                f"no configured Gitea instance serves GitRepository {source}: no status is "
                "posted for it (list its host in gitea[].hosts, or map it in host_aliases)")))
    found += notification_findings(facts.notifications, facts.statuses_configured, base)
    return found


def problems(findings: Iterable[Finding]) -> int:
    return sum(1 for f in findings if f.severity == "fail")


MARKS: dict[Severity, str] = {"ok": "✔", "warn": "!", "fail": "✗"}


def render_text(findings: Sequence[Finding]) -> str:
    """One line per finding, grouped by subject in the order found, then a summary line."""
    lines: list[str] = []
    subject = None
    for f in findings:
        if f.subject != subject:
            subject = f.subject
            lines.append(f"{subject}")
        lines.append(f"  {MARKS[f.severity]} {f.message}")
    failed = problems(findings)
    warned = sum(1 for f in findings if f.severity == "warn")
    lines.append(f"{failed} problem(s), {warned} warning(s)" if failed or warned
                 else "no problems found")
    return "\n".join(lines)
