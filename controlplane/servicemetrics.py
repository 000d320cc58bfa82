"""Per-Service traffic in the agent's /metrics, from Envoy's own counters (what ``/debug/proxy`` shows per
key), so an operator's Prometheus sees what migrating a Service changed.

A collector, not metrics kept up to date: each scrape reads Envoy's admin once (``EnvoyStats``, cached
3 s) and sums the figures of a Service port's clusters (IPv4 and IPv6, ClusterIP, external, LB and
NodePort keys). Labels: namespace, service, port (the Service port number). Cardinality is bounded: at
most ``limit`` Services (sorted by namespace/name) are exported, and ``lightpath_service_metrics_truncated``
says how many were left out. Counters are cumulative per Envoy process (they restart with Envoy; two
Envoys during a rollout are added), so rates come from Prometheus' ``rate()`` as usual. Latency:
``lightpath_service_request_duration_seconds{quantile="0.5"|"0.99"}``, Envoy's percentiles of the requests in
its last stats interval (5 s); percentiles do not add up, so a port with several clusters (families, key
kinds) shows the worst of them; absent when no request came in that interval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from controlplane import envoystats
from controlplane.envoystats import port_of

PREFIX = "lightpath_service"
# (metric suffix, help, Envoy figures summed)
COUNTERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("requests", "HTTP requests Envoy sent upstream for this Service port (retries included).", ("upstream_rq_total",)),
    ("errors", "Upstream answers 5xx for this Service port (after retries: what clients saw, with "
               "requests_total as the base).", ("upstream_rq_5xx",)),
    ("retries", "Retries Envoy made for this Service port.", ("upstream_rq_retry",)),
    ("timeouts", "Requests for this Service port that hit an upstream timeout (the request's or a try's).",
     ("upstream_rq_timeout", "upstream_rq_per_try_timeout")),
    ("connections", "Upstream connections Envoy opened for this Service port.", ("upstream_cx_total",)),
    ("connect_failures", "Upstream connections that failed to connect.", ("upstream_cx_connect_fail",)),
)
DEFAULT_LIMIT = 1000


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
    duration = GaugeMetricFamily(f"{PREFIX}_request_duration_seconds",
                                 "Upstream request time percentiles in Envoy's last stats interval (5 s); the "
                                 "worst of the Service port's clusters.", labels=["namespace", "service", "port", "quantile"])
    available = GaugeMetricFamily(f"{PREFIX}_metrics_available", "1 when Envoy's counters could be read.",
                                  value=1 if stats is not None else 0)
    if stats is not None:
        for _sid, names in listed[:limit]:
            sums: dict[tuple[str, str, str], list[int]] = {}
            slow: dict[tuple[str, str, str], dict[str, int]] = {}
            for name in names:
                labels = port_of(name)
                if labels is None:
                    continue
                row = sums.setdefault(labels, [0] * (len(COUNTERS) + 1))
                for i, (_s, _t, figures) in enumerate(COUNTERS):
                    row[i] += sum(stats.get(f"cluster.{name}.{f}", 0) for f in figures)
                row[-1] += stats.get(f"cluster.{name}.outlier_detection.ejections_active", 0)
                worst = slow.setdefault(labels, {})
                for key, us in envoystats.latency(stats, name).items():
                    worst[key] = max(worst.get(key, 0), us)
            for labels, row in sorted(sums.items()):
                for family, value in zip(counters, row, strict=False):
                    family.add_metric(list(labels), value)
                ejected.add_metric(list(labels), row[-1])
                for key, quantile in (("p50_us", "0.5"), ("p99_us", "0.99")):
                    if key in slow.get(labels, {}):
                        duration.add_metric([*labels, quantile], slow[labels][key] / 1e6)
    return [*counters, ejected, duration, truncated, available]


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


# -- the traffic summary on the agent's Lease (for `lightpath status`) -------------------------------------

Totals = dict[str, tuple[int, int, int, int | None]]  # sid -> (requests, 5xx, retries, worst p99 µs or None)
SUMMARY_LIMIT = 50


def service_totals(stats: Mapping[str, int], services: Iterable[tuple[str, Iterable[str]]]) -> Totals:
    """Per Service (every port, family and key kind added up): Envoy's cumulative counters (pure)."""
    out: Totals = {}
    for sid, names in services:
        requests = errors = retries = 0
        p99: int | None = None
        for name in names:
            prefix = f"cluster.{name}."
            requests += stats.get(prefix + "upstream_rq_total", 0)
            errors += stats.get(prefix + "upstream_rq_5xx", 0)
            retries += stats.get(prefix + "upstream_rq_retry", 0)
            slow = envoystats.latency(stats, name).get("p99_us")
            if slow is not None:
                p99 = slow if p99 is None else max(p99, slow)
        out[sid] = (requests, errors, retries, p99)
    return out


def summary(before: Totals, now: Totals, seconds: float, limit: int = SUMMARY_LIMIT) -> dict[str, Any]:
    """Rates between two readings, the busiest ``limit`` Services with traffic (pure). A counter that went
    down (Envoy restarted) counts from zero."""
    rows: list[tuple[float, str, list[float | None]]] = []
    span = max(seconds, 1e-3)
    for sid, (requests, errors, retries, p99) in now.items():
        old = before.get(sid, (0, 0, 0, None))
        deltas = [new - prior if new >= prior else new for new, prior in zip((requests, errors, retries), old[:3], strict=True)]
        if not any(deltas) and p99 is None:
            continue
        rate = round(deltas[0] / span, 2)
        rows.append((rate, sid, [rate, round(deltas[1] / span, 2), round(deltas[2] / span, 2),
                                 None if p99 is None else round(p99 / 1000, 2)]))
    rows.sort(key=lambda r: (-r[0], r[1]))
    return {"window": round(seconds, 1), "services": {sid: figures for _, sid, figures in rows[:limit]},
            "truncated": max(0, len(rows) - limit)}


class TrafficWindow:
    """The shell: each call reads ``source`` (ControlPlane.traffic_source) and summarises since the last call;
    None while Envoy's counters cannot be read (the Lease then carries no traffic)."""

    def __init__(self, source: Callable[[], tuple[Mapping[str, int] | None, list[tuple[str, list[str]]]]],
                 clock: Callable[[], float] | None = None, min_window: float = 2.0) -> None:
        import time

        self.source, self.clock, self.min_window = source, clock or time.monotonic, min_window
        self._before: Totals | None = None
        self._at = 0.0
        self._last: dict[str, Any] | None = None

    def __call__(self) -> dict[str, Any] | None:
        """The Lease is written after every sync: a call within ``min_window`` of the last reading gives that
        reading's summary again (no Envoy read; a rate over a few milliseconds would be noise anyway)."""
        at = self.clock()
        if self._before is not None and at - self._at < self.min_window:
            return self._last
        stats, services = self.source()
        if stats is None:
            self._before = self._last = None
            return None
        now = service_totals(stats, services)
        before, since = self._before, self._at
        self._before, self._at = now, at
        self._last = None if before is None else summary(before, now, at - since)
        return self._last  # None on the first reading: nothing to compare with
