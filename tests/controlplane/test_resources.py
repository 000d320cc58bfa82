"""resources: the listener matcher kept exact one change at a time, deterministic bytes, the bootstrap."""

from __future__ import annotations

import random

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from controlplane import l7
from controlplane import resources as res
from controlplane.translate import ClusterSpec, LoadSpec
from redirector.model import Key

Entry = str | tuple[str, dict[str, str]]
EMPTY: dict[str, Entry] = {"0": "tcp-nodeport"}


def ports(builder: res.ListenerBuilder) -> dict[str, Entry]:
    """Destination port -> its chain, or (the chain of an unlisted address, {listed address: chain}), read
    back from the protobuf."""
    found: dict[str, Entry] = {}
    tree = builder.listener.filter_chain_matcher.matcher_tree
    assert tree.input == res._DESTINATION_PORT and not builder.listener.filter_chain_matcher.HasField("on_no_match")
    for port, on in tree.exact_match_map.map.items():
        if on.HasField("action"):
            found[port] = on.action.name
            continue
        assert on.matcher.matcher_tree.input == res._DESTINATION_IP
        found[port] = (on.matcher.on_no_match.action.name,
                       {ip: a.action.name for ip, a in on.matcher.matcher_tree.exact_match_map.map.items()})
    return found


def chain_for(builder: res.ListenerBuilder, ip: str, port: int) -> str | None:
    """The chain Envoy picks for a connection to ip:port (None: no chain, the connection is closed)."""
    entry = ports(builder).get(str(port))
    if entry is None or isinstance(entry, str):
        return entry
    return entry[1].get(ip, entry[0])


def test_a_new_listener_holds_only_the_sentinel() -> None:
    assert ports(res.ListenerBuilder(4)) == EMPTY and ports(res.ListenerBuilder(6)) == EMPTY
    listener = res.ListenerBuilder(6, port=15001).listener
    assert (listener.name, listener.address.socket_address.address, listener.address.socket_address.port_value) == (
        "lightpath_ipv6", "::", 15001)
    assert sorted(c.name for c in listener.filter_chains) == ["http", "http-nodeport", "tcp", "tcp-nodeport"]


def test_a_port_lists_only_the_addresses_that_take_the_other_chain() -> None:
    b = res.ListenerBuilder(4)
    b.set(Key(4, "10.96.0.10", 80), "http")
    b.set(Key(4, "10.96.0.11", 80), "http")
    b.set(Key(4, "10.96.0.10", 443), "tcp")
    assert ports(b) == {"0": "tcp-nodeport", "80": "http", "443": "tcp"}
    before = res.serialize(b.listener)
    b.set(Key(4, "10.96.0.12", 80), "http")  # the port's default chain: the listener's bytes do not change
    assert res.serialize(b.listener) == before
    b.set(Key(4, "10.96.0.13", 80), "tcp")
    assert ports(b)["80"] == ("http", {"10.96.0.13": "tcp"})
    b.set(Key(4, "10.96.0.14", 80), "tcp")
    b.set(Key(4, "10.96.0.15", 80), "tcp")  # 3 http, 3 tcp: a tie takes tcp
    assert ports(b)["80"] == ("tcp", {"10.96.0.10": "http", "10.96.0.11": "http", "10.96.0.12": "http"})
    b.set(Key(4, "10.96.0.10", 80), "tcp")  # the chain of a key changes in place
    assert ports(b)["80"] == ("tcp", {"10.96.0.11": "http", "10.96.0.12": "http"})
    for i in (11, 12):
        b.remove(Key(4, f"10.96.0.{i}", 80))
    assert ports(b) == {"0": "tcp-nodeport", "80": "tcp", "443": "tcp"}
    assert b.keys == {Key(4, f"10.96.0.{i}", 80): "tcp" for i in (10, 13, 14, 15)} | {Key(4, "10.96.0.10", 443): "tcp"}
    b.remove(Key(4, "10.96.0.10", 443))  # the last address of a port drops the port
    assert ports(b) == {"0": "tcp-nodeport", "80": "tcp"}
    for i in (10, 13, 14, 15):
        b.remove(Key(4, f"10.96.0.{i}", 80))
    assert ports(b) == EMPTY and b.keys == {}


def test_a_nodeport_that_is_also_a_service_port_lists_every_address_and_falls_through() -> None:
    """A NodePort reaches every node address, and an external or LoadBalancer IP may be one."""
    b = res.ListenerBuilder(4)
    b.set(Key(4, None, 30080), "http")
    assert ports(b) == {"0": "tcp-nodeport", "30080": "http-nodeport"}
    b.set(Key(4, "192.168.1.2", 30080), "http")  # an external IP on this port: listed although its chain is http
    b.set(Key(4, "192.168.1.3", 30080), "tcp")
    assert ports(b)["30080"] == ("http-nodeport", {"192.168.1.2": "http", "192.168.1.3": "tcp"})
    assert chain_for(b, "192.168.1.4", 30080) == "http-nodeport"
    b.set(Key(4, None, 30080), "tcp")
    assert ports(b)["30080"] == ("tcp-nodeport", {"192.168.1.2": "http", "192.168.1.3": "tcp"})
    b.remove(Key(4, None, 30080))  # no NodePort any more: the port's default again
    assert ports(b)["30080"] == ("tcp", {"192.168.1.2": "http"})
    b.set(Key(4, None, 30080), "http")  # and back
    assert ports(b)["30080"] == ("http-nodeport", {"192.168.1.2": "http", "192.168.1.3": "tcp"})
    b.remove(Key(4, "192.168.1.2", 30080))
    b.remove(Key(4, "192.168.1.3", 30080))
    assert ports(b) == {"0": "tcp-nodeport", "30080": "http-nodeport"}


def test_removing_an_unknown_key_changes_nothing() -> None:
    b = res.ListenerBuilder(4)
    b.set(Key(4, "10.96.0.10", 80), "http")
    before = res.serialize(b.listener)
    b.remove(Key(4, "10.96.0.10", 81))
    b.remove(Key(4, "10.96.0.12", 80))
    b.remove(Key(4, None, 30080))
    assert res.serialize(b.listener) == before


def test_keys_on_the_sentinel_port_never_remove_the_sentinel() -> None:
    b = res.ListenerBuilder(6)
    b.set(Key(6, "fd00::10", 0), "http")
    b.set(Key(6, "fd00::11", 0), "tcp")
    assert ports(b) == {"0": ("tcp", {"fd00::10": "http"})}
    b.remove(Key(6, "fd00::10", 0))
    b.remove(Key(6, "fd00::11", 0))
    assert ports(b) == EMPTY
    b.set(Key(6, None, 0), "http")
    b.remove(Key(6, None, 0))
    assert ports(b) == EMPTY


def test_every_key_takes_its_chain_whatever_the_order_of_changes() -> None:
    """Random batches of sets and removes on few addresses and ports: after each batch every key reaches its
    chain, a NodePort reaches its chain on every address without a key on that port, and the listener's
    bytes are those of a fresh builder given the same keys."""
    rng = random.Random(7)
    ips = [f"10.96.0.{i}" for i in range(1, 6)]
    service_ports, nodeports = [80, 443, 30080], [30080, 30081]
    b = res.ListenerBuilder(4)
    for _ in range(400):
        for _ in range(rng.choice([1, 1, 2, 5])):  # the listener is brought up to date when read
            key = Key(4, None, rng.choice(nodeports)) if rng.random() < 0.2 else Key(4, rng.choice(ips), rng.choice(service_ports))
            if rng.random() < 0.35:
                b.remove(key)
            else:
                b.set(key, rng.choice(["tcp", "http"]))
        for port in {*service_ports, *nodeports}:
            nodeport = b.keys.get(Key(4, None, port))
            for ip in [*ips, "192.168.1.2"]:  # the last one: a node address no key names
                chain = b.keys.get(Key(4, ip, port))
                if chain is not None:
                    assert chain_for(b, ip, port) == chain
                elif nodeport is not None:
                    assert chain_for(b, ip, port) == f"{nodeport}-nodeport"
            if nodeport is None and not any(k.port == port for k in b.keys):
                assert str(port) not in ports(b)
        fresh = res.ListenerBuilder(4)
        for k, chain in sorted(b.keys.items()):
            fresh.set(k, chain)
        assert res.serialize(fresh.listener) == res.serialize(b.listener)
    for key in list(b.keys):  # back to nothing: the same version as a fresh listener
        b.remove(key)
    assert res.version_of(res.serialize(b.listener)) == res.version_of(res.serialize(res.ListenerBuilder(4).listener))


def test_the_matcher_does_not_grow_with_services_that_take_their_ports_default() -> None:
    b, one = res.ListenerBuilder(6), res.ListenerBuilder(6)
    for i in range(1, 2001):
        b.set(Key(6, f"fd00:10:96::{i:x}", 80), "http")
        b.set(Key(6, f"fd00:10:96::{i:x}", 9000), "tcp")
    one.set(Key(6, "fd00:10:96::1", 80), "http")
    one.set(Key(6, "fd00:10:96::1", 9000), "tcp")
    assert ports(b) == {"0": "tcp-nodeport", "80": "http", "9000": "tcp"}
    assert res.serialize(b.listener) == res.serialize(one.listener)  # 2,000 Services, the bytes of one


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


def _routes(builder: res.RouteBuilder) -> tuple[dict[str, route_components_pb2.Route], route_components_pb2.Route]:
    """(cluster header value -> route, the default route), read back from the protobuf."""
    matcher = builder.config.virtual_hosts[0].matcher

    def unpack(on: object) -> route_components_pb2.Route:
        found = route_components_pb2.Route()
        on.action.typed_config.Unpack(found)  # type: ignore[attr-defined]
        return found

    explicit = {k: unpack(v) for k, v in matcher.matcher_tree.exact_match_map.map.items()}
    return explicit, unpack(matcher.on_no_match)


def test_the_default_route_names_the_cluster_by_header_with_the_default_options() -> None:
    config = res.route_configuration(6)
    assert config.name == res.route_name(6) == "lightpath_http_ipv6"
    explicit, default = _routes(res.RouteBuilder(6))
    assert set(explicit) == {"none"}  # the sentinel (Envoy refuses an empty map)
    action = default.route
    assert action.cluster_header == res.CLUSTER_HEADER and res.CLUSTER_HEADER in default.request_headers_to_remove
    assert (action.timeout.seconds, action.idle_timeout.seconds, action.retry_policy.per_try_timeout.seconds) == (15, 300, 5)
    assert action.retry_policy.retry_on == "5xx,reset,retriable-headers" and action.retry_policy.num_retries.value == 2
    assert [p.name for p in action.retry_policy.retry_host_predicate] == ["envoy.retry_host_predicates.previous_hosts"]
    assert action.hash_policy[0].connection_properties.source_ip


def test_route_builder_keeps_only_customized_keys_one_change_at_a_time() -> None:
    b = res.RouteBuilder(4)
    empty = res.serialize(b.config)
    fast = l7.RouteOptions(timeout_ms=250, retry_enabled=False)
    assert b.set("10.96.0.10:80", fast) and not b.set("10.96.0.10:80", fast)
    assert b.set("nodeport4:30080", l7.RouteOptions(per_try_timeout_ms=0, retry_enabled=False))
    explicit, _ = _routes(b)
    assert set(explicit) == {"none", "10.96.0.10:80", "nodeport4:30080"}
    mine = explicit["10.96.0.10:80"].route
    assert mine.cluster == "10.96.0.10:80" and (mine.timeout.seconds, mine.timeout.nanos) == (0, 250_000_000)
    assert mine.retry_policy.num_retries.value == 0 and not mine.retry_policy.retry_host_predicate  # off: no retries
    assert mine.retry_policy.per_try_timeout.seconds == 5  # the per-try timeout still holds
    assert not explicit["nodeport4:30080"].route.HasField("retry_policy")
    assert b.remove("10.96.0.10:80") and not b.remove("10.96.0.10:80") and b.remove("nodeport4:30080")
    assert res.serialize(b.config) == empty and b.routes == {}


def test_cluster_options_become_envoy_fields() -> None:
    options = l7.ClusterOptions(connect_timeout_ms=1_500, lb_policy="MAGLEV", default_priority=l7.Breaker(1, 2, 3, 4, True),
                                high_priority=l7.Breaker(5, 6, 7, 8), outlier=l7.Outlier(1_000, 2_000, 3_000, 40, 2, 3),
                                upstream_idle_timeout_ms=700, access_log=False)
    http = res.cluster(ClusterSpec("10.96.0.10:80", "s", "http", "shop/web", False, options))
    assert (http.connect_timeout.seconds, http.connect_timeout.nanos) == (1, 500_000_000)
    assert http.lb_policy == cluster_pb2.Cluster.MAGLEV
    default, high = http.circuit_breakers.thresholds
    assert (default.max_connections.value, default.max_pending_requests.value, default.max_requests.value,
            default.max_retries.value, default.track_remaining) == (1, 2, 3, 4, True)
    assert high.priority == base_pb2.HIGH and high.max_retries.value == 8 and not high.track_remaining
    od = http.outlier_detection
    assert (od.interval.seconds, od.base_ejection_time.seconds, od.max_ejection_time.seconds) == (1, 2, 3)
    assert (od.max_ejection_percent.value, od.consecutive_5xx.value, od.consecutive_gateway_failure.value,
            od.enforcing_consecutive_gateway_failure.value, od.split_external_local_origin_errors) == (40, 2, 3, 100, False)
    assert od.always_eject_one_host.value  # the percent alone would eject none of fewer than 100/percent hosts
    protocol = http_protocol_options_pb2.HttpProtocolOptions()
    http.typed_extension_protocol_options[res.HTTP_PROTOCOL_OPTIONS].Unpack(protocol)
    assert protocol.common_http_protocol_options.idle_timeout.nanos == 700_000_000
    assert protocol.explicit_http_config.HasField("http_protocol_options")
    assert res.NO_ACCESS_LOG in http.metadata.filter_metadata
    tcp = res.cluster(ClusterSpec("10.96.0.10:5432", "s", "tcp", "shop/db", False, options))
    assert res.HTTP_PROTOCOL_OPTIONS not in tcp.typed_extension_protocol_options  # no HTTP option on a TCP port
    od = tcp.outlier_detection  # connection failures, counted apart from (absent) HTTP responses
    assert od.split_external_local_origin_errors and od.consecutive_local_origin_failure.value == 3
    assert od.enforcing_consecutive_local_origin_failure.value == 100
    h2c = res.cluster(ClusterSpec("10.96.0.10:81", "s", "h2c", "shop/web", False, l7.HTTP_CLUSTER_DEFAULT))
    h2c.typed_extension_protocol_options[res.HTTP_PROTOCOL_OPTIONS].Unpack(protocol)
    assert protocol.explicit_http_config.HasField("http2_protocol_options")
    assert protocol.common_http_protocol_options.idle_timeout.seconds == 15
    affinity = res.cluster(ClusterSpec("10.96.0.10:80", "s", "http", "shop/web", True, options))
    assert affinity.lb_policy == cluster_pb2.Cluster.RING_HASH  # sessionAffinity wins over lb-policy
    assert res.NO_ACCESS_LOG not in res.cluster(ClusterSpec("a:1", "s", "http", "x")).metadata.filter_metadata


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
