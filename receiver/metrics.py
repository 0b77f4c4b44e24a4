"""Prometheus metrics, in one registry per app so tests and several apps do not collide."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LEAD_TIME_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.hook_requests = Counter(
            "gfb_hook_requests_total", "Hook requests by receiver and outcome",
            ["receiver", "outcome"], registry=r)
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
            "gfb_statuses_total", "Gitea commit statuses by result (posted, deduplicated, "
            "retried, failed)", ["result"], registry=r)
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
            "gfb_status_reads_total", "Gitea status listing requests (one per page) by purpose "
            "(check: before a post, resync: the resync's comparison)", ["purpose"], registry=r)
        self.status_repairs = Counter(
            "gfb_status_repairs_total", "Statuses the resync found Gitea showing differently "
            "from live state, and queued", registry=r)
        self.lead_time = Histogram(
            "gfb_push_to_ready_seconds", "Push received to touched object Ready at that commit",
            ["cluster"], buckets=LEAD_TIME_BUCKETS, registry=r)
