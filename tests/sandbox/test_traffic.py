"""Echo listeners and clients: UDP and HTTP modes, and clear failures."""

from __future__ import annotations

import json

import pytest

from sandbox.node.netns import Topology
from sandbox.node.traffic import (
    TrafficError,
    http_listener,
    http_request,
    tcp_request,
    udp_listener,
    udp_request,
)

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def topo():
    with Topology(2) as t:
        yield t


@pytest.mark.parametrize("family", [4, 6])
def test_udp_echo(topo: Topology, family: int) -> None:
    ips = topo.pod_ips if family == 4 else topo.pod_ips6
    listener = udp_listener(topo.pods[0], 0, family, name="backend-a")
    reply = udp_request(topo.pods[1], ips[0], listener.port, payload=b"hi")
    assert reply["server"] == "backend-a"
    assert reply["data"] == "hi"
    assert reply["peer"][0] == ips[1]


@pytest.mark.parametrize("family", [4, 6])
def test_http_echo_returns_request_headers(topo: Topology, family: int) -> None:
    ips = topo.pod_ips if family == 4 else topo.pod_ips6
    listener = http_listener(topo.pods[0], 0, family, name="web")
    resp = http_request(topo.pods[1], ips[0], listener.port, "/a/b?x=1", headers={"X-Test": "yes"})
    assert resp["status"] == 200
    body = json.loads(resp["body"])
    assert body["server"] == "web"
    assert body["path"] == "/a/b" and body["query"] == "x=1"
    assert body["headers"]["x-test"] == "yes"
    assert body["client"][0] == ips[1]


def test_failures_are_clear(topo: Topology) -> None:
    with pytest.raises(TrafficError, match=r"TCP from netns .*pod1 to 10.244.0.10:1 failed: ConnectionRefused"):
        tcp_request(topo.pods[1], topo.pod_ips[0], 1)
    with pytest.raises(TrafficError, match="UDP"):
        udp_request(topo.pods[1], topo.pod_ips[0], 1, timeout=0.5)
    with pytest.raises(TrafficError, match="HTTP GET"):
        http_request(topo.pods[1], topo.pod_ips[0], 1)
