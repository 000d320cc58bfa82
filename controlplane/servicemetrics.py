"""Per-Service traffic in the agent's /metrics, from Envoy's own counters (what ``/debug/proxy`` shows per
key), so an operator's Prometheus sees what migrating a Service changed.

A collector, not metrics kept up to date: each scrape reads Envoy's admin once (``EnvoyStats``, cached
3 s) and sums the figures of a Service port's clusters (IPv4 and IPv6, ClusterIP, external, LB and
NodePort keys). Labels: namespace, service, port (the Service port number). Cardinality is bounded: at
most ``limit`` Services (sorted by namespace/name) are exported, and ``lightpath_service_metrics_truncated``
says how many were left out. Counters are cumulative per Envoy process (they restart with Envoy; two
Envoys during a rollout are added), so rates come from Prometheus' ``rate()`` as usual. Latency
percentiles are not exported here: Envoy's histograms are on its own /stats/prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "lightpath_service"
# (metric suffix, help, Envoy figures summed)
COUNTERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("requests", "HTTP requests Envoy sent upstream for this Service port (retries included).", ("upstream_rq_total",)),
    ("errors", "Upstream answers 5xx for this Service port (after retries: what clients saw, with "
               "requests_total as the base).", ("upstream_rq_5xx",)),
    ("retries", "Retries Envoy made for this Service port.", ("upstream_rq_retry",)),
    ("timeouts", "Requests for this Service port that hit their upstream timeout.", ("upstream_rq_timeout",)),
    ("connections", "Upstream connections Envoy opened for this Service port.", ("upstream_cx_total",)),
    ("connect_failures", "Upstream connections that failed to connect.", ("upstream_cx_connect_fail",)),
)
DEFAULT_LIMIT = 1000


def port_of(stat_name: str) -> tuple[str, str, str] | None:
    """(namespace, service, port) from ``controlplane.translate.stat_name`` (Kubernetes names hold no '_')."""
    parts = stat_name.split("_")
    if len(parts) < 4 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], parts[2]


def families(stats: Mapping[str, int] | None, services: Iterable[tuple[str, Iterable[str]]],
             limit: int = DEFAULT_LIMIT) -> list[Any]:
    """The metric families for ``services`` ((sid, stat names) pairs, sorted by the caller) (pure)."""
    listed = list(services)
    counters = [CounterMetricFamily(f"{PREFIX}_{suffix}", text, labels=["namespace", "service", "port"])
                for suffix, text, _ in COUNTERS]
    ejected = GaugeMetricFamily(f"{PREFIX}_ejected_endpoints", "Endpoints Envoy's outlier detection has ejected now.",
                                labels=["namespace", "service", "port"])
    truncated = GaugeMetricFamily(f"{PREFIX}_metrics_truncated",
                                  "Services left out of the per-Service metrics (over the limit).",
                                  value=max(0, len(listed) - limit))
    available = GaugeMetricFamily(f"{PREFIX}_metrics_available", "1 when Envoy's counters could be read.",
                                  value=1 if stats is not None else 0)
    if stats is not None:
        for _sid, names in listed[:limit]:
            sums: dict[tuple[str, str, str], list[int]] = {}
            for name in names:
                labels = port_of(name)
                if labels is None:
                    continue
                row = sums.setdefault(labels, [0] * (len(COUNTERS) + 1))
                for i, (_s, _t, figures) in enumerate(COUNTERS):
                    row[i] += sum(stats.get(f"cluster.{name}.{f}", 0) for f in figures)
                row[-1] += stats.get(f"cluster.{name}.outlier_detection.ejections_active", 0)
            for labels, row in sorted(sums.items()):
                for family, value in zip(counters, row, strict=False):
                    family.add_metric(list(labels), value)
                ejected.add_metric(list(labels), row[-1])
    return [*counters, ejected, truncated, available]


class ServiceTraffic(Collector):
    """Registered in the agent's registry; ``source`` gives (counters or None, [(sid, stat names)])."""

    def __init__(self, source: Callable[[], tuple[Mapping[str, int] | None, list[tuple[str, list[str]]]]],
                 limit: int = DEFAULT_LIMIT) -> None:
        self.source, self.limit = source, limit

    def collect(self) -> Iterator[Any]:
        stats, services = self.source()
        yield from families(stats, services, self.limit)

    def describe(self) -> Iterator[Any]:
        yield from families(None, [], self.limit)  # names only: no Envoy read at registration
