"""``--envoy-clusters on-demand`` for real: Envoy holds no Service cluster until a connection needs one, then
fetches it from the agent over ADS; HTTP and TCP, both families, from a pod and from the node; endpoint
changes and an Envoy restart keep working. Real Envoy, real kernel in network namespaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.node.traffic import http_request, tcp_request, wait_until
from tests.e2e.envoynode import CLUSTER_IPS, NS, EnvoyNode, envoy_node
from tests.e2e.envoynode import DB_IPS as DB

pytestmark = pytest.mark.root


def held(node: EnvoyNode) -> set[str]:
    """Names of the clusters Envoy holds (admin /clusters), the xDS cluster aside."""
    statuses = json.loads(node.envoy.admin("/clusters?format=json")).get("cluster_statuses", [])
    return {str(c["name"]) for c in statuses} - {"lightpath_xds"}


def server(source: object, ip: str) -> str:
    reply = http_request(source, ip, 80, "/")  # type: ignore[arg-type]
    assert reply["status"] == 200, reply
    return str(json.loads(reply["body"])["server"])


def test_clusters_are_fetched_on_first_use_and_keep_working(tmp_path: Path) -> None:
    with envoy_node(tmp_path, agent_args=("--envoy-clusters", "on-demand")) as node:
        want = node.web_and_db()
        wait_until(lambda: want <= node.kernel_keys(), timeout=20, what="all four redirects, after the listener ACK")
        assert held(node) == set()  # redirected, yet Envoy holds no Service cluster
        proxy = node.proxy()
        assert proxy["envoy_clusters"] == "on-demand" and proxy["in_sync"] is True, proxy
        assert {k["served"] for row in proxy["services"] for k in row["keys"]} == {True}
        assert {k["acked"] for row in proxy["services"] for k in row["keys"]} == {False}
        for source in (node.topo.pods[0], node.topo.node):
            for ip in CLUSTER_IPS:
                assert server(source, ip) == "pod1"
            for ip in DB:
                assert tcp_request(source, ip, 5432)["server"] == "pod2"
        assert held(node) == {"10.96.0.10:80", "[fd00:10:96::10]:80", "10.96.0.20:5432", "[fd00:10:96::20]:5432"}
        assert node.envoy.counter("cluster.shop_db_5432_ipv6.upstream_cx_total") >= 2  # the proxy, not the kernel
        wait_until(lambda: {k["acked"] for row in node.proxy()["services"] for k in row["keys"]} == {True},
                   timeout=10, what="the fetched clusters reported as held")

        # An endpoint change reaches the cluster Envoy fetched.
        moved = node.serve(0, "http", 4)
        node.endpoints("web", {"http": moved.port}, [0], family=4)
        wait_until(lambda: server(node.topo.pods[2], CLUSTER_IPS[0]) == "pod0", timeout=15, what="the new endpoint serving")

        # Envoy restarted: it starts with no Service cluster and fetches each again on first use.
        node.envoy.kill()
        node.envoy.start()
        wait_until(lambda: node.proxy()["in_sync"] is True, timeout=20, what="the new Envoy in sync")
        assert held(node) == set()
        assert server(node.topo.pods[2], CLUSTER_IPS[0]) == "pod0"
        assert tcp_request(node.topo.pods[2], DB[0], 5432)["server"] == "pod2"
        assert held(node) == {"10.96.0.10:80", "10.96.0.20:5432"}

        # The agent restarted: Envoy asks again for what it holds, and those clusters keep following changes.
        node.agent.stop()
        node.agent.start()
        node.serve(1, "http", 4, port=moved.port)
        node.endpoints("web", {"http": moved.port}, [1], family=4)
        wait_until(lambda: server(node.topo.pods[2], CLUSTER_IPS[0]) == "pod1", timeout=20,
                   what="an endpoint change after the agent's restart")
        # A deleted Service's cluster leaves Envoy with it.
        node.core.delete_namespaced_service("db", NS)
        wait_until(lambda: held(node) == {"10.96.0.10:80"}, timeout=20, what="db's cluster removed")
