"""resources: the listener matcher kept exact one change at a time, deterministic bytes, the bootstrap."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from controlplane import resources as res
from controlplane.translate import ClusterSpec, LoadSpec
from redirector.model import Key

Maps = tuple[dict[str, dict[str, str]], dict[str, str]]
EMPTY4: Maps = ({"0.0.0.0": {"0": "tcp"}}, {"0": "tcp-nodeport"})
EMPTY6: Maps = ({"::": {"0": "tcp"}}, {"0": "tcp-nodeport"})


def maps(builder: res.ListenerBuilder) -> Maps:
    """(destination IP -> port -> chain, node port -> chain), read back from the protobuf."""
    matcher = builder.listener.filter_chain_matcher
    ips = {ip: {port: action.action.name for port, action in on.matcher.matcher_tree.exact_match_map.map.items()}
           for ip, on in matcher.matcher_tree.exact_match_map.map.items()}
    nodeports = {port: action.action.name
                 for port, action in matcher.on_no_match.matcher.matcher_tree.exact_match_map.map.items()}
    return ips, nodeports


def test_a_new_listener_holds_only_the_sentinels() -> None:
    assert maps(res.ListenerBuilder(4)) == EMPTY4
    assert maps(res.ListenerBuilder(6)) == EMPTY6
    listener = res.ListenerBuilder(6, port=15001).listener
    assert (listener.name, listener.address.socket_address.address, listener.address.socket_address.port_value) == (
        "lightpath_ipv6", "::", 15001)
    assert sorted(c.name for c in listener.filter_chains) == ["http", "http-nodeport", "tcp", "tcp-nodeport"]


def test_set_and_remove_keep_the_maps_exact() -> None:
    b = res.ListenerBuilder(4)
    b.set(Key(4, "10.96.0.10", 80), "http")
    b.set(Key(4, "10.96.0.10", 443), "tcp")
    b.set(Key(4, "10.96.0.11", 80), "tcp")
    b.set(Key(4, None, 30080), "http")
    assert maps(b) == ({"0.0.0.0": {"0": "tcp"}, "10.96.0.10": {"80": "http", "443": "tcp"}, "10.96.0.11": {"80": "tcp"}},
                       {"0": "tcp-nodeport", "30080": "http-nodeport"})
    assert b.keys == {Key(4, "10.96.0.10", 80): "http", Key(4, "10.96.0.10", 443): "tcp",
                      Key(4, "10.96.0.11", 80): "tcp", Key(4, None, 30080): "http"}
    b.set(Key(4, "10.96.0.10", 80), "tcp")  # the chain changes in place
    b.remove(Key(4, "10.96.0.10", 443))
    assert maps(b)[0]["10.96.0.10"] == {"80": "tcp"}
    b.remove(Key(4, "10.96.0.10", 80))  # the last port of an IP drops the IP
    b.remove(Key(4, None, 30080))
    assert maps(b) == ({"0.0.0.0": {"0": "tcp"}, "10.96.0.11": {"80": "tcp"}}, {"0": "tcp-nodeport"})
    b.remove(Key(4, "10.96.0.11", 80))
    assert maps(b) == EMPTY4 and b.keys == {}


def test_removing_an_unknown_key_changes_nothing() -> None:
    b = res.ListenerBuilder(4)
    b.set(Key(4, "10.96.0.10", 80), "http")
    before = res.serialize(b.listener)
    b.remove(Key(4, "10.96.0.10", 81))
    b.remove(Key(4, "10.96.0.12", 80))
    b.remove(Key(4, None, 30080))
    assert res.serialize(b.listener) == before


def test_keys_on_the_sentinel_address_never_remove_the_sentinel() -> None:
    b = res.ListenerBuilder(6)
    b.set(Key(6, "::", 80), "tcp")
    b.set(Key(6, None, 30000), "tcp")
    assert maps(b) == ({"::": {"0": "tcp", "80": "tcp"}}, {"0": "tcp-nodeport", "30000": "tcp-nodeport"})
    b.remove(Key(6, "::", 80))
    b.remove(Key(6, None, 30000))
    assert maps(b) == EMPTY6


def test_listener_bytes_do_not_depend_on_the_order_of_changes() -> None:
    keys = [(Key(4, f"10.96.0.{i}", 80 + i), "http" if i % 2 else "tcp") for i in range(1, 30)] + [(Key(4, None, 30001), "tcp")]
    a, b = res.ListenerBuilder(4), res.ListenerBuilder(4)
    for key, chain in keys:
        a.set(key, chain)
    for key, chain in reversed(keys):
        b.set(key, chain)
    assert res.version_of(res.serialize(a.listener)) == res.version_of(res.serialize(b.listener))
    for key, _ in keys:  # back to nothing: the same version as a fresh listener
        a.remove(key)
    assert res.version_of(res.serialize(a.listener)) == res.version_of(res.serialize(res.ListenerBuilder(4).listener))
    assert res.serialize(b.listener) != res.serialize(a.listener)


def test_clusters_and_endpoints_are_deterministic_and_distinct() -> None:
    spec = ClusterSpec("10.96.0.10:80", "shop_web_80_ipv4", "http", "shop/web")
    one, two = res.serialize(res.cluster(spec)), res.serialize(res.cluster(spec))
    assert one == two and res.version_of(one) == res.version_of(two)
    assert res.serialize(res.cluster(ClusterSpec(spec.name, spec.stat_name, "h2c", spec.service))) != one
    parsed = cluster_pb2.Cluster.FromString(one)
    assert (parsed.name, parsed.alt_stat_name, parsed.type) == ("10.96.0.10:80", "shop_web_80_ipv4", cluster_pb2.Cluster.EDS)
    assert res.HTTP_PROTOCOL_OPTIONS not in parsed.typed_extension_protocol_options
    h2c = res.cluster(ClusterSpec(spec.name, spec.stat_name, "h2c", spec.service))
    assert res.HTTP_PROTOCOL_OPTIONS in h2c.typed_extension_protocol_options
    load = LoadSpec("10.96.0.10:80", (("10.0.0.1", 8080), ("10.0.0.2", 8080)))
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(res.serialize(res.load_assignment(load)))
    assert [(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
            for e in cla.endpoints[0].lb_endpoints] == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]
    assert len(res.load_assignment(LoadSpec("x", ())).endpoints) == 0
    assert res.version_of(b"a") != res.version_of(b"b")


def test_routes_name_the_cluster_by_header() -> None:
    route = res.route_configuration(6)
    assert route.name == res.route_name(6) == "lightpath_http_ipv6"
    action = route.virtual_hosts[0].routes[0]
    assert action.route.cluster_header == res.CLUSTER_HEADER and res.CLUSTER_HEADER in action.request_headers_to_remove


def test_bootstrap_needs_exactly_one_xds_target() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        res.bootstrap(node_id="n")
    with pytest.raises(ValueError, match="exactly one"):
        res.bootstrap(node_id="n", xds_socket="/run/x.sock", xds_address=("127.0.0.1", 18000))


def test_bootstrap_points_at_the_given_target() -> None:
    def target(boot: dict[str, object]) -> object:
        clusters = boot["static_resources"]["clusters"]  # type: ignore[index]
        return clusters[0]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]

    by_socket = res.bootstrap(node_id="node-a", xds_socket="/run/lightpath/xds.sock")
    assert target(by_socket) == {"pipe": {"path": "/run/lightpath/xds.sock"}}
    assert by_socket["node"]["id"] == "node-a"
    assert by_socket["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    by_tcp = res.bootstrap(node_id="node-a", xds_address=("127.0.0.1", 18000))
    assert target(by_tcp) == {"socket_address": {"address": "127.0.0.1", "port_value": 18000}}
