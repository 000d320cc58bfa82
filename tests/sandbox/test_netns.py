"""The netns test bed itself: topology, cleanup, run_in_netns, and a real nft REDIRECT through it."""

from __future__ import annotations

import os
import socket
import subprocess
import threading

import pytest

from sandbox.node.netns import (
    NetNS,
    RemoteTraceback,
    Topology,
    TrafficError,
    cleanup_stale,
    nft,
    run_in_netns,
    tcp_listener,
    tcp_request,
)

pytestmark = pytest.mark.root

CLUSTER_IP = {4: "10.96.0.10", 6: "fd00:10:96::10"}


@pytest.fixture
def topo():
    with Topology(2) as t:
        yield t


@pytest.mark.parametrize("family", [4, 6])
def test_pods_and_node_reach_each_other(topo: Topology, family: int) -> None:
    pod_ips = topo.pod_ips if family == 4 else topo.pod_ips6
    node_ip = topo.node_ips[0] if family == 4 else topo.node_ips[1]
    pod0 = tcp_listener(topo.pods[0], 8080, family)
    node = tcp_listener(topo.node, 9090, family)

    from_pod = tcp_request(topo.pods[1], pod_ips[0], pod0.port, payload=b"hello")
    assert from_pod["server"] == topo.pods[0].name
    assert from_pod["local"] == [pod_ips[0], 8080]
    assert from_pod["peer"][0] == pod_ips[1]
    assert from_pod["echo"] == "hello"

    from_node = tcp_request(topo.node, pod_ips[0], pod0.port)
    assert from_node["peer"][0] == node_ip

    to_node = tcp_request(topo.pods[0], node_ip, node.port)
    assert to_node["local"] == [node_ip, 9090]
    assert to_node["peer"][0] == pod_ips[0]


def test_everything_is_removed_even_when_the_body_raises() -> None:
    with pytest.raises(RuntimeError, match="test body failed"), Topology(1) as t:
        names = [ns.name for ns in t.all]
        assert all(NetNS(n).exists() for n in names)
        listener = tcp_listener(t.pods[0], 0)
        raise RuntimeError("test body failed")
    assert not any(NetNS(n).exists() for n in names)
    assert listener.proc.poll() is not None


def test_names_are_unique_and_interfaces_short() -> None:
    with Topology(1) as a, Topology(1) as b:
        assert {ns.name for ns in a.all}.isdisjoint(ns.name for ns in b.all)
        assert str(os.getpid()) in a.node.name
        for ns in a.all:
            names = run_in_netns(ns.name, lambda: [n for _, n in socket.if_nameindex()])
            assert all(len(n) <= 15 for n in names)


def test_ipv4_only_topology() -> None:
    with Topology(1, ipv6=False) as t:
        assert t.pod_ips6 == [] and t.node_ips == ["10.244.0.1"]
        listener = tcp_listener(t.pods[0], 0)
        assert tcp_request(t.node, t.pod_ips[0], listener.port)["local"][0] == t.pod_ips[0]


def _interfaces() -> list[str]:
    return sorted(name for _, name in socket.if_nameindex())


def test_run_in_netns_sees_only_the_namespace(topo: Topology) -> None:
    assert run_in_netns(topo.pods[0].name, _interfaces) == ["eth0", "lo"]
    assert run_in_netns(topo.node.name, _interfaces) == ["lo", "svc0", "svc0p", "veth0", "veth1"]
    assert "svc0p" not in _interfaces()  # the caller did not move


def _boom(n: int) -> None:
    raise ValueError(f"boom {n}")


class _Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:
        super().__init__(a)


def _raise_unpicklable() -> None:
    raise _Unpicklable(1, 2)


def test_run_in_netns_propagates_exceptions_with_the_child_traceback(topo: Topology) -> None:
    with pytest.raises(ValueError, match="boom 3") as info:
        run_in_netns(topo.node.name, _boom, 3)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "_boom" in str(info.value.__cause__)

    with pytest.raises(RuntimeError, match="not picklable"):
        run_in_netns(topo.node.name, _raise_unpicklable)
    with pytest.raises(RuntimeError, match="not picklable"):
        run_in_netns(topo.node.name, threading.Lock)
    with pytest.raises(FileNotFoundError):
        run_in_netns("lp-no-such-netns", _interfaces)


def test_run_in_netns_times_out(topo: Topology) -> None:
    import time

    with pytest.raises(TimeoutError):
        run_in_netns(topo.node.name, time.sleep, 30, timeout=0.5)


def _redirect_ruleset(table: str, port: int) -> str:
    rules = []
    for hook in ("prerouting", "output"):
        rules.append(
            f"""chain {hook} {{
                type nat hook {hook} priority -110;  # nft 1.0.6: no "dstnat" name on output
                ip daddr {CLUSTER_IP[4]} tcp dport 80 redirect to :{port}
                ip6 daddr {CLUSTER_IP[6]} tcp dport 80 redirect to :{port}
            }}"""
        )
    return f"table inet {table} {{\n" + "\n".join(rules) + "\n}"


@pytest.mark.parametrize("family", [4, 6])
def test_nft_redirect_lands_on_listener_with_original_destination(topo: Topology, family: int) -> None:
    listener = tcp_listener(topo.node, 0, family)
    cluster_ip = CLUSTER_IP[family]
    # Before the rule: the ClusterIP is routed but nobody answers.
    with pytest.raises(TrafficError):
        tcp_request(topo.pods[0], cluster_ip, 80, timeout=0.5)

    nft(topo.node.name, _redirect_ruleset("lptest", listener.port))
    assert "redirect" in nft(topo.node.name, "list table inet lptest")

    from_pod = tcp_request(topo.pods[0], cluster_ip, 80)
    assert from_pod["server"] == topo.node.name
    assert from_pod["local"][1] == listener.port
    assert from_pod["original_dst"] == [cluster_ip, 80]

    # Node-local traffic goes through the output hook.
    from_node = tcp_request(topo.node, cluster_ip, 80)
    assert from_node["local"][1] == listener.port
    assert from_node["original_dst"] == [cluster_ip, 80]


def test_nft_errors_are_raised_with_the_script(topo: Topology) -> None:
    with pytest.raises(RuntimeError, match="nft failed"):
        nft(topo.node.name, "add rule inet nosuchtable nosuchchain accept")


def test_cleanup_stale_removes_only_dead_runs() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = NetNS(f"lpstale-{dead.pid}-0-node").create()
    stale.popen(["sleep", "300"])  # a leftover process keeps nothing alive
    live = NetNS(f"lpstale-{os.getpid()}-999-node").create()
    try:
        removed = cleanup_stale("lpstale")
        assert removed == [stale.name]
        assert not stale.exists() and live.exists()
    finally:
        stale.delete()
        live.delete()
