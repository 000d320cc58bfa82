"""Per-Service metrics from Envoy's counters: summed per Service port over families and key kinds, bounded,
and saying when Envoy could not be read."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from controlplane.servicemetrics import ServiceTraffic, families, port_of

STATS = {
    "cluster.shop_web_80_ipv4.upstream_rq_total": 10, "cluster.shop_web_80_ipv6.upstream_rq_total": 5,
    "cluster.shop_web_80_ipv4_np.upstream_rq_total": 1, "cluster.shop_web_80_ipv4.upstream_rq_5xx": 2,
    "cluster.shop_web_80_ipv4.upstream_rq_retry": 4, "cluster.shop_web_443_ipv4.upstream_cx_total": 7,
    "cluster.shop_web_80_ipv4.outlier_detection.ejections_active": 1,
}
WEB = ("shop/web", ["shop_web_80_ipv4", "shop_web_80_ipv6", "shop_web_80_ipv4_np", "shop_web_443_ipv4"])


def samples(fams: list[object]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams for s in f.samples}  # type: ignore[attr-defined]


def test_port_of_reads_the_stat_name() -> None:
    assert port_of("shop_web_80_ipv4_np") == ("shop", "web", "80")
    assert port_of("garbage") is None


def test_figures_are_summed_per_service_port() -> None:
    got = samples(families(STATS, [WEB]))
    web80 = (("namespace", "shop"), ("port", "80"), ("service", "web"))
    assert got[("lightpath_service_requests_total", web80)] == 16  # v4 + v6 + NodePort
    assert got[("lightpath_service_errors_total", web80)] == 2
    assert got[("lightpath_service_retries_total", web80)] == 4
    assert got[("lightpath_service_ejected_endpoints", web80)] == 1
    web443 = (("namespace", "shop"), ("port", "443"), ("service", "web"))
    assert got[("lightpath_service_connections_total", web443)] == 7
    assert got[("lightpath_service_metrics_available", ())] == 1


def test_bounded_and_unavailable_are_said() -> None:
    many = [(f"ns/s{i}", [f"ns_s{i}_80_ipv4"]) for i in range(5)]
    got = samples(families({}, many, limit=2))
    assert got[("lightpath_service_metrics_truncated", ())] == 3
    assert sum(1 for (name, _labels) in got if name == "lightpath_service_requests_total") == 2
    down = samples(families(None, [WEB]))
    assert down[("lightpath_service_metrics_available", ())] == 0
    assert not any(name == "lightpath_service_requests_total" for name, _ in down)


def test_the_collector_exposes_them_on_a_scrape() -> None:
    registry = CollectorRegistry()
    registry.register(ServiceTraffic(lambda: (STATS, [WEB])))
    text = generate_latest(registry).decode()
    assert 'lightpath_service_requests_total{namespace="shop",port="80",service="web"} 16.0' in text


def test_latency_percentiles_are_the_worst_cluster_of_a_port_and_absent_without_requests() -> None:
    stats = {**STATS, "cluster.shop_web_80_ipv4.upstream_rq_time.p50_us": 1200,
             "cluster.shop_web_80_ipv4.upstream_rq_time.p99_us": 9000,
             "cluster.shop_web_80_ipv6.upstream_rq_time.p99_us": 15000}
    got = samples(families(stats, [WEB]))
    web80 = (("namespace", "shop"), ("port", "80"), ("service", "web"))
    assert got[("lightpath_service_request_duration_seconds", (*web80[:2], ("quantile", "0.5"), web80[2]))] == 0.0012
    assert got[("lightpath_service_request_duration_seconds", (*web80[:2], ("quantile", "0.99"), web80[2]))] == 0.015
    assert not any(name == "lightpath_service_request_duration_seconds" and ("port", "443") in labels
                   for name, labels in got)


def test_the_lease_summary_is_rates_over_the_window_busiest_first_and_bounded() -> None:
    from controlplane.servicemetrics import TrafficWindow, service_totals, summary

    names = [("shop/web", ["shop_web_80_ipv4", "shop_web_80_ipv6"]), ("shop/db", ["shop_db_5432_ipv4"]),
             ("shop/idle", ["shop_idle_80_ipv4"])]
    before = service_totals({"cluster.shop_web_80_ipv4.upstream_rq_total": 100, "cluster.shop_db_5432_ipv4.upstream_rq_total": 50},
                            names)
    now = service_totals({"cluster.shop_web_80_ipv4.upstream_rq_total": 140, "cluster.shop_web_80_ipv6.upstream_rq_total": 10,
                          "cluster.shop_web_80_ipv4.upstream_rq_5xx": 5, "cluster.shop_web_80_ipv4.upstream_rq_retry": 10,
                          "cluster.shop_web_80_ipv6.upstream_rq_time.p99_us": 7500,
                          "cluster.shop_db_5432_ipv4.upstream_rq_total": 20}, names)  # db: Envoy restarted
    got = summary(before, now, 10.0)
    assert got["window"] == 10.0 and got["truncated"] == 0
    assert list(got["services"]) == ["shop/web", "shop/db"]  # busiest first; idle has nothing to say
    assert got["services"]["shop/web"] == [5.0, 0.5, 1.0, 7.5]
    assert got["services"]["shop/db"] == [2.0, 0.0, 0.0, None]  # a counter that went down counts from zero
    assert list(summary(before, now, 10.0, limit=1)["services"]) == ["shop/web"]
    assert summary(before, now, 10.0, limit=1)["truncated"] == 1

    readings = iter([({"cluster.shop_web_80_ipv4.upstream_rq_total": 1}, names[:1]),
                     ({"cluster.shop_web_80_ipv4.upstream_rq_total": 21}, names[:1]), (None, names[:1])])
    times = iter([0.0, 4.0, 4.5, 9.0])
    window = TrafficWindow(lambda: next(readings), clock=lambda: next(times))
    assert window() is None  # nothing to compare with yet
    assert window() == {"window": 4.0, "services": {"shop/web": [5.0, 0.0, 0.0, None]}, "truncated": 0}
    # 0.5 s later (a Lease write after a sync): the same summary, Envoy not read again (readings unchanged)
    assert window() == {"window": 4.0, "services": {"shop/web": [5.0, 0.0, 0.0, None]}, "truncated": 0}
    assert window() is None  # Envoy unreadable: no figures rather than stale ones


def test_used_services_come_from_envoys_traffic_counters_only() -> None:
    from controlplane.envoystats import used_services

    stats = {"cluster.shop_web_80_ipv4.upstream_rq_total": 3, "cluster.shop_web_80_ipv6_np.upstream_cx_total": 1,
             "cluster.shop_web_443_ipv4.upstream_rq_time.p99_us": 900,
             "cluster.shop_idle_80_ipv4.outlier_detection.ejections_active": 0,  # exists from creation: no use
             "cluster.a_db_5432_ipv4.upstream_cx_total": 2, "cluster.lightpath_xds.upstream_cx_total": 1,
             "server.uptime": 5}
    assert used_services(stats) == [("a/db", ["a_db_5432_ipv4"]),
                                    ("shop/web", ["shop_web_443_ipv4", "shop_web_80_ipv4", "shop_web_80_ipv6_np"])]
    assert used_services({}) == []
