"""Replaying ``nft monitor`` generations: how long a Service port had neither the redirect nor the DNAT."""

from __future__ import annotations

import time

import pytest

from sandbox.node.netns import Topology, nft
from sandbox.node.nftwatch import NftMonitor, coverage
from tests.support.polling import wait_for

IP, PORT = "10.96.1.1", 80
ADD_REDIRECT = (f"add element inet lightpath svc4 {{ {IP} . {PORT} }}",)
DEL_REDIRECT = (f"delete element inet lightpath svc4 {{ {IP} . {PORT} }}",)
STANDIN_WITH = ("delete table ip kube-proxy", "add table ip kube-proxy",
                "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }",
                f"add element ip kube-proxy service-ips {{ {IP} . tcp . {PORT} : goto service-X-s/x/tcp/http }}")
STANDIN_WITHOUT = ("delete table ip kube-proxy", "add table ip kube-proxy",
                   "add element ip kube-proxy service-ips { 10.96.1.2 . udp . 53 : goto service-Y-s/y/udp/dns }")


def test_rollback_with_a_gap() -> None:
    gens = [(0.0, ADD_REDIRECT), (0.5, STANDIN_WITHOUT), (10.0, DEL_REDIRECT), (10.025, STANDIN_WITH)]
    cov = coverage(gens, IP, PORT, start=9.0)
    assert cov.uncovered == pytest.approx(0.025)
    assert cov.redirect_changed == pytest.approx(1.0) and cov.standin_changed == pytest.approx(1.025)
    assert "25.0 ms" in cov.describe()


def test_migrate_redirect_first_has_no_gap_and_end_bounds_the_window() -> None:
    gens = [(0.0, STANDIN_WITH), (2.0, ADD_REDIRECT), (2.01, STANDIN_WITHOUT), (5.0, DEL_REDIRECT)]
    cov = coverage(gens, IP, PORT, start=1.0, end=4.0)
    assert cov.uncovered == 0.0 and cov.redirect_changed == pytest.approx(1.0)
    assert coverage(gens, IP, PORT, start=1.0).uncovered == 0.0  # never closed again: not counted
    assert coverage(gens, IP, PORT, start=1.0).redirect_changed == pytest.approx(4.0)


def test_redirect_table_created_with_elements_counts() -> None:
    gens = [(0.0, (f"add set inet lightpath svc4 {{ type ipv4_addr . inet_service; elements = {{ {IP} . {PORT} }} }}",)),
            (1.0, ("delete table inet lightpath",))]
    assert coverage(gens, IP, PORT, start=0.5).redirect_changed == pytest.approx(0.5)


def test_our_other_tables_are_not_the_redirect() -> None:
    """The block and fallback tables are rewritten by "delete table inet lightpath-block" etc.: not the redirect
    going (the demo once showed a 10 ms "window" that was the block table's rewrite)."""
    others = ("add table inet lightpath-block", "delete table inet lightpath-block",
              f"add element inet lightpath-block exposed4 {{ {IP} . tcp . {PORT} }}",
              "delete table inet lightpath-fallback")
    gens = [(0.0, ADD_REDIRECT), (0.5, STANDIN_WITHOUT), (10.0, others), (10.02, STANDIN_WITH), (10.03, DEL_REDIRECT)]
    cov = coverage(gens, IP, PORT, start=9.0)
    assert cov.uncovered == 0.0 and cov.redirect_changed == pytest.approx(1.03)


@pytest.mark.root
def test_monitor_stamps_real_transactions() -> None:
    with Topology(pods=0, prefix="lpe2e") as topo:
        monitor = NftMonitor(topo.node)
        try:
            # nft monitor needs a moment to subscribe: write until its first transaction shows up.
            def probed() -> bool:
                nft(topo.node.name, "add table inet probe")
                return bool(monitor.generations)

            wait_for(probed, "nft monitor to see a transaction")
            nft(topo.node.name, "table inet lightpath { set svc4 { type ipv4_addr . inet_service; }; }")
            nft(topo.node.name, f"add element inet lightpath svc4 {{ {IP} . {PORT} }}")
            wait_for(lambda: coverage(monitor.generations, IP, PORT, 0.0).redirect_changed is not None, "the add")
            start = time.monotonic()
            nft(topo.node.name, f"delete element inet lightpath svc4 {{ {IP} . {PORT} }}")
            nft(topo.node.name, f"add element inet lightpath svc4 {{ {IP} . {PORT} }}")
            wait_for(lambda: coverage(monitor.generations, IP, PORT, start).uncovered > 0, "the delete/add window")
            cov = coverage(monitor.generations, IP, PORT, start)
            assert cov.redirect_changed is not None and cov.standin_changed is None
        finally:
            monitor.stop()
