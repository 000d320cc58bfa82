"""envoystats: Envoy's admin counters -> per-key traffic figures; an unreachable admin is reported, not raised."""

from __future__ import annotations

import re
import socket

from controlplane import envoystats


def test_parse_and_figures() -> None:
    text = ("cluster.shop_web_80_ipv4.upstream_rq_total: 12\ncluster.shop_web_80_ipv4.upstream_rq_5xx: 2\n"
            "cluster.shop_web_80_ipv4.outlier_detection.ejections_active: 1\nhistogram: P0(nan,1)\nodd line\n")
    stats = envoystats.parse(text)
    assert stats == {"cluster.shop_web_80_ipv4.upstream_rq_total": 12, "cluster.shop_web_80_ipv4.upstream_rq_5xx": 2,
                     "cluster.shop_web_80_ipv4.outlier_detection.ejections_active": 1}
    web = envoystats.figures(stats, "shop_web_80_ipv4")
    assert (web["upstream_rq_total"], web["upstream_rq_5xx"], web["upstream_rq_retry"]) == (12, 2, 0)
    assert web["outlier_detection.ejections_active"] == 1 and set(web) == set(envoystats.FIGURES)
    assert envoystats.per_key(stats, "", ["shop_web_80_ipv4", "x"])[1] == dict.fromkeys(envoystats.FIGURES, 0)
    for figure in envoystats.FIGURES:  # the admin filter selects exactly these
        assert re.search(envoystats.FILTER, f"cluster.shop_web_80_ipv4.{figure}")
    assert not re.search(envoystats.FILTER, "cluster.shop_web_80_ipv4.upstream_rq_totalx")


def test_an_unreachable_admin_is_unavailable_with_the_reason() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stats = envoystats.EnvoyStats(("127.0.0.1", port), ttl=60)
    found, error = stats.snapshot()
    assert found is None and "Connection refused" in error or "URLError" in error
    assert envoystats.per_key(found, error, ["a"]) == [f"unavailable: {error}"]
    assert stats.snapshot() == (found, error)  # cached, not fetched again


def test_every_admin_found_is_read_and_their_counters_added() -> None:
    """Two Envoys during a rollout: the node's figures are the sum; an admin that fails is skipped as long as
    one answers; none found is said so."""
    import http.server
    import threading

    def server(body: bytes) -> http.server.ThreadingHTTPServer:
        class Stats(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stats)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        return srv

    old = server(b"cluster.shop_web_80_ipv4.upstream_rq_total: 7\ncluster.shop_web_80_ipv4.upstream_cx_active: 1\n")
    new = server(b"cluster.shop_web_80_ipv4.upstream_rq_total: 5\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    try:
        admins = [("127.0.0.1", old.server_address[1]), ("127.0.0.1", new.server_address[1]), ("127.0.0.1", dead)]
        found, error = envoystats.EnvoyStats(lambda: admins, ttl=0).snapshot()
        assert error == "" and found == {"cluster.shop_web_80_ipv4.upstream_rq_total": 12,
                                         "cluster.shop_web_80_ipv4.upstream_cx_active": 1}
        assert envoystats.EnvoyStats(lambda: [], ttl=0).snapshot() == (None, "no Envoy admin found on this node")

        def broken() -> list[tuple[str, int]]:
            raise LookupError("sock_diag refused")

        assert "sock_diag refused" in envoystats.EnvoyStats(broken, ttl=0).snapshot()[1]
    finally:
        old.shutdown()
        new.shutdown()


def test_histogram_lines_give_the_interval_percentiles_in_microseconds() -> None:
    text = ("cluster.shop_web_80_ipv4.upstream_rq_time: P0(1,1) P25(1.025,1.02) P50(2.05,1.05) P75(3,3) "
            "P90(4,4) P95(5,5) P99(12.5,9) P99.5(13,13) P99.9(14,14) P100(15,15)\n"
            "cluster.shop_db_5432_ipv4.upstream_rq_time: P0(nan,1) P25(nan,1) P50(nan,1) P99(nan,2) P100(nan,2)\n"
            "cluster.shop_web_80_ipv4.upstream_rq_total: 3\n")
    stats = envoystats.parse(text)
    assert stats["cluster.shop_web_80_ipv4.upstream_rq_time.p50_us"] == 2050
    assert stats["cluster.shop_web_80_ipv4.upstream_rq_time.p99_us"] == 12500
    assert not any(k.startswith("cluster.shop_db_5432_ipv4.upstream_rq_time") for k in stats)  # no request lately
    web = envoystats.figures(stats, "shop_web_80_ipv4")
    assert web["upstream_rq_time.p99_us"] == 12500 and web["upstream_rq_total"] == 3
    assert "upstream_rq_time.p50_us" not in envoystats.figures(stats, "shop_db_5432_ipv4")
