"""kube-proxy's Service semantics on the lightpath path, with real packets through the real redirect and a
real Envoy programmed by the agent's control plane (rows of docs/conformance.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from redirector.model import Key
from sandbox.node.traffic import http_request, wait_until
from shared import constants as c
from tests.e2e.envoynode import CLUSTER_IPS, NODE, NS, EnvoyNode, envoy_node

pytestmark = pytest.mark.root
IP = CLUSTER_IPS[0]
HTTP = [{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}]


def servers(node: EnvoyNode, ip: str, port: int, n: int = 30, source: int = 2) -> list[str]:
    """Which pod answered each of ``n`` requests (a new connection each) from pod ``source``."""
    out = []
    for _ in range(n):
        reply = http_request(node.topo.pods[source], ip, port, "/")
        assert reply["status"] == 200, reply
        out.append(str(json.loads(reply["body"])["server"]))
    return out


def settled(node: EnvoyNode, want: set[str], ip: str = IP, port: int = 80, source: int = 2) -> None:
    """Until the answers come from exactly ``want`` (the control plane pushed, Envoy applied)."""
    wait_until(lambda: set(servers(node, ip, port, 12, source)) == want, timeout=20, what=f"served by {sorted(want)}")
    assert set(servers(node, ip, port, 30, source)) == want


def start(node: EnvoyNode, pods: int = 3, port: int = 8080) -> None:
    for i in range(pods):
        node.serve(i, "http", 4, port=port)


def test_internal_traffic_policy_local_and_terminating_endpoints(tmp_path: Path) -> None:
    with envoy_node(tmp_path) as node:
        start(node)
        node.service("web", HTTP, internalTrafficPolicy="Local")
        eps: list[dict[str, Any]] = [{"pod": 0}, {"pod": 1, "node": "other-node"}, {"pod": 2, "node": "other-node"}]
        node.slice("web", {"http": 8080}, eps)
        wait_until(lambda: Key(4, IP, 80) in node.kernel_keys(), timeout=20, what="redirect")
        settled(node, {"pod0"})  # ITP Local: only this node's endpoint
        # Cluster policy again: every ready endpoint.
        node.core.patch_namespaced_service("web", NS, {"spec": {"internalTrafficPolicy": "Cluster"}})
        settled(node, {"pod0", "pod1", "pod2"})
        # KEP-1669: terminating endpoints get no new connections while ready ones exist...
        node.slice("web", {"http": 8080}, [{"pod": 0, "ready": False, "serving": True, "terminating": True},
                                           {"pod": 1}, {"pod": 2}])
        settled(node, {"pod1", "pod2"})
        # ...and serve when none is ready (not refused while they drain).
        node.slice("web", {"http": 8080}, [{"pod": 0, "ready": False, "serving": True, "terminating": True},
                                           {"pod": 1, "ready": False, "serving": False, "terminating": True}])
        settled(node, {"pod0"})


def test_session_affinity_client_ip_keeps_a_client_on_one_endpoint(tmp_path: Path) -> None:
    with envoy_node(tmp_path, pods=4) as node:
        start(node)
        node.service("web", HTTP, sessionAffinity="ClientIP",
                     sessionAffinityConfig={"clientIP": {"timeoutSeconds": 600}})
        node.slice("web", {"http": 8080}, [{"pod": 0}, {"pod": 1}, {"pod": 2}])
        wait_until(lambda: Key(4, IP, 80) in node.kernel_keys(), timeout=20, what="redirect")
        wait_until(lambda: len(set(servers(node, IP, 80, 5, source=3))) == 1, timeout=20, what="affinity applied")
        assert len(set(servers(node, IP, 80, 30, source=3))) == 1  # 30 new connections, one endpoint
        # Without affinity the same client is spread over the endpoints.
        node.core.patch_namespaced_service("web", NS, {"spec": {"sessionAffinity": "None", "sessionAffinityConfig": None}})
        wait_until(lambda: len(set(servers(node, IP, 80, 12, source=3))) > 1, timeout=20, what="spread again")


def test_topology_hints_follow_the_nodes_zone(tmp_path: Path) -> None:
    with envoy_node(tmp_path) as node:
        start(node)
        node.core.create_node({"metadata": {"name": NODE, "labels": {"topology.kubernetes.io/zone": "zone-a"}}})
        node.service("web", HTTP, trafficDistribution="PreferClose")
        eps: list[dict[str, Any]] = [{"pod": 0, "zone": "zone-a", "for_zones": ["zone-a"]},
                                     {"pod": 1, "zone": "zone-b", "for_zones": ["zone-b"]},
                                     {"pod": 2, "zone": "zone-b", "for_zones": ["zone-b"]}]
        node.slice("web", {"http": 8080}, eps)
        wait_until(lambda: Key(4, IP, 80) in node.kernel_keys(), timeout=20, what="redirect")
        settled(node, {"pod0"})  # hinted for this node's zone
        # One ready endpoint without hints: kube-proxy ignores hints altogether.
        node.slice("web", {"http": 8080}, [*eps[:2], {"pod": 2, "zone": "zone-b"}])
        settled(node, {"pod0", "pod1", "pod2"})
        # PreferSameNode: node hints win when every endpoint has them and one names this node.
        node.slice("web", {"http": 8080}, [{"pod": 1, "for_zones": ["zone-a"], "for_nodes": [NODE]},
                                           {"pod": 2, "for_zones": ["zone-a"], "for_nodes": ["other-node"]}])
        settled(node, {"pod1"})


def test_named_target_ports_per_pod_renumbered_ports_and_type_change(tmp_path: Path) -> None:
    with envoy_node(tmp_path) as node:
        node.serve(0, "http", 4, port=8080)
        node.serve(1, "http", 4, port=9090)
        node.service("web", [{"name": "http", "port": 80, "targetPort": "web", "appProtocol": "http"}])
        # Two slices, one named port, different numbers per pod (a rolling change of containerPort).
        node.slice("web", {"http": 8080}, [{"pod": 0}], name="web-a")
        node.slice("web", {"http": 9090}, [{"pod": 1}], name="web-b")
        wait_until(lambda: Key(4, IP, 80) in node.kernel_keys(), timeout=20, what="redirect")
        settled(node, {"pod0", "pod1"})
        # The Service port renumbered on UPDATE: the old key goes, the new one serves.
        node.core.patch_namespaced_service("web", NS, {"spec": {"ports": [
            {"name": "http", "port": 8000, "targetPort": "web", "protocol": "TCP", "appProtocol": "http"}]}},
            _content_type="application/merge-patch+json")
        wait_until(lambda: Key(4, IP, 8000) in node.kernel_keys() and Key(4, IP, 80) not in node.kernel_keys(),
                   timeout=20, what="renumbered")
        settled(node, {"pod0", "pod1"}, port=8000)
        # ClusterIP -> NodePort: the node port appears and serves from a pod through Envoy.
        svc = node.core.patch_namespaced_service("web", NS, {"spec": {"type": "NodePort"}}, _preload_content=False).json()
        node_port = svc["spec"]["ports"][0]["nodePort"]
        wait_until(lambda: Key(4, None, node_port) in node.kernel_keys(), timeout=20, what="NodePort redirect")
        settled(node, {"pod0", "pod1"}, ip=node.topo.node_ip, port=node_port)
        # Hairpin: a pod reaching itself through its own Service.
        node.slice("web", {"http": 8080}, [{"pod": 0}], name="web-a")
        node.discovery.delete_namespaced_endpoint_slice("web-b", NS)
        settled(node, {"pod0"}, port=8000, source=0)


@pytest.mark.parametrize("backend", ["nftables", "iptables"])  # the block table serves both
def test_no_endpoints_is_refused_at_once_and_local_policy_without_local_endpoints_drops(tmp_path: Path, backend: str) -> None:
    """kube-proxy's "should be rejected when no endpoints exist": refused at once, not accepted-then-closed;
    back to Envoy as soon as an endpoint appears. internalTrafficPolicy Local with no endpoint here: dropped."""
    from sandbox.node.traffic import TrafficError, tcp_request

    with envoy_node(tmp_path, agent_args=["--backend", backend]) as node:
        start(node, pods=1)
        node.service("web", HTTP)  # labelled, no EndpointSlice at all
        wait_until(lambda: Key(4, IP, 80) in node.kernel_keys(), timeout=20, what="redirect installed")

        def refused() -> bool:
            try:
                tcp_request(node.topo.pods[1], IP, 80, timeout=2)
            except TrafficError as exc:
                return "ConnectionRefused" in str(exc)
            return False

        wait_until(refused, timeout=20, what="connection refused by the kernel")
        node.slice("web", {"http": 8080}, [{"pod": 0}])
        settled(node, {"pod0"}, source=1)
        # Local policy, the only endpoint elsewhere: kube-proxy drops (the SYN goes unanswered).
        node.service("local", HTTP, ips=("10.96.0.50",), internalTrafficPolicy="Local")
        node.slice("local", {"http": 8080}, [{"pod": 0, "node": "other-node"}])
        wait_until(lambda: Key(4, "10.96.0.50", 80) in node.kernel_keys(), timeout=20, what="redirect installed")

        def dropped() -> bool:
            try:
                tcp_request(node.topo.pods[1], "10.96.0.50", 80, timeout=0.5)
            except TrafficError as exc:
                return "timed out" in str(exc)
            return False

        wait_until(dropped, timeout=20, what="dropped like kube-proxy")
        blocks = node.topo.node.run(["nft", "list", "table", "inet", "lightpath-block"]).stdout
        sets = dict(re.findall(r"set (\w+) \{([^}]*)\}", blocks))
        assert "10.96.0.50 . 80" in sets["drop4"] and IP not in sets["reject4"] + sets["drop4"], blocks


def test_health_check_node_port_is_answered_like_kube_proxy(tmp_path: Path) -> None:
    """kube-proxy stops answering a labelled Service's healthCheckNodePort; the agent answers it the same way:
    200 with the local endpoint count, 503 with none (what cloud load balancers probe)."""
    with envoy_node(tmp_path) as node:
        start(node, pods=2)
        node.service("lb", HTTP, ips=("10.96.0.60",), type="LoadBalancer", externalTrafficPolicy="Local",
                     healthCheckNodePort=32100)
        node.slice("lb", {"http": 8080}, [{"pod": 0}, {"pod": 1, "node": "other-node"}])

        def probe() -> tuple[int, int]:
            reply = http_request(node.topo.pods[1], node.topo.node_ip, 32100, "/")
            return reply["status"], json.loads(reply["body"])["localEndpoints"]

        wait_until(lambda: probe() == (200, 1), timeout=20, what="200, one local endpoint")
        body = json.loads(http_request(node.topo.pods[1], node.topo.node_ip, 32100, "/")["body"])
        assert body["service"] == {"namespace": NS, "name": "lb"} and body["serviceProxyHealthy"] is True
        node.slice("lb", {"http": 8080}, [{"pod": 1, "node": "other-node"}])  # none left on this node
        wait_until(lambda: probe() == (503, 0), timeout=20, what="503, no local endpoint")


@pytest.mark.parametrize("backend", ["nftables", "iptables"])  # the block table serves both
def test_an_unexposed_port_of_a_migrated_cluster_ip_is_refused(tmp_path: Path, backend: str) -> None:
    """kube-proxy's cluster-ips-check: a ClusterIP on a port (or protocol) its Service does not expose is
    rejected, not dropped and never sent to the proxy; from a pod and from the node, both families. The
    exposed port keeps working, and an unlabelled Service's ClusterIP is left to kube-proxy."""
    import socket

    from sandbox.node.netns import run_in_netns
    from sandbox.node.traffic import TrafficError, tcp_request

    def outcome(source: Any, ip: str, port: int) -> str:
        try:
            tcp_request(source, ip, port, timeout=2)
        except TrafficError as exc:
            return "refused" if "ConnectionRefused" in str(exc) else f"other: {exc}"
        return "connected"

    def udp_refused(ip: str) -> bool:  # a connected UDP socket reports ICMP port unreachable on recv
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(2)
            sock.connect((ip, 80))
            sock.send(b"x")
            try:
                sock.recv(1)
            except ConnectionRefusedError:
                return True
            except TimeoutError:
                return False
            return False

    with envoy_node(tmp_path, agent_args=["--backend", backend]) as node:
        start(node, pods=1)
        node.serve(0, "http", 6, port=8080)
        node.service("web", HTTP, ips=CLUSTER_IPS)
        node.slice("web", {"http": 8080}, [{"pod": 0}])
        node.slice("web", {"http": 8080}, [{"pod": 0}], family=6)
        node.service("theirs", HTTP, ips=("10.96.0.70",), labelled=False)
        want = {Key(4, CLUSTER_IPS[0], 80), Key(6, CLUSTER_IPS[1], 80)}
        wait_until(lambda: want <= node.kernel_keys(), timeout=20, what="both redirects")
        settled(node, {"pod0"})
        pod, host = node.topo.pods[1], node.topo.node
        for ip in CLUSTER_IPS:
            wait_until(lambda ip=ip: outcome(pod, ip, 81) == "refused", timeout=20, what=f"{ip}:81 refused")
            assert outcome(host, ip, 81) == "refused"
            assert run_in_netns(pod.name, udp_refused, ip), f"UDP to {ip} not refused"
        assert http_request(pod, CLUSTER_IPS[1], 80, "/")["status"] == 200
        # Not ours: the ClusterIP check leaves it to kube-proxy (not in the sandbox here: the SYN dies).
        blocks = host.run(["nft", "list", "table", "inet", "lightpath-block"]).stdout
        assert "10.96.0.70" not in blocks and f"{CLUSTER_IPS[0]} . tcp . 80" in blocks, blocks
        assert outcome(pod, "10.96.0.70", 81).startswith("other: ")
        # The Service goes back to kube-proxy: the check goes with it.
        node.core.patch_namespaced_service("web", NS, {"metadata": {"labels": {c.SERVICE_PROXY_NAME_LABEL: None}}})
        wait_until(lambda: outcome(pod, CLUSTER_IPS[0], 81) != "refused", timeout=20, what="check removed")


@pytest.mark.parametrize("backend", ["nftables", "iptables"])  # the block table serves both
def test_load_balancer_source_ranges_are_enforced_for_load_balancer_traffic(tmp_path: Path, backend: str) -> None:
    """kube-proxy's firewall-check ("should only allow access from service loadbalancer source ranges"):
    a new connection to a load-balancer IP from outside loadBalancerSourceRanges is dropped before any
    DNAT; the ClusterIP is not filtered; a change of the ranges applies."""
    from sandbox.node.traffic import TrafficError

    def served(source: int, ip: str) -> bool:
        try:
            return http_request(node.topo.pods[source], ip, 80, "/", timeout=0.5)["status"] == 200
        except TrafficError as exc:
            assert "timed out" in str(exc), exc  # dropped, as kube-proxy does: not refused or reset
            return False

    lb_ip = "198.51.100.10"
    with envoy_node(tmp_path, agent_args=["--backend", backend]) as node:
        start(node, pods=1)
        allowed, other = node.topo.pod_ips[1], node.topo.pod_ips[2]
        node.service("lb", HTTP, ips=("10.96.0.80",), type="LoadBalancer",
                     loadBalancerSourceRanges=[f" {allowed}/32", "not-a-cidr", "fd00:1::/64"])
        node.core.patch_namespaced_service_status("lb", NS, {"status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}}})
        node.slice("lb", {"http": 8080}, [{"pod": 0}])
        wait_until(lambda: Key(4, lb_ip, 80) in node.kernel_keys(), timeout=20, what="LB IP redirected")
        wait_until(lambda: served(1, lb_ip), timeout=20, what="allowed source served")
        assert not served(2, lb_ip)  # outside the ranges: dropped
        assert served(2, "10.96.0.80")  # the ClusterIP is not subject to the ranges
        row = node.proxy("lb")["services"][0]
        assert any("'not-a-cidr' is not a CIDR" in p for p in row["problems"]), row  # skipped, said why
        node.core.patch_namespaced_service("lb", NS, {"spec": {"loadBalancerSourceRanges": [f"{other}/31"]}})
        wait_until(lambda: served(2, lb_ip), timeout=20, what="the new range applies (host bits allowed)")
        assert not served(1, lb_ip)  # 10.244.0.11 is outside 10.244.0.12/31 = 10.244.0.12-13


@pytest.mark.parametrize("backend", ["nftables", "iptables"])  # the block table serves both
def test_external_traffic_policy_local_keeps_the_client_source_address(tmp_path: Path, backend: str) -> None:
    """kube-proxy does not masquerade externalTrafficPolicy Local traffic, so the backend sees the client ("should
    preserve source IP for traffic thru NodePort/LoadBalancer with ETP Local"). With --preserve-source-ip on, the
    agent sends those external keys to Envoy's transparent listener, whose upstream connections start from the
    client's own address, and routes the backend's replies back to Envoy: TCP and HTTP, IPv4 and IPv6, a pod and a
    host-network backend. ClusterIP traffic, hairpin, this node's pods once the Node has podCIDRs, and a Cluster
    policy keep the ordinary listener (the backend sees the node); with Envoy down the kernel fallback serves."""
    from sandbox.node.traffic import tcp_listener, tcp_request

    with envoy_node(tmp_path, agent_args=["--preserve-source-ip", "on", "--backend", backend]) as node:
        node.serve(0, "http", 4, port=8080)
        node.serve(0, "tcp", 4, port=8081)
        node.serve(0, "tcp", 6, port=8081)
        node.listeners.append(tcp_listener(node.topo.node, 8082, 4, name="hostnet"))  # a host-network endpoint
        ports = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "appProtocol": "http"},
                 {"name": "tcp", "port": 81, "targetPort": 8081, "nodePort": 30081}]
        node.service("lb", ports, ips=CLUSTER_IPS, type="NodePort", externalTrafficPolicy="Local")
        for family in (4, 6):
            node.slice("lb", {"http": 8080, "tcp": 8081}, [{"pod": 0}], family=family)
        node.service("hostnet", [{"name": "tcp", "port": 82, "targetPort": 8082, "nodePort": 30082}], ips=("10.96.0.12",),
                     type="NodePort", externalTrafficPolicy="Local")
        node.discovery.create_namespaced_endpoint_slice(NS, {
            "metadata": {"name": "hostnet-ipv4", "namespace": NS, "labels": {"kubernetes.io/service-name": "hostnet"}},
            "addressType": "IPv4", "ports": [{"name": "tcp", "port": 8082, "protocol": "TCP"}],
            "endpoints": [{"addresses": [node.topo.node_ip], "nodeName": NODE, "conditions": {"ready": True}}]})
        client, client6 = node.topo.pod_ips[2], node.topo.pod_ips6[2]
        node_ip, node_ip6 = node.topo.node_ip, node.topo.node_ip6
        assert node_ip6 is not None

        def http_peer(ip: str, port: int) -> str:
            reply = http_request(node.topo.pods[2], ip, port, "/")
            assert reply["status"] == 200, reply
            return str(json.loads(reply["body"])["client"][0])

        def tcp_peer(ip: str, port: int) -> str:
            return str(tcp_request(node.topo.pods[2], ip, port)["peer"][0])

        wait_until(lambda: tcp_peer(node_ip, 30081) == client, timeout=20, what="TCP NodePort from the client's address")
        wait_until(lambda: http_peer(node_ip, 30080) == client, timeout=20, what="HTTP NodePort from the client's address")
        wait_until(lambda: tcp_peer(node_ip6, 30081) == client6, timeout=20, what="IPv6 NodePort from the client's address")
        # A host-network backend (the node itself answers): its replies start on the node and are routed back too.
        wait_until(lambda: tcp_peer(node_ip, 30082) == client, timeout=20, what="host-network backend sees the client")
        transparent_cx = f"listener.0.0.0.0_{c.DEFAULT_TRANSPARENT_PORT}.downstream_cx_total"
        before = node.envoy_counter(transparent_cx)
        for _ in range(20):  # every new connection, not one lucky one
            assert tcp_peer(node_ip, 30081) == client and http_peer(node_ip, 30080) == client
        assert node.envoy_counter(transparent_cx) - before == 40  # all through Envoy's transparent listener
        # ClusterIP traffic is not external: the ordinary listener, the backend sees the node.
        assert http_peer(CLUSTER_IPS[0], 80) != client
        # Hairpin: the endpoint dialling its own Service's NodePort is not handed its own address (it would drop
        # that as a martian); like kube-proxy's masquerade, it sees the node.
        hairpin = tcp_request(node.topo.pods[0], node_ip, 30081)
        assert hairpin["server"] == "pod0" and hairpin["peer"][0] != node.topo.pod_ips[0]
        block = node.topo.node.run(["nft", "list", "table", "inet", f"{c.DEFAULT_NFT_TABLE}-block"]).stdout
        assert "30081" in block and "chain transparent" in block, block
        assert "fwmark 0x1667/0x1667 lookup 1666" in node.topo.node.run(["ip", "rule"]).stdout
        # A Cluster policy: the keys leave the transparent listener, traffic keeps flowing through the ordinary one.
        node.core.patch_namespaced_service("lb", NS, {"spec": {"externalTrafficPolicy": "Cluster"}})
        wait_until(lambda: tcp_peer(node_ip, 30081) != client, timeout=20, what="TCP NodePort through the ordinary listener")
        assert http_peer(node_ip, 30080) != client
        # The reply route stays while the agent runs with the transparent listener (open connections need it).
        assert "fwmark 0x1667/0x1667 lookup 1666" in node.topo.node.run(["ip", "rule"]).stdout
        # Envoy down: the kernel fallback carries the keys (on the iptables backend its chains come after our
        # overlay, which is withdrawn first), and Envoy back: transparent again.
        node.envoy.kill()
        wait_until(lambda: tcp_peer(node_ip, 30082) == client and tcp_peer(node_ip, 30081) != client, timeout=20,
                   what="served by the kernel fallback while Envoy is down")  # 30081 is Cluster by now: SNAT
        node.envoy.start()
        wait_until(lambda: tcp_peer(node_ip, 30082) == client and node.envoy_counter(transparent_cx) > 0, timeout=30,
                   what="the transparent listener again")
        # The Node's podCIDRs (as on a bridge CNI, where a backend's reply to a pod beside it never passes the
        # host's routing): this node's pods keep the ordinary listener, still served.
        assert tcp_peer(node_ip, 30082) == client  # the host-network backend, Local: transparent so far
        node.core.create_node({"metadata": {"name": NODE}, "spec": {"podCIDRs": ["10.244.0.0/24", "bogus"]}})
        wait_until(lambda: tcp_peer(node_ip, 30082) != client, timeout=20, what="local pods exempted")
