"""The redirector's Prometheus metrics, in a registry of its own (so tests and a debug server read exactly
ours, and several agents can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "lightpath_redirector"
# Sub-millisecond to seconds: an incremental sync is ~1 ms, a full sync of 10,000 Services ~0.2 s.
SYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric the agent updates. kube-proxy names in brackets for operators who know those."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sync_duration = Histogram(
            f"{PREFIX}_sync_duration_seconds",
            "Time of one sync, from changed objects to the kernel transaction done [sync_proxy_rules_duration_seconds].",
            ["kind"], buckets=SYNC_BUCKETS, registry=r)
        self.last_sync = Gauge(
            f"{PREFIX}_last_sync_timestamp_seconds", "Unix time of the last successful sync, by kind.",
            ["kind"], registry=r)
        self.event_to_rule = Histogram(
            f"{PREFIX}_event_to_rule_seconds",
            "From a watch event arriving to its change being live in the kernel [network_programming_duration_seconds].",
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            f"{PREFIX}_sync_batch_changes", "Service changes folded into one sync (bursts are batched).",
            buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 10000), registry=r)
        self.entries = Gauge(
            f"{PREFIX}_entries", "Redirect entries programmed, by IP family and match (address or nodePort).",
            ["family", "match"], registry=r)
        self.services = Gauge(f"{PREFIX}_services", "Labelled Services watched.", registry=r)
        self.service_errors = Gauge(
            f"{PREFIX}_service_errors", "Services with an error (malformed IP, duplicate key, ...).", registry=r)
        self.unserved_ports = Gauge(
            f"{PREFIX}_unserved_ports", "Non-TCP ports of labelled Services: neither kube-proxy nor we serve them.",
            registry=r)
        self.sync_errors = Counter(
            f"{PREFIX}_sync_errors", "Kernel transactions that failed (a full sync is scheduled).", ["kind"], registry=r)
        self.drift_repairs = Counter(
            f"{PREFIX}_drift_repairs",
            "Full syncs that repaired a kernel changed behind the agent's back (periodic, or after a failed sync).",
            registry=r)
        self.fallback_active = Gauge(
            f"{PREFIX}_fallback_active",
            "1 while the node's Envoy is down and the kernel load-balances migrated Services itself (L4 only).",
            registry=r)
        self.fallback_switches = Counter(
            f"{PREFIX}_fallback_switches", "Switches into (to=fallback) and out of (to=envoy) the kernel fallback.",
            ["to"], registry=r)
        self.handback = Histogram(
            f"{PREFIX}_handback_hold_seconds",
            "How long a handed-back Service's redirect was kept after its label went, by what released it "
            "(kube-proxy: its rule became visible; timeout: it did not in time; hold: kube-proxy's rules unreadable).",
            ["released_by"], buckets=LATENCY_BUCKETS, registry=r)
        self.handover_prepare = Histogram(
            f"{PREFIX}_handover_prepare_seconds",
            "From a Service's handover mark seen to its redirects in the kernel (Envoy ACKed them) on this node.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.handovers = Counter(
            f"{PREFIX}_handovers",
            "Migrations this node took part in, by how the mark went (migrated: the label came; aborted: the "
            "mark went without it; deleted), with the seconds marked in handover_duration_seconds.",
            ["outcome"], registry=r)
        self.handover_duration = Histogram(
            f"{PREFIX}_handover_duration_seconds", "How long Services stayed marked on this node, by outcome.",
            ["outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.watch_restarts = Counter(
            f"{PREFIX}_watch_restarts", "Watch requests restarted, by reason (expired, gone, stalled, error).",
            ["reason"], registry=r)
        for kind in ("full", "incremental"):
            self.sync_errors.labels(kind)
        for family in ("ipv4", "ipv6"):
            for match in ("address", "nodePort"):
                self.entries.labels(family, match).set(0)
        for reason in ("expired", "gone", "stalled", "error"):
            self.watch_restarts.labels(reason)
        for outcome in ("migrated", "aborted", "deleted"):
            self.handovers.labels(outcome)
