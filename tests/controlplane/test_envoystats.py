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
