"""A real Envoy on a Calico-style node (host veths without an address): the agent's default DNAT primitive
delivers pod -> ClusterIP HTTP to Envoy's 0.0.0.0/[::]:1666 listener, whose original_dst filter recovers the
Service address and picks its cluster. REDIRECT would drop these IPv4 packets (tests/redirector/
test_redirect_primitive.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from redirector.model import Key
from sandbox.node.traffic import http_request, wait_until
from shared import constants as c
from tests.e2e.envoynode import CLUSTER_IPS, envoy_node

pytestmark = pytest.mark.root
HTTP = [{"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"}]


def test_pod_to_cluster_ip_http_through_envoy_on_an_addressless_node(tmp_path: Path) -> None:
    with envoy_node(tmp_path, addressless=True) as node:
        veth = node.topo.node.run(["ip", "-4", "addr", "show", "dev", "veth0"]).stdout
        assert "inet " not in veth  # no IPv4 address on the host side: REDIRECT would have none to use
        web4, web6 = node.serve(1, "http", 4), node.serve(1, "http", 6)
        node.service("web", HTTP, ips=CLUSTER_IPS)
        node.endpoints("web", {"http": web4.port}, [1], family=4)
        node.endpoints("web", {"http": web6.port}, [1], family=6)
        want = {Key(4, CLUSTER_IPS[0], 80), Key(6, CLUSTER_IPS[1], 80)}
        wait_until(lambda: want <= node.kernel_keys(), timeout=20, what="both redirects, after Envoy's ACK")
        for ip in CLUSTER_IPS:
            reply = http_request(node.topo.pods[0], ip, 80, "/hello")
            assert reply["status"] == 200, reply
            body = json.loads(reply["body"])
            assert body["server"] == "pod1" and body["path"] == "/hello", body
            assert "x-request-id" in body["headers"], body  # through Envoy's HTTP connection manager
        assert node.envoy.counter("cluster.shop_web_80_ipv4.upstream_cx_total") >= 1
        assert node.envoy.counter("cluster.shop_web_80_ipv6.upstream_cx_total") >= 1
        lo = node.topo.node.run(["ip", "addr", "show", "dev", "lo"]).stdout
        assert c.DEFAULT_REDIRECT_ADDRESS in lo and c.DEFAULT_REDIRECT_ADDRESS6 in lo  # the agent put them there
