"""The nftables backend against the real kernel, in a throw-away node netns with pods and real TCP."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest

from redirector.model import BackendError, Delta, Key
from sandbox.node.netns import Topology, nft, run_in_netns
from sandbox.node.traffic import Listener, TrafficError, tcp_listener, tcp_request, udp_listener, udp_request
from tests.redirector.conftest import handles, marked_connect, nft_backend

pytestmark = pytest.mark.root
PROXY = 1666
CLUSTER_IP, CLUSTER_IP6 = "10.96.0.10", "fd00:10:96::a"


@pytest.fixture
def topo() -> Iterator[Topology]:
    with Topology(pods=2, prefix="lpr") as t:
        yield t


@pytest.fixture
def proxy(topo: Topology) -> Iterator[tuple[Listener, Listener]]:
    """The stand-in proxy: echo listeners on the node's port 1666, IPv4 and IPv6."""
    v4 = tcp_listener(topo.node, PROXY, 4, name="proxy")
    v6 = tcp_listener(topo.node, PROXY, 6, name="proxy")
    yield v4, v6
    v4.stop()
    v6.stop()


def lands_on_proxy(netns: Any, ip: str, port: int) -> bool:
    reply = tcp_request(netns, ip, port, timeout=2)
    return reply["server"] == "proxy" and reply["original_dst"] == [ip, port]


def test_ensure_creates_the_table_and_a_second_ensure_changes_nothing(topo: Topology) -> None:
    keys = {Key(4, CLUSTER_IP, 80), Key(6, CLUSTER_IP6, 80), Key(4, None, 30080), Key(6, None, 30080)}
    backend = nft_backend(topo.node.name)
    assert backend.ensure(keys) is True
    assert backend.read() == keys
    assert backend.shape_ok()
    before = handles(topo.node.name)
    assert backend.ensure(keys) is False  # the listed shape compares equal to ours: no churn every resync
    assert handles(topo.node.name) == before
    text = nft(topo.node.name, "list table inet lightpath")
    assert "priority dstnat - 10" in text and "dnat ip to 169.254.16.66:1666" in text
    assert "dnat ip6 to [fd6c:7066:1666::1]:1666" in text
    assert text.count("comment") >= 8  # every rule says who it is for


@pytest.mark.parametrize("family", [4, 6])
def test_pod_and_node_traffic_to_a_cluster_ip_is_redirected_with_its_original_destination(
    topo: Topology, proxy: Any, family: int
) -> None:
    ip = CLUSTER_IP if family == 4 else CLUSTER_IP6
    backend = nft_backend(topo.node.name)
    backend.ensure({Key(family, ip, 80)})
    assert lands_on_proxy(topo.pods[0], ip, 80)  # prerouting: pod -> Service
    assert lands_on_proxy(topo.node, ip, 80)  # output: the node itself -> Service
    with pytest.raises(TrafficError):  # another port of the same IP is not ours
        tcp_request(topo.pods[0], ip, 81, timeout=0.5)


@pytest.mark.parametrize("family", [4, 6])
def test_node_ports_are_redirected_on_the_nodes_own_addresses_per_family(
    topo: Topology, proxy: Any, family: int
) -> None:
    backend = nft_backend(topo.node.name)
    backend.ensure({Key(family, None, 30080)})
    node_ip = topo.node_ip if family == 4 else topo.node_ip6
    other_ip = topo.node_ip6 if family == 4 else topo.node_ip
    assert node_ip and other_ip
    assert lands_on_proxy(topo.pods[0], node_ip, 30080)
    with pytest.raises(TrafficError):  # the Service's other family is not captured
        tcp_request(topo.pods[0], other_ip, 30080, timeout=0.5)


def test_proxy_marked_traffic_and_udp_are_not_redirected(topo: Topology, proxy: Any) -> None:
    # An "externalIP" that really lives on pod1: unredirected traffic reaches pod1's own listeners.
    target = topo.pod_ips[1]
    backend_pod = tcp_listener(topo.pods[1], 80, 4, name="backend")
    udp_pod = udp_listener(topo.pods[1], 80, 4, name="udp-backend")
    try:
        backend = nft_backend(topo.node.name)
        backend.ensure({Key(4, target, 80)})
        unmarked = run_in_netns(topo.node.name, marked_connect, target, 80, None)
        marked = run_in_netns(topo.node.name, marked_connect, target, 80, 0x1666)
        assert isinstance(unmarked, dict) and unmarked["server"] == "proxy"
        assert isinstance(marked, dict) and marked["server"] == "backend" and marked["original_dst"] is None
        assert udp_request(topo.pods[0], target, 80)["server"] == "udp-backend"
    finally:
        backend_pod.stop()
        udp_pod.stop()


def test_proxy_uid_is_excluded_on_the_output_path(topo: Topology) -> None:
    backend = nft_backend(topo.node.name, proxy_uid=4242, proxy_mark=None)
    backend.ensure(set())
    text = nft(topo.node.name, "list chain inet lightpath output")
    assert "meta skuid 4242 return" in text and "meta mark" not in text
    assert "skuid" not in nft(topo.node.name, "list chain inet lightpath prerouting")


def test_apply_adds_and_deletes_elements_in_one_transaction(topo: Topology, proxy: Any) -> None:
    backend = nft_backend(topo.node.name)
    a, b, c = Key(4, "10.96.0.1", 80), Key(4, "10.96.0.2", 80), Key(6, "fd00:10:96::3", 443)
    backend.ensure({a})
    backend.apply(Delta(add=frozenset({b, c}), delete=frozenset({a})))
    assert backend.read() == {b, c}
    assert lands_on_proxy(topo.pods[0], "10.96.0.2", 80)
    # Deleting a missing element fails the WHOLE transaction: the add in it is not applied either.
    d = Key(4, "10.96.0.4", 80)
    with pytest.raises(BackendError):
        backend.apply(Delta(add=frozenset({d}), delete=frozenset({a})))
    assert backend.read() == {b, c}


def test_ensure_adopts_an_existing_table_and_repairs_only_the_elements(topo: Topology) -> None:
    keys = {Key(4, "10.96.0.1", 80), Key(4, "10.96.0.2", 80)}
    nft_backend(topo.node.name).ensure(keys)
    before = handles(topo.node.name)
    nft(topo.node.name, "add element inet lightpath svc4 { 10.96.9.9 . 99 }\n"
                        "delete element inet lightpath svc4 { 10.96.0.2 . 80 }")
    fresh = nft_backend(topo.node.name)  # a restarted agent
    assert fresh.ensure(keys) is True
    assert fresh.read() == keys
    assert handles(topo.node.name) == before  # adopted: same chains, rules and sets, nothing flushed or recreated


@pytest.mark.parametrize(
    "tamper",
    [
        "add rule inet lightpath prerouting counter",
        "delete chain inet lightpath output",
        "flush chain inet lightpath prerouting",
        "delete table inet lightpath\nadd table inet lightpath\n"
        "add set inet lightpath svc4 { type ipv4_addr . inet_service; flags interval; }",
        "add set inet lightpath extra { type ipv4_addr; }",
        "delete table inet lightpath",
    ],
    ids=["extra-rule", "missing-chain", "flushed-chain", "wrong-set-type", "extra-set", "table-deleted"],
)
def test_an_unexpected_shape_is_replaced_atomically(topo: Topology, proxy: Any, tamper: str) -> None:
    keys = {Key(4, CLUSTER_IP, 80), Key(6, CLUSTER_IP6, 80)}
    backend = nft_backend(topo.node.name)
    backend.ensure(keys)
    nft(topo.node.name, tamper)
    assert backend.ensure(keys) is True
    assert backend.shape_ok() and backend.read() == keys
    assert backend.ensure(keys) is False
    assert lands_on_proxy(topo.pods[0], CLUSTER_IP, 80)


def test_cleanup_removes_our_table_only_and_is_idempotent(topo: Topology) -> None:
    nft(topo.node.name, "add table inet other\nadd chain inet other c { type nat hook prerouting priority 0; }")
    backend = nft_backend(topo.node.name)
    backend.ensure({Key(4, CLUSTER_IP, 80)})
    backend.cleanup()
    backend.cleanup()
    tables = nft(topo.node.name, "list tables")
    assert "inet other" in tables and "lightpath" not in tables
    assert backend.read() == frozenset()
    assert backend.addresses.present() == []  # the DNAT targets on lo go with the rules


def test_table_name_is_configurable(topo: Topology) -> None:
    backend = nft_backend(topo.node.name, table="lp_test")
    backend.ensure({Key(4, CLUSTER_IP, 80)})
    assert "table inet lp_test" in nft(topo.node.name, "list tables")
    assert backend.describe()["table"] == "inet lp_test"
    assert "dnat ip to 169.254.16.66:1666" in str(backend.describe()["ruleset"])
    assert backend.describe()["redirect_addresses"] == {"169.254.16.66/32": True, "fd6c:7066:1666::1/128": True}


def many_keys(n: int, start: int = 0) -> set[Key]:
    keys: set[Key] = set()
    for i in range(start, start + n):
        keys.add(Key(4, f"10.{96 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}", 80))
        keys.add(Key(6, str(ipaddress.ip_address(f"fd00:10:96::{i:x}")), 80))
    return keys


@pytest.mark.slow
def test_ten_thousand_dual_stack_services_load_and_read_back(topo: Topology, proxy: Any) -> None:
    keys = many_keys(10_000)
    backend = nft_backend(topo.node.name)
    assert backend.ensure(keys) is True
    assert backend.read() == keys
    assert backend.ensure(keys) is False
    assert lands_on_proxy(topo.pods[0], "10.96.39.15", 80)  # service 9999
    assert lands_on_proxy(topo.pods[0], "fd00:10:96::270f", 80)


def _flip_forever(n: int) -> None:
    """In the node netns: replace one generation of keys by the other, one transaction each, until killed."""
    from redirector.model import diff
    from redirector.nft import NftBackend

    backend = NftBackend()
    old, new = many_keys(n, 0), many_keys(n, n)
    while True:
        backend.apply(diff(new, old))
        backend.apply(diff(old, new))


@pytest.mark.slow
def test_sigkill_in_the_middle_of_large_syncs_leaves_old_or_new_never_a_mix(topo: Topology) -> None:
    n = 5_000
    old, new = many_keys(n, 0), many_keys(n, n)
    backend = nft_backend(topo.node.name)
    backend.ensure(old)
    for attempt in range(6):
        # run_in_netns SIGKILLs the writer when its time is up: at a different point of the flip-flop each time.
        with pytest.raises(TimeoutError):
            run_in_netns(topo.node.name, _flip_forever, n, timeout=0.4 + 0.13 * attempt)
        seen = backend.read()
        assert seen in (old, new), f"attempt {attempt}: a mix of {len(seen & old)} old and {len(seen & new)} new"
        backend.ensure(old)
    assert backend.read() == old
