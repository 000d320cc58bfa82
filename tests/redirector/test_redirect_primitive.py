"""The redirect primitive with real packets, for both backends: DNAT to our address on lo reaches the proxy
with SO_ORIGINAL_DST = the Service address in the addressed topology and in the addressless (Calico-style)
one, IPv4 and IPv6, from a pod and from the node; REDIRECT loses pod traffic where the host veth has no
address. The "proxy" is an echo server on the node's port 1666 reporting its local address and original_dst."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from redirector.iptables import IptablesBackend
from redirector.model import Family, Key
from sandbox.node.netns import NODE_IP, NODE_IP6, NetNS, Topology
from sandbox.node.traffic import TrafficError, tcp_listener, tcp_request
from shared import constants as c
from tests.redirector.conftest import nft_backend

pytestmark = pytest.mark.root
CLUSTER: dict[Family, str] = {4: "10.96.0.10", 6: "fd00:10:96::a"}
TARGET: dict[Family, str] = {4: c.DEFAULT_REDIRECT_ADDRESS, 6: c.DEFAULT_REDIRECT_ADDRESS6}
NODE: dict[Family, str] = {4: NODE_IP, 6: NODE_IP6}
NODE_PORT = 30080
BACKENDS = ["nftables", "iptables"]


@contextmanager
def node(*, addressless: bool, ipv6: bool = True) -> Iterator[Topology]:
    with Topology(pods=2, prefix="lpr", addressless=addressless, ipv6=ipv6) as topo:
        for family in (4, 6) if ipv6 else (4,):
            tcp_listener(topo.node, c.DEFAULT_PROXY_PORT, family, name="proxy")  # stopped with the netns
        yield topo


def backend(kind: str, topo: Topology, **kw: Any) -> Any:
    if kind == "nftables":
        return nft_backend(topo.node.name, **kw)
    return IptablesBackend(variant="nft", netns=topo.node.name, families=(4, 6) if topo.ipv6 else (4,), **kw)


def outcome(source: NetNS, ip: str, port: int) -> dict[str, Any] | str:
    """The proxy's reply to a connection from ``source``, or "lost" when nothing answered within 1 s."""
    try:
        return tcp_request(source, ip, port, timeout=1)
    except TrafficError:
        return "lost"


def assert_at_proxy(source: NetNS, ip: str, port: int, local: str | None = None) -> None:
    reply = outcome(source, ip, port)
    assert isinstance(reply, dict) and reply["server"] == "proxy", (source, ip, port, reply)
    assert reply["original_dst"] == [ip, port], reply  # what Envoy's original_dst listener filter reads
    if local is not None:
        assert reply["local"] == [local, c.DEFAULT_PROXY_PORT], reply


@pytest.mark.parametrize("addressless", [False, True], ids=["addressed", "addressless"])
@pytest.mark.parametrize("kind", BACKENDS)
def test_dnat_reaches_the_proxy_with_the_service_as_original_destination(kind: str, addressless: bool) -> None:
    with node(addressless=addressless) as topo:
        keys = {Key(4, CLUSTER[4], 80), Key(6, CLUSTER[6], 80), Key(4, None, NODE_PORT), Key(6, None, NODE_PORT)}
        assert backend(kind, topo).ensure(keys) is True
        for family in (4, 6):
            for source in (topo.pods[0], topo.node):  # prerouting, then output
                assert_at_proxy(source, CLUSTER[family], 80, local=TARGET[family])
                assert_at_proxy(source, NODE[family], NODE_PORT, local=TARGET[family])


@pytest.mark.parametrize("kind", BACKENDS)
def test_redirect_loses_pod_traffic_without_an_address_on_the_host_veth_and_dnat_does_not(kind: str) -> None:
    keys = {Key(4, CLUSTER[4], 80), Key(6, CLUSTER[6], 80)}
    with node(addressless=True) as topo:
        assert backend(kind, topo, mode="redirect").ensure(keys) is True
        assert outcome(topo.pods[0], CLUSTER[4], 80) == "lost"  # REDIRECT found no address on veth0: dropped
        assert_at_proxy(topo.node, CLUSTER[4], 80, local="127.0.0.1")  # the output path rewrites to loopback
        restarted = backend(kind, topo)  # the default: dnat, adopting the keys the REDIRECT rules held
        assert restarted.read() == keys
        assert restarted.ensure(keys) is True  # the rules' shape is rewritten
        assert restarted.ensure(keys) is False
        for family in (4, 6):
            assert_at_proxy(topo.pods[0], CLUSTER[family], 80, local=TARGET[family])


@pytest.mark.parametrize("kind", BACKENDS)
def test_redirect_mode_still_serves_a_node_whose_host_veths_have_an_address(kind: str) -> None:
    with node(addressless=False) as topo:
        b = backend(kind, topo, mode="redirect")
        b.ensure({Key(4, CLUSTER[4], 80), Key(6, CLUSTER[6], 80)})
        assert b.addresses.present() == []  # REDIRECT needs no address of ours
        for family in (4, 6):
            assert_at_proxy(topo.pods[0], CLUSTER[family], 80, local=NODE[family])
            assert_at_proxy(topo.node, CLUSTER[family], 80)


@pytest.mark.parametrize("kind", BACKENDS)
def test_a_deleted_redirect_address_is_put_back_by_ensure(kind: str) -> None:
    keys = {Key(4, CLUSTER[4], 80), Key(6, CLUSTER[6], 80)}
    with node(addressless=True) as topo:
        b = backend(kind, topo)
        b.ensure(keys)
        assert b.ensure(keys) is False
        topo.node.run(["ip", "addr", "del", f"{TARGET[4]}/32", "dev", "lo"])
        topo.node.run(["ip", "-6", "addr", "del", f"{TARGET[6]}/128", "dev", "lo"])
        assert outcome(topo.pods[0], CLUSTER[4], 80) == "lost"  # the DNAT points at an address nobody owns
        assert b.ensure(keys) is True  # the resync repairs it like any other drift
        for family in (4, 6):
            assert_at_proxy(topo.pods[0], CLUSTER[family], 80, local=TARGET[family])
        b.cleanup()
        assert b.addresses.present() == []
        lo = topo.node.run(["ip", "addr", "show", "dev", "lo"]).stdout
        assert "127.0.0.1/8" in lo and "::1/128" in lo  # nothing but ours removed


def test_the_node_never_picks_our_address_as_the_source_of_its_own_traffic() -> None:
    """Scope host (IPv4) and deprecated (IPv6): a kubelet probe to a pod behind an addressless veth still leaves
    from the node IP, not from 169.254.16.66 / the ULA on lo."""
    with node(addressless=True) as topo:
        nft_backend(topo.node.name).ensure(set())
        lo = topo.node.run(["ip", "addr", "show", "dev", "lo"]).stdout
        assert f"{TARGET[4]}/32 scope host" in lo and f"{TARGET[6]}/128" in lo and "deprecated" in lo
        pods: list[tuple[Family, str]] = [(4, topo.pod_ips[0]), (6, topo.pod_ips6[0])]
        for family, pod_ip in pods:
            listener = tcp_listener(topo.pods[0], 0, family, name="pod")
            try:
                assert tcp_request(topo.node, pod_ip, listener.port)["peer"][0] == NODE[family]
            finally:
                listener.stop()


def test_ipv6_disabled_on_lo_skips_the_ipv6_address_and_ipv4_is_served() -> None:
    with node(addressless=True, ipv6=False) as topo:
        topo.node.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.lo.disable_ipv6=1"])
        b = nft_backend(topo.node.name)
        assert b.ensure({Key(4, CLUSTER[4], 80)}) is True
        assert b.addresses.present() == [f"{TARGET[4]}/32"]
        assert_at_proxy(topo.pods[0], CLUSTER[4], 80, local=TARGET[4])
        assert b.ensure({Key(4, CLUSTER[4], 80)}) is False  # the skipped address is not drift


def test_the_addressless_topology_has_no_address_on_the_host_veths_and_pods_route_via_the_gateway() -> None:
    with node(addressless=True) as topo:
        veth = topo.node.run(["ip", "-br", "addr", "show", "dev", "veth0"]).stdout.split()
        assert veth[0] == "veth0@if2" and all(a.startswith("fe80::") for a in veth[2:]), veth  # the kernel's own LL
        routes = topo.pods[0].run(["ip", "route"]).stdout + topo.pods[0].run(["ip", "-6", "route"]).stdout
        assert "default via 169.254.1.1 dev eth0" in routes and "default via fe80::1 dev eth0" in routes
        assert f"{topo.pod_ips[0]} dev veth0" in topo.node.run(["ip", "route"]).stdout
        listener = tcp_listener(topo.pods[1], 0, 6, name="pod1")
        try:  # pod to pod through the node, and the node answering a pod
            assert tcp_request(topo.pods[0], topo.pod_ips6[1], listener.port)["server"] == "pod1"
        finally:
            listener.stop()
        assert tcp_request(topo.pods[0], NODE[4], c.DEFAULT_PROXY_PORT)["local"] == [NODE[4], c.DEFAULT_PROXY_PORT]
