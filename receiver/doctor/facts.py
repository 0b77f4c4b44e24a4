"""What `doctor` gathered from the cluster, the configuration and Gitea: plain data, no I/O.

The gathering shell (`gather`) fills these; the checks (`checks.diagnose`) read nothing else, so
every silent failure they name can be shown with facts built by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TokenFacts:
    """A Receiver's token as Flux and the bridge read it: the Secret's `token` key, raw."""

    secret: str  # namespace/name the Receiver names ("" without a secretRef)
    found: bool = False  # the Secret exists
    readable: bool = True  # False: the API refused to read it (`detail` says why)
    has_key: bool = False
    utf8: bool = True
    value: str | None = None  # the raw token; never printed
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ReceiverFacts:
    namespace: str
    name: str
    type: str
    token: TokenFacts
    suspended: bool = False
    events: tuple[str, ...] = ()
    matched: int = 0  # objects its `resources` name that the bridge can annotate
    resource_issues: tuple[str, ...] = ()  # entries that name nothing, each with its reason
    filter_error: str | None = None  # an invalid resourceFilter or resources[].filter
    # (instance, owner, repo) of the Gitea repositories its listed objects come from.
    repositories: tuple[tuple[str, str, str], ...] = ()

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class HookFacts:
    """One webhook of a Gitea repository (GET /repos/{owner}/{repo}/hooks)."""

    url: str
    active: bool = True
    events: tuple[str, ...] = ()
    type: str = "gitea"


@dataclass(frozen=True, slots=True)
class RepositoryFacts:
    owner: str
    repo: str
    found: bool = True
    error: str = ""  # why the repository could not be read
    can_push: bool | None = None  # permissions.push of the token's user; None: not known
    # Whether Gitea would take a commit status from this token (scope and access), asked
    # without posting one; None: not known. `post_error`: Gitea's answer when not.
    can_post: bool | None = None
    post_error: str = ""
    hooks: tuple[HookFacts, ...] | None = None  # None: could not be listed (`hooks_error`)
    hooks_error: str = ""
    # The repository's URLs as Gitea's pushes name them (clone, html, ssh), normalised as the
    # bridge normalises a push's (host_aliases applied); empty: not known.
    push_keys: tuple[str, ...] = ()
    # (GitRepository ns/name, its normalised URL) of the sources that pull from it.
    sources: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class GiteaFacts:
    name: str
    url: str
    token_problem: str = ""  # the configured token cannot be read, or is blank
    reachable: bool = True
    reach_error: str = ""
    version: str = ""
    authenticated: bool | None = None  # GET /user with the token; None: not asked
    auth_error: str = ""
    user: str = ""
    repositories: tuple[RepositoryFacts, ...] = ()


@dataclass(frozen=True, slots=True)
class AccessFacts:
    """One SelfSubjectAccessReview: may the bridge do `verb` on `resource`?"""

    verb: str
    group: str
    resource: str
    namespace: str = ""  # "" cluster-wide
    name: str = ""
    allowed: bool | None = None  # None: the review could not be made (`detail`)
    optional: bool = False  # the bridge works without it (says so instead of failing)
    why: str = ""  # what the bridge needs it for
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ProviderFacts:
    namespace: str
    name: str
    type: str
    address: str
    suspended: bool = False
    address_in_secret: bool = False  # spec.secretRef holds the address: not readable here


@dataclass(frozen=True, slots=True)
class AlertFacts:
    namespace: str
    name: str
    provider: str  # the Provider's name (same namespace)
    suspended: bool = False


@dataclass(frozen=True, slots=True)
class NotificationFacts:
    """Flux's Alerts and Providers: what forwards Flux events to the bridge's `/events`."""

    listed: bool = True
    detail: str = ""  # why they could not be listed
    providers: tuple[ProviderFacts, ...] = ()
    alerts: tuple[AlertFacts, ...] = ()


@dataclass(frozen=True, slots=True)
class Facts:
    source: str  # "cluster" or "manifests DIR"
    receivers: tuple[ReceiverFacts, ...] = ()
    gitea: tuple[GiteaFacts, ...] = ()
    access: tuple[AccessFacts, ...] = ()  # empty: RBAC not checked (no cluster)
    notifications: NotificationFacts | None = None  # None: not checked
    unreadable_secrets: dict[str, str] = field(default_factory=dict)  # setting -> why
    statuses_configured: bool = False  # a Gitea instance is configured: /events matters
    base_url: str = ""  # the bridge's external URL, when given (webhooks must point at it)
    sync_errors: dict[str, str] = field(default_factory=dict)  # kinds that could not be read
    synced: bool = True  # every kind was listed (False: the cluster could not be read in time)
    # GitRepositories ("ns/name url") whose host no configured Gitea instance serves.
    unserved_sources: tuple[str, ...] = ()
