"""Settings: one YAML file, then `GFB_*` environment overrides, then CLI flags (pydantic).

Secrets never appear here as values: a `SecretSource` names a file or a Kubernetes Secret.
Unknown keys are errors, so a typo fails at start with the key's dotted name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from receiver.templates import StatusTemplates
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

ENV_PREFIX = "GFB_"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretSource(_Model):
    """Where a secret comes from: a file (mounted Secret) or a Kubernetes Secret key."""

    file: Path | None = None
    secret: str | None = Field(default=None, description="namespace/name of a Kubernetes Secret")
    key: str = "token"

    @model_validator(mode="after")
    def _one_source(self) -> SecretSource:
        if (self.file is None) == (self.secret is None):
            raise ValueError("set exactly one of file or secret")
        if self.secret is not None and self.secret.count("/") != 1:
            raise ValueError("secret must be namespace/name")
        return self


class ListenConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)


class ServerConfig(_Model):
    """Connection limits of the HTTP server (uvicorn), and the body deadline the app enforces.

    What these cannot bound (a slow body inside its deadline, header size with httptools,
    connections per client) needs a proxy in front: see docs/security.md.
    """

    # Concurrent connections plus in-flight requests; beyond it uvicorn answers 503.
    limit_concurrency: int = Field(default=1000, ge=1)
    # Pending connections the kernel queues before accept.
    backlog: int = Field(default=2048, ge=1)
    # An idle keep-alive connection is closed after this long.
    timeout_keep_alive_seconds: float = Field(default=5.0, gt=0)
    # The whole request body must arrive within this (408 otherwise); 0 turns it off.
    body_timeout_seconds: float = Field(default=30.0, ge=0)
    # httptools (fast, the default) sets no limit on header size; h11 takes
    # `h11_max_incomplete_event_size` as its limit on a request's head.
    http: Literal["httptools", "h11"] = "httptools"
    h11_max_incomplete_event_size: int = Field(default=64 * 1024, ge=4096)

    def uvicorn_options(self) -> dict[str, Any]:
        """Keyword arguments for `uvicorn.run` / `uvicorn.Config`."""
        return {
            "http": self.http,
            "limit_concurrency": self.limit_concurrency,
            "backlog": self.backlog,
            "timeout_keep_alive": self.timeout_keep_alive_seconds,
            "h11_max_incomplete_event_size": self.h11_max_incomplete_event_size,
        }


class RateLimitConfig(_Model):
    requests_per_second: float = Field(default=50.0, gt=0)
    burst: int = Field(default=100, ge=1)


class ReconcileConfig(_Model):
    source_timeout_seconds: float = Field(default=300.0, gt=0)
    consumer_timeout_seconds: float = Field(default=900.0, gt=0)
    # After a consumer's source has the pushed commit, how long to let Flux start on it by
    # itself before annotating it (an annotation then would cost a second reconcile).
    consumer_grace_seconds: float = Field(default=3.0, ge=0)
    coalesce_window_seconds: float = Field(default=1.0, ge=0)
    patch_attempts: int = Field(default=5, ge=1)


class DeliveriesConfig(_Model):
    max_count: int = Field(default=10_000, ge=1)
    max_age_seconds: float = Field(default=3600.0, gt=0)
    max_wait_seconds: float = Field(default=900.0, gt=0)
    # `?canaries=true`: how long after the deploy a canary's earlier phase is taken as Flagger
    # not having noticed the new revision yet (see receiver/delivery/canary_wait.py).
    canary_pickup_seconds: float = Field(default=60.0, gt=0)


class ShutdownConfig(_Model):
    """SIGTERM to exit. The drain comes first: readiness is false, `?wait` streams end with a
    line that tells the client to ask again, and the listener still accepts and serves, so that
    the endpoints controllers and kube-proxy stop sending traffic here before it stops
    listening. Then requests in progress get `in_flight_seconds` to finish, and the status
    queue `flush_seconds` to drain."""

    drain_seconds: float = Field(default=5.0, ge=0, le=300)
    in_flight_seconds: float = Field(default=10.0, gt=0, le=300)
    flush_seconds: float = Field(default=10.0, ge=0, le=300)

    @property
    def worst_case_seconds(self) -> float:
        """The longest a shutdown takes once SIGTERM arrived (before the watches close)."""
        return self.drain_seconds + self.in_flight_seconds + self.flush_seconds


class GiteaInstance(_Model):
    name: str
    url: str = Field(description="API base of the instance, e.g. https://gitea.example.com/sub")
    token: SecretSource
    hosts: list[str] = Field(default_factory=list, description="repository hosts it serves")
    ca_bundle: Path | None = None
    timeout_seconds: float = Field(default=10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


DEFAULT_CONTEXT = "flux/{cluster}/{kind}/{namespace}/{name}"


class EnvironmentConfig(_Model):
    """One environment of the fleet: its clusters, aggregated as `flux/env/<name>`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    clusters: list[str] = Field(min_length=1)


class FleetConfig(_Model):
    """One aggregate status per commit for the whole fleet (see receiver/status/fleet.py)."""

    enabled: bool = False
    # `owner/name` of the repositories that get it; empty: every repository.
    repositories: list[str] = Field(default_factory=list)
    # The cluster names (`cluster_name` of each region's bridge) that must all report.
    clusters: list[str] = Field(default_factory=list)
    context: str = "flux/fleet"
    # A cluster that has not reported on a commit for this long makes the aggregate `error`.
    stale_after_seconds: float = Field(default=3600.0, gt=0)
    # Ordered environments (staging before production), each aggregated as
    # `<environment_context_prefix><name>` over its clusters.
    environments: list[EnvironmentConfig] = Field(default_factory=list)
    environment_context_prefix: str = "flux/env/"

    @field_validator("repositories")
    @classmethod
    def _repositories(cls, value: list[str]) -> list[str]:
        for name in value:
            owner, _, repo = name.partition("/")
            if not owner or not repo or "/" in repo:
                raise ValueError(f"{name!r} is not owner/name")
        return [name.lower() for name in value]

    @field_validator("clusters")
    @classmethod
    def _clusters(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or any(c in name for c in "{}\n"):
                raise ValueError(f"{name!r} is not a cluster name (non-empty, no braces or "
                                 "newlines)")
        return value

    @field_validator("context")
    @classmethod
    def _context(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _complete(self) -> FleetConfig:
        if self.enabled and not self.clusters:
            raise ValueError("clusters must list the expected cluster names when enabled")
        names = [e.name for e in self.environments]
        if len(set(names)) != len(names):
            raise ValueError("environments: names must be unique")
        for env in self.environments:
            strangers = sorted(set(env.clusters) - set(self.clusters))
            if strangers:
                raise ValueError(f"environment {env.name}: {strangers} not in clusters")
        return self

    def covers(self, owner: str, repo: str) -> bool:
        return self.enabled and (not self.repositories
                                 or f"{owner}/{repo}".lower() in self.repositories)


class PreviewConfig(_Model):
    """Pull-request previews (objects annotated `event.toolkit.fluxcd.io/change_request`)."""

    # One comment per pull request and cluster listing the preview objects, edited in place.
    comments: bool = True
    # One comment per merged pull request and cluster once its merge commit is deployed.
    deployed_comments: bool = True
    # Only pull requests merged this recently get one (not every old merge on a first start).
    deployed_within_seconds: float = Field(default=7 * 86400.0, gt=0)
    # At most one write of a comment per this many seconds; changes in between coalesce.
    comment_interval_seconds: float = Field(default=10.0, ge=0, le=3600)


class GateConfig(_Model):
    """A promotion gate Flagger asks (`confirm-rollout`, `confirm-promotion`, `rollback`): the
    commit statuses the analysed commit must show in Gitea (see receiver/status/gates.py)."""

    # Contexts that must all show `success` (e.g. `flux/env/staging`, `approve/production`).
    require: list[str] = Field(min_length=1)

    @field_validator("require")
    @classmethod
    def _contexts(cls, value: list[str]) -> list[str]:
        if any(not c.strip() for c in value):
            raise ValueError("contexts must not be empty")
        return [c.strip() for c in value]


class CanaryConfig(_Model):
    """Flagger Canaries as commit statuses, and promotion gates (receiver/status/canaries.py)."""

    enabled: bool = False
    # Placeholders: cluster, namespace, name (of the Canary).
    context_template: str = "flagger/{cluster}/{namespace}/{name}"
    # What Flagger's webhooks carry in their `metadata.token`; unset: every webhook is refused.
    webhook_token: SecretSource | None = None
    gates: dict[str, GateConfig] = Field(default_factory=dict)

    @field_validator("context_template")
    @classmethod
    def _template(cls, value: str) -> str:
        from receiver.templates import check_template

        problem = check_template(value, frozenset({"cluster", "namespace", "name"}))
        if problem:
            raise ValueError(problem)
        return value


class StatusConfig(_Model):
    context_template: str = DEFAULT_CONTEXT
    # A named context template instead of `context_template`: `notification-controller`
    # reproduces the contexts of its gitea Provider (`kind/name/<uid8>`, lower-cased), with
    # `provider_uid` the UID of the Provider being replaced, so branch protection rules hold.
    context_preset: Literal["notification-controller"] | None = None
    provider_uid: str = ""
    target_url_template: str = ""
    queue_size: int = Field(default=10_000, ge=1)
    max_attempts: int = Field(default=8, ge=1)
    resync_interval_seconds: float = Field(default=300.0, gt=0)
    lease_name: str = "gitea-flux-bridge-resync"
    lease_duration_seconds: int = Field(default=60, ge=10)
    # How long a replica believes what it posted or read from Gitea. It only ever suppresses
    # an exact repeat; other replicas post to the same Gitea, so it stays short (0: always
    # ask Gitea before posting).
    repeat_window_seconds: float = Field(default=5.0, ge=0, le=60)
    # Gitea GET requests (listing pages) one resync run may make; the next run carries on.
    resync_read_budget: int = Field(default=200, ge=1)
    fleet: FleetConfig = FleetConfig()
    previews: PreviewConfig = PreviewConfig()
    canaries: CanaryConfig = CanaryConfig()

    @model_validator(mode="after")
    def _fleet(self) -> StatusConfig:
        from receiver.templates import FleetTemplateError, cluster_parser

        if not self.fleet.enabled:
            return self
        if self.context_preset is not None:
            raise ValueError(f"fleet: context_preset {self.context_preset} has no {{cluster}} in "
                             "its contexts, so the fleet status cannot tell which cluster a "
                             "status belongs to; use statuses.context_template with {cluster}")
        try:
            cluster_parser(self.context_template, self.fleet.clusters)
            if self.canaries.enabled:
                cluster_parser(self.canaries.context_template, self.fleet.clusters,
                               require_kind=False)
        except FleetTemplateError as exc:
            raise ValueError(f"fleet: {exc}") from None
        return self

    @model_validator(mode="after")
    def _preset(self) -> StatusConfig:
        if self.context_preset is None:
            return self
        if self.context_template != DEFAULT_CONTEXT:
            raise ValueError("set either context_template or context_preset, not both")
        if not self.provider_uid.strip() or self.provider_uid.strip().startswith("-"):
            raise ValueError(f"context_preset {self.context_preset} needs provider_uid: the "
                             "metadata.uid of the Provider whose contexts it reproduces")
        return self

    def templates(self, cluster: str) -> StatusTemplates:
        from receiver.templates import CONTEXT_PRESETS, StatusTemplates, uid_prefix

        context, lower = self.context_template, False
        if self.context_preset is not None:
            context, lower = CONTEXT_PRESETS[self.context_preset]
        return StatusTemplates(cluster, context, self.target_url_template,
                               uid_prefix(self.provider_uid), lower)

    @field_validator("context_template", "target_url_template")
    @classmethod
    def _template(cls, value: str, info: ValidationInfo) -> str:
        from receiver.templates import CONTEXT_FIELDS, TARGET_URL_FIELDS, check_template

        allowed = CONTEXT_FIELDS if info.field_name == "context_template" else TARGET_URL_FIELDS
        problem = check_template(value, allowed)
        if problem:
            raise ValueError(problem)
        return value


class EventsConfig(_Model):
    hmac_token: SecretSource | None = None
    bearer_token: SecretSource | None = None


class InsecureConfig(_Model):
    allow_unsigned_generic: bool = False
    allow_unsigned_events: bool = False


class Settings(_Model):
    listen: ListenConfig = ListenConfig()
    server: ServerConfig = ServerConfig()
    body_limit_bytes: int = Field(default=3 * 1024 * 1024, ge=1024)
    rate_limit: RateLimitConfig = RateLimitConfig()
    namespaces: list[str] = Field(default_factory=list)
    cluster_name: str = "default"
    host_aliases: dict[str, str] = Field(default_factory=dict)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    allow_cross_namespace_refs: bool = True
    secret_cache_seconds: float = Field(default=30.0, ge=0)
    delivery_dedupe_seconds: float = Field(default=3600.0, gt=0)
    manifests: Path | None = None
    reconcile: ReconcileConfig = ReconcileConfig()
    deliveries: DeliveriesConfig = DeliveriesConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    gitea: list[GiteaInstance] = Field(default_factory=list)
    statuses: StatusConfig = StatusConfig()
    events: EventsConfig = EventsConfig()
    badge_key: SecretSource | None = None
    insecure: InsecureConfig = InsecureConfig()

    def gitea_prefixes(self) -> frozenset[str]:
        """Where the configured Gitea instances keep repositories (`owner/name` pushes)."""
        from receiver.giturls import gitea_prefixes

        return gitea_prefixes([g.url for g in self.gitea],
                              [h for g in self.gitea for h in g.hosts], self.host_aliases)

    @model_validator(mode="after")
    def _fleet_member(self) -> Settings:
        fleet = self.statuses.fleet
        if fleet.enabled and self.cluster_name not in fleet.clusters:
            raise ValueError(f"statuses.fleet.clusters {fleet.clusters} does not list this "
                             f"bridge's cluster_name {self.cluster_name!r}")
        return self

    @field_validator("cluster_name")
    @classmethod
    def _cluster_name(cls, value: str) -> str:
        if not value or any(c in value for c in "{}\n"):
            raise ValueError("must be a non-empty name without braces or newlines")
        return value
