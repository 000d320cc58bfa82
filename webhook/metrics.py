"""Prometheus metrics, in a registry owned by one app instance (several can live in one test process).

Certificate and namespace-cache metrics are read at scrape time from their owners (webhook.app).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Admission latency is dominated by the apiserver's timeout budget (10 s by default, ours 5 s):
# fine buckets below 10 ms where we live, coarse ones up to the timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The webhook's metrics; ``registry`` is served at /metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lightpath_webhook_admission_requests",
            "Admission reviews answered, by operation and decision (label, unlabel, leave, skip, error).",
            ["operation", "decision"],
            registry=r,
        )
        self.patched = Counter(
            "lightpath_webhook_patches", "Admission responses that carried a JSONPatch.", registry=r
        )
        self.latency = Histogram(
            "lightpath_webhook_admission_duration_seconds",
            "Time from receiving a review to answering it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "lightpath_webhook_errors",
            "Errors by kind: bad_request (HTTP 400), internal (allowed untouched), namespace_lookup (GET fallback).",
            ["kind"],
            registry=r,
        )
        for kind in ("bad_request", "internal", "namespace_lookup"):
            self.errors.labels(kind)
