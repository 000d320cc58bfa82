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
