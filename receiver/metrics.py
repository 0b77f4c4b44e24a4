"""Prometheus metrics, in one registry per app so tests and several apps do not collide.

Names follow Prometheus' conventions: the unit in the name (`_seconds`), `_total` on counters,
`_info` on the build-info gauge, `_timestamp_seconds` on times. Status metrics carry the Gitea
instance (the configured `gitea[].name`) as `gitea_instance`, so one failing Gitea of a mirrored
pair shows. (Not `instance`: Prometheus sets that target label on every series it scrapes and
would rename ours to `exported_instance`.)
The registry also holds the standard `process_*` and `python_*` collectors.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from receiver import __version__

LEAD_TIME_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
GITEA_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf"))
NO_INSTANCE = "-"  # a status dropped before it was assigned to a Gitea instance


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        # process_* (CPU, memory, file descriptors) and python_* (GC, version), as in every
        # Python exporter; per registry, so several apps in one process each have them.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge(
            "gfb_build_info", "Always 1; the labels say which build runs",
            ["version", "python"], registry=r)
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.hook_requests = Counter(
            "gfb_hook_requests_total", "Hook requests by receiver and outcome",
            ["receiver", "outcome"], registry=r)
        self.pushes_unmatched = Counter(
            "gfb_pushes_unmatched_total", "Accepted pushes whose repository no GitRepository "
            "uses, by reason (host_alias_missing, other_repository, other_host)", ["reason"],
            registry=r)
        self.signature_failures = Counter(
            "gfb_signature_failures_total", "Rejected signatures by scheme and reason",
            ["scheme", "reason"], registry=r)
        self.targets_annotated = Counter(
            "gfb_targets_annotated_total", "Objects annotated with reconcile.fluxcd.io/requestedAt",
            ["kind"], registry=r)
        self.annotate_errors = Counter(
            "gfb_annotate_errors_total", "Annotation patches that failed for good",
            ["kind", "status"], registry=r)
        self.patches_coalesced = Counter(
            "gfb_patches_coalesced_total", "Annotation requests served by a patch already due",
            registry=r)
        self.kube_latency = Histogram(
            "gfb_kubernetes_call_seconds", "Kubernetes API call latency",
            ["call", "error"], registry=r)
        self.deliveries = Counter(
            "gfb_deliveries_total", "Deliveries by final outcome", ["outcome"], registry=r)
        self.events = Counter(
            "gfb_events_total", "Flux events received by outcome", ["outcome"], registry=r)
        self.statuses = Counter(
            "gfb_statuses_total", "Gitea commit statuses by Gitea instance and result (posted, "
            "deduplicated, retried, failed)", ["gitea_instance", "result"], registry=r)
        self.pr_comments = Counter(
            "gfb_pr_comments_total", "Pull-request comment writes by Gitea instance and result "
            "(created, edited, deleted, unchanged, yielded)", ["gitea_instance", "result"], registry=r)
        self.gitea_requests = Histogram(
            "gfb_gitea_request_duration_seconds", "Gitea API request latency by instance, call "
            "(post_status, list_statuses, version) and code (HTTP status, or error)",
            ["gitea_instance", "call", "code"], buckets=GITEA_BUCKETS, registry=r)
        self.receivers_unusable = Gauge(
            "gfb_receivers_unusable", "Receivers whose Secret holds no usable token (missing, "
            "empty or whitespace only): their hook path answers 404", registry=r)
        self.receivers_filter_invalid = Gauge(
            "gfb_receivers_filter_invalid", "Receivers whose spec.resourceFilter does not compile "
            "to a bool (Flux marks them Stalled, InvalidCELExpression): their hook answers 503",
            registry=r)
        self.status_queue_depth = Gauge(
            "gfb_status_queue_depth", "Commit statuses waiting to be posted", registry=r)
        self.status_reads = Counter(
            "gfb_status_reads_total", "Gitea status listing requests (one per page) by instance "
            "and purpose (check: before a post, resync: the resync's comparison, fleet: the "
            "fleet status)",
            ["gitea_instance", "purpose"], registry=r)
        self.status_repairs = Counter(
            "gfb_status_repairs_total", "Statuses the resync found Gitea showing differently "
            "from live state, and queued, by instance", ["gitea_instance"], registry=r)
        self.resync_leader = Gauge(
            "gfb_resync_leader", "1 while this replica holds the resync Lease", registry=r)
        self.resync_last_success = Gauge(
            "gfb_resync_last_success_timestamp_seconds", "Unix time the last resync run of this "
            "replica finished (0: none yet)", registry=r)
        self.cache_synced = Gauge(
            "gfb_cache_synced", "1 once every watched kind has been listed", registry=r)
        self.watches_failing = Gauge(
            "gfb_watches_failing", "Watched kinds whose list/watch is failing now (the cache "
            "of those goes stale)", registry=r)
        self.kinds_not_installed = Gauge(
            "gfb_kinds_not_installed", "Optional kinds (ImageRepository, ImagePolicy, "
            "HelmRepository, HelmChart, ResourceSetInputProvider) whose CRD the API server "
            "does not serve: not cached, looked for again", registry=r)
        self.kinds_not_permitted = Gauge(
            "gfb_kinds_not_permitted", "Optional kinds (ImageRepository, ImagePolicy, "
            "HelmRepository, HelmChart, ResourceSetInputProvider) the bridge's RBAC may not "
            "list or watch: not cached, looked for again", registry=r)
        self.lead_time = Histogram(
            "gfb_push_to_ready_seconds", "Push received to touched object Ready at that commit",
            ["cluster"], buckets=LEAD_TIME_BUCKETS, registry=r)
