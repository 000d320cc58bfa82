"""The control plane's Prometheus metrics (registered in the agent's registry, so one /metrics has both)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "lightpath_controlplane"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ControlPlaneMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pushes = Counter(f"{PREFIX}_pushes", "Delta xDS responses sent to Envoy, by type.", ["type"], registry=r)
        self.pushed_resources = Counter(f"{PREFIX}_pushed_resources",
                                        "Resources sent (updated or removed) in those responses, by type.",
                                        ["type"], registry=r)
        self.acks = Counter(f"{PREFIX}_acks", "Responses Envoy accepted, by type.", ["type"], registry=r)
        self.nacks = Counter(f"{PREFIX}_nacks", "Responses Envoy refused, by type.", ["type"], registry=r)
        self.ack_latency = Histogram(f"{PREFIX}_ack_latency_seconds", "From a response sent to Envoy's ACK or NACK.",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.change_to_store = Histogram(f"{PREFIX}_change_to_push_seconds",
                                         "From a Service or EndpointSlice change arriving to its resources in the "
                                         "store (sent to Envoy at once).", buckets=LATENCY_BUCKETS, registry=r)
        self.sync_duration = Histogram(f"{PREFIX}_translate_duration_seconds",
                                       "Time to translate one batch of changed Services and update the store.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.sync_errors = Counter(f"{PREFIX}_translate_errors", "Batches that failed to translate (retried).",
                                   registry=r)
        self.streams = Gauge(f"{PREFIX}_streams", "Envoy xDS streams connected.", registry=r)
        self.in_sync = Gauge(f"{PREFIX}_in_sync", "1 when the newest Envoy ACKed the current version of everything.",
                             registry=r)
        self.refused = Gauge(f"{PREFIX}_refused_resources", "Resources the newest Envoy refused (NACK), by type.",
                             ["type"], registry=r)
        self.clusters = Gauge(f"{PREFIX}_clusters", "Envoy clusters the control plane holds (with eager clusters "
                              "what the node's Envoy holds, ~32 KiB of Envoy's memory each).", registry=r)
        self.watch_restarts = Counter(f"{PREFIX}_watch_restarts", "Watches restarted, by resource and reason.",
                                      ["resource", "reason"], registry=r)
        for t in ("cds", "eds", "lds", "rds"):
            self.pushes.labels(t)
            self.acks.labels(t)
            self.nacks.labels(t)
            self.refused.labels(t).set(0)
