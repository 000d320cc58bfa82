"""ControlPlane without gRPC: sinks fed directly, the store and listener keys checked, the ACK gate."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2

from controlplane import resources as res
from controlplane.controller import ControlPlane
from controlplane.server import AdsServer
from controlplane.stream import Stream
from controlplane.translate import NodeInfo
from redirector.desired import desired_state
from redirector.model import Key
from tests.controlplane.factories import NODE, endpoint, endpoint_slice, request, service
from tests.support.polling import wait_for

K80 = Key(4, "10.96.0.10", 80)


def plane(ipv6: bool = True) -> ControlPlane:
    return ControlPlane(NodeInfo(NODE, ipv6=ipv6))


def load(p: ControlPlane, name: str) -> list[tuple[str, int]] | None:
    found = p.store.get(res.ENDPOINT, name)
    if found is None:
        return None
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(found.data)
    return [(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
            for group in cla.endpoints for e in group.lb_endpoints]


def stat(p: ControlPlane, name: str) -> str | None:
    found = p.store.get(res.CLUSTER, name)
    return None if found is None else cluster_pb2.Cluster.FromString(found.data).alt_stat_name


def until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """``wait_for`` polling every 5 ms: the worker answers in a few ms, so the poll's own period dominates."""
    wait_for(predicate, what, timeout, interval=0.005)


@contextmanager
def running(p: ControlPlane) -> Iterator[ControlPlane]:
    """The real worker thread (batching, retries, re-marks)."""
    thread = threading.Thread(target=p.run, daemon=True)
    thread.start()
    try:
        yield p
    finally:
        p.stop()
        thread.join(timeout=5)
        assert not thread.is_alive()


# -- the store ----------------------------------------------------------------------------------------------

def test_a_service_and_its_slice_become_a_cluster_endpoints_and_a_listener_entry() -> None:
    p = plane()
    p.services.upsert(service(ports=[{"name": "http", "port": 80, "appProtocol": "http"}]))
    p.slices.upsert(endpoint_slice(endpoints=[endpoint("10.0.0.1"), endpoint("10.0.0.2", "node-b")]))
    p.sync({"shop/web"})
    assert p.store.names(res.CLUSTER) == ["10.96.0.10:80"] and stat(p, "10.96.0.10:80") == "shop_web_80_ipv4"
    assert load(p, "10.96.0.10:80") == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]
    assert p.store.names(res.LISTENER) == ["lightpath_ipv4"]  # the IPv6 listener was never touched
    assert p.listeners[4].keys == {K80: "http"} and p.listeners[6].keys == {}


def test_an_endpoint_change_touches_only_the_endpoints() -> None:
    p = plane()
    p.services.upsert(service())
    p.slices.upsert(endpoint_slice(endpoints=[endpoint("10.0.0.1")]))
    p.sync({"shop/web"})
    cluster = p.store.get(res.CLUSTER, "10.96.0.10:80")
    listener = p.store.get(res.LISTENER, "lightpath_ipv4")
    heard: list[tuple[str, frozenset[str]]] = []
    p.store.subscribe(lambda t, n: heard.append((t, n)))
    p.slices.upsert(endpoint_slice(endpoints=[endpoint("10.0.0.7")]))
    p.sync({"shop/web"})
    assert heard == [(res.ENDPOINT, frozenset({"10.96.0.10:80"}))]
    assert load(p, "10.96.0.10:80") == [("10.0.0.7", 8080)]
    assert p.store.get(res.CLUSTER, "10.96.0.10:80") == cluster and p.store.get(res.LISTENER, "lightpath_ipv4") == listener


def test_a_deleted_service_leaves_nothing_behind() -> None:
    p = plane()
    svc = service(ips=("10.96.0.10", "fd00::10"), type_="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}])
    p.services.upsert(svc)
    p.sync({"shop/web"})
    assert sorted(p.store.names(res.CLUSTER)) == ["10.96.0.10:80", "[fd00::10]:80", "nodeport4:30080", "nodeport6:30080"]
    assert p.listeners[6].keys == {Key(6, "fd00::10", 80): "tcp", Key(6, None, 30080): "tcp"}
    empty = {f: res.serialize(res.ListenerBuilder(f).listener) for f in (4, 6)}
    p.services.delete(svc)
    p.sync({"shop/web"})
    assert p.store.names(res.CLUSTER) == [] and p.store.names(res.ENDPOINT) == []
    assert p.listeners[4].keys == {} and p.listeners[6].keys == {}
    for f in (4, 6):  # the listeners are back to exactly the empty ones
        found = p.store.get(res.LISTENER, res.listener_name(f))
        assert found is not None and found.data == empty[f]
    assert p.report()["services_served"] == 0


def test_no_ipv6_listener_on_a_node_without_ipv6() -> None:
    p = plane(ipv6=False)
    p.services.upsert(service(ips=("10.96.0.10", "fd00::10")))
    p.sync({"shop/web"})
    assert p.store.names(res.CLUSTER) == ["10.96.0.10:80"] and set(p.listeners) == {4}


def test_services_envoy_does_not_serve_are_not_in_the_store() -> None:
    p = plane()
    p.services.replace([service("other", label="someone-else"), service("dns", ips=("10.96.0.53",), label=None,
                                                                       ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])])
    p.sync({"shop/other", "shop/dns", "shop/never-seen"})
    assert p.store.names(res.CLUSTER) == [] and p.store.names(res.LISTENER) == []


def test_replace_forgets_services_missing_from_the_new_list() -> None:
    p = plane()
    p.services.replace([service("a", ips=("10.96.0.1",)), service("b", ips=("10.96.0.2",))])
    p.sync({"shop/a", "shop/b"})
    assert sorted(p.store.names(res.CLUSTER)) == ["10.96.0.1:80", "10.96.0.2:80"]
    p.services.replace([service("b", ips=("10.96.0.2",))])
    assert "shop/a" in p._pending.dirty  # the vanished Service is marked for the worker
    p.sync({"shop/a", "shop/b"})
    assert p.store.names(res.CLUSTER) == ["10.96.0.2:80"]


def test_slice_replace_and_delete_follow_the_service() -> None:
    p = plane()
    p.services.upsert(service())
    p.slices.replace([endpoint_slice("web-1", endpoints=[endpoint("10.0.0.1")]),
                      endpoint_slice("web-2", endpoints=[endpoint("10.0.0.2")])])
    p.sync({"shop/web"})
    assert load(p, "10.96.0.10:80") == [("10.0.0.1", 8080), ("10.0.0.2", 8080)]
    p.slices.delete(endpoint_slice("web-1"))
    p.sync({"shop/web"})
    assert load(p, "10.96.0.10:80") == [("10.0.0.2", 8080)]
    # a slice relabelled to another Service leaves the first one
    p.slices.upsert(endpoint_slice("web-2", service_name="api", endpoints=[endpoint("10.0.0.2")]))
    p.sync({"shop/web"})
    assert load(p, "10.96.0.10:80") == []


def test_the_worker_publishes_routes_and_the_first_push_after_both_lists() -> None:
    p = plane()
    with running(p):
        p.services.replace([service()])
        until(lambda: len(p.store.names(res.ROUTE)) == 2, "the worker's static routes")
        assert not p.first_push_done.is_set() and p.store.names(res.CLUSTER) == []  # slices not listed yet
        p.slices.replace([endpoint_slice(endpoints=[endpoint("10.0.0.1")])])
        assert p.first_push_done.wait(5)
        until(lambda: load(p, "10.96.0.10:80") == [("10.0.0.1", 8080)], "the first push")
        assert sorted(p.store.names(res.ROUTE)) == ["lightpath_http_ipv4", "lightpath_http_ipv6"]
        p.slices.upsert(endpoint_slice(endpoints=[endpoint("10.0.0.9")]))
        until(lambda: load(p, "10.96.0.10:80") == [("10.0.0.9", 8080)], "an endpoint change")


# -- contested keys -----------------------------------------------------------------------------------------

def claimant(name: str, namespace: str, pod: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return (service(name, namespace, ports=[{"name": "http", "port": 80}]),
            endpoint_slice(f"{name}-x", name, namespace, endpoints=[endpoint(pod)]))


def test_contested_key_has_one_owner_and_the_other_takes_over_when_it_goes() -> None:
    a_svc, a_slice = claimant("a", "shop", "10.0.0.1")
    b_svc, b_slice = claimant("b", "shop", "10.0.0.2")
    p = plane()
    with running(p):
        p.services.replace([b_svc, a_svc])
        p.slices.replace([b_slice, a_slice])
        until(lambda: load(p, "10.96.0.10:80") == [("10.0.0.1", 8080)], "shop/a owning the key")
        assert stat(p, "10.96.0.10:80") == "shop_a_80_ipv4" and p.store.names(res.CLUSTER) == ["10.96.0.10:80"]
        p.services.delete(a_svc)
        until(lambda: load(p, "10.96.0.10:80") == [("10.0.0.2", 8080)], "shop/b taking the key over")
        assert stat(p, "10.96.0.10:80") == "shop_b_80_ipv4"
        assert p.listeners[4].keys == {K80: "tcp"}
        p.services.delete(b_svc)
        until(lambda: p.store.names(res.CLUSTER) == [], "the key gone with its last claimant")
        assert p.listeners[4].keys == {}


def test_a_smaller_claimant_arriving_later_wins_and_hands_back() -> None:
    a_svc, a_slice = claimant("a", "shop", "10.0.0.1")
    b_svc, b_slice = claimant("b", "shop", "10.0.0.2")
    p = plane()
    with running(p):
        p.services.replace([b_svc])
        p.slices.replace([b_slice, a_slice])
        until(lambda: stat(p, "10.96.0.10:80") == "shop_b_80_ipv4", "shop/b alone")
        p.services.upsert(a_svc)
        until(lambda: stat(p, "10.96.0.10:80") == "shop_a_80_ipv4", "shop/a winning")
        assert load(p, "10.96.0.10:80") == [("10.0.0.1", 8080)]
        p.slices.upsert(endpoint_slice("b-x", "b", endpoints=[endpoint("10.0.0.3")]))  # the loser changes: no effect
        p.services.delete(a_svc)
        until(lambda: stat(p, "10.96.0.10:80") == "shop_b_80_ipv4", "shop/b back")
        until(lambda: load(p, "10.96.0.10:80") == [("10.0.0.3", 8080)], "shop/b's current endpoints")


def test_the_control_plane_picks_the_kernels_winner() -> None:
    """The kernel redirects a contested key for its winner; Envoy must send it to that same Service."""
    p = plane()
    objs = [claimant("web", ns, f"10.0.0.{i}") for i, ns in enumerate(("a-b", "a"), 1)]
    for svc, sl in objs:
        p.services.upsert(svc)
        p.slices.upsert(sl)
    p.sync({"a-b/web", "a/web"})
    kernel = desired_state([svc for svc, _ in objs]).entries[K80].owner
    assert stat(p, "10.96.0.10:80") == f"{kernel.namespace}_{kernel.name}_80_ipv4"


# -- the gate -----------------------------------------------------------------------------------------------

def gated_plane(on_demand: bool = False) -> tuple[ControlPlane, AdsServer, Stream, list[set[Key]]]:
    p = ControlPlane(NodeInfo(NODE, ipv6=True), on_demand=on_demand)
    server = AdsServer(p.store, expected_node=NODE, on_ack=p.acked, on_demand=on_demand)  # never started: no gRPC
    p.attach(server)
    gates: list[set[Key]] = []
    p.on_gate = gates.append
    stream = Stream(p.store, expected_node=NODE, on_ack=lambda t, v: p.acked(stream, t, v), on_demand=on_demand)
    server.streams.append(stream)
    return p, server, stream, gates


def envoy_acks_everything(stream: Stream) -> None:
    """Envoy's side: wildcard CDS and LDS, EDS for every cluster it gets, RDS for the routes; ACK all."""
    stream.handle(request(res.CLUSTER))
    stream.handle(request(res.LISTENER))
    stream.handle(request(res.ROUTE, subscribe=[res.route_name(4), res.route_name(6)]))
    envoy_answers(stream)


def envoy_answers(stream: Stream) -> None:
    """Envoy's side of what is in flight: EDS for every cluster it gets; ACK all until nothing is sent."""
    for _ in range(20):
        out = stream.responses()
        if not out:
            return
        for response in out:
            stream.handle(request(response.type_url, nonce=response.nonce))
            if response.type_url == res.CLUSTER and response.resources:
                stream.handle(request(res.ENDPOINT, subscribe=[r.name for r in response.resources]))
    raise AssertionError("still sending after 20 rounds")


def test_servable_once_envoy_acked_cluster_endpoints_and_listener() -> None:
    p, server, stream, gates = gated_plane()
    tcp = Key(4, "10.96.0.20", 5432)
    p.services.upsert(service("db", ips=("10.96.0.20",), ports=[{"name": "db", "port": 5432}]))
    p.sync({"shop/db"})
    assert p.servable([tcp]) == set()  # Envoy has nothing yet
    envoy_acks_everything(stream)
    assert p.servable([tcp, K80]) == {tcp}  # K80 belongs to no Service
    assert set().union(*gates) >= {tcp}
    assert stream.in_sync()


def test_on_demand_a_key_is_servable_once_the_listener_is_acked_and_its_cluster_exists() -> None:
    p, server, stream, gates = gated_plane(on_demand=True)
    tcp = Key(4, "10.96.0.20", 5432)
    p.services.upsert(service("db", ips=("10.96.0.20",), ports=[{"name": "db", "port": 5432}]))
    p.slices.upsert(endpoint_slice("db-abc", "db", ports={"db": 5432}, endpoints=[endpoint("10.244.1.5")]))
    p.sync({"shop/db"})
    assert tcp in set().union(*gates)  # the store having the cluster is the news: no ACK will come for it
    assert p.servable([tcp]) == set()  # Envoy has no listener yet
    envoy_acks_everything(stream)
    assert stream.types[res.CLUSTER].acked == {}  # nothing asked for, nothing sent
    assert p.servable([tcp]) == {tcp}
    # Envoy asks when a connection comes; a refused cluster closes the gate for that version.
    stream.handle(request(res.CLUSTER, subscribe=["10.96.0.20:5432"]))
    (response,) = [r for r in stream.responses() if r.type_url == res.CLUSTER]
    assert [r.name for r in response.resources] == ["10.96.0.20:5432"]
    stream.handle(request(res.CLUSTER, nonce=response.nonce, error="refused"))
    assert p.servable([tcp]) == set()


def test_on_demand_listener_chains_ask_envoy_to_fetch_missing_clusters() -> None:
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

    for on_demand in (False, True):
        listener = res.ListenerBuilder(4, on_demand=on_demand).listener
        tcp, http = tcp_proxy_pb2.TcpProxy(), http_connection_manager_pb2.HttpConnectionManager()
        listener.filter_chains[0].filters[1].typed_config.Unpack(tcp)
        listener.filter_chains[1].filters[0].typed_config.Unpack(http)
        assert tcp.HasField("on_demand") is on_demand
        assert [f.name for f in http.http_filters] == (["envoy.filters.http.on_demand"] if on_demand else []) + [
            "envoy.filters.http.router"]


def test_servable_follows_the_documented_rule() -> None:
    p, server, stream, gates = gated_plane()
    p.services.upsert(service(ports=[{"name": "http", "port": 80, "appProtocol": "http"}]))
    p.sync({"shop/web"})
    listener = p.store.get(res.LISTENER, "lightpath_ipv4")
    assert listener is not None
    types = stream.types
    stream.node_id = NODE

    def hold(cds: bool = True, eds: bool = True, lds: str | None = listener.version, rds: bool = True) -> set[Key]:
        types[res.CLUSTER].acked = {"10.96.0.10:80": "v"} if cds else {}
        types[res.ENDPOINT].acked = {"10.96.0.10:80": "v"} if eds else {}
        types[res.LISTENER].acked = {} if lds is None else {"lightpath_ipv4": lds}
        types[res.ROUTE].acked = {res.route_name(4): "v"} if rds else {}
        return p.servable([K80])

    assert hold() == {K80}
    assert hold(cds=False) == set()
    assert hold(eds=False) == set()
    assert hold(lds=None) == set()
    assert hold(rds=False) == set()  # HTTP needs the route configuration
    assert hold(lds="a version the plane never built") == set()
    assert hold() == {K80}
    # Envoy still holds the listener version from before the Service gained a port
    p.services.upsert(service(ports=[{"name": "http", "port": 80, "appProtocol": "http"}, {"name": "x", "port": 81}]))
    p.sync({"shop/web"})
    newer = p.store.get(res.LISTENER, "lightpath_ipv4")
    assert newer is not None and newer.version != listener.version
    k81 = Key(4, "10.96.0.10", 81)
    types[res.CLUSTER].acked["10.96.0.10:81"] = "v"
    types[res.ENDPOINT].acked["10.96.0.10:81"] = "v"
    assert p.servable([K80, k81]) == {K80}  # Envoy still on the listener without :81
    types[res.LISTENER].acked["lightpath_ipv4"] = newer.version
    types[res.ROUTE].acked = {}
    assert p.servable([K80, k81]) == {k81}  # TCP needs no route; the HTTP key does


def test_only_the_newest_envoy_opens_the_gate() -> None:
    p, server, stream, gates = gated_plane()
    newer = Stream(p.store, expected_node=NODE)
    newer.node_id = NODE
    server.streams.append(newer)
    p.services.upsert(service("db", ips=("10.96.0.20",), ports=[{"name": "db", "port": 5432}]))
    p.sync({"shop/db"})
    envoy_acks_everything(stream)  # the old Envoy ACKs everything
    assert gates == [] and p.servable([Key(4, "10.96.0.20", 5432)]) == set()


# -- L7 options: clusters and the route configuration ---------------------------------------------------------

def _explicit(p: ControlPlane, family: int = 4) -> set[str]:
    found = p.store.get(res.ROUTE, res.route_name(family))  # type: ignore[arg-type]
    assert found is not None
    config = route_pb2.RouteConfiguration.FromString(found.data)
    return set(config.virtual_hosts[0].matcher.matcher_tree.exact_match_map.map) - {"none"}


def annotated(annotations: dict[str, str], **kw: Any) -> dict[str, Any]:
    svc = service(ports=[{"name": "http", "port": 80, "appProtocol": "http"}, {"name": "db", "port": 5432}], **kw)
    svc["metadata"]["annotations"] = annotations
    return svc


def test_only_customized_http_keys_get_an_explicit_route_and_it_follows_the_service() -> None:
    p = plane()
    p._publish_static()  # what run() does first
    empty = p.store.get(res.ROUTE, res.route_name(4))
    assert empty is not None
    p.services.upsert(annotated({}))
    p.services.upsert(annotated({"config.lightpath.cloud/http-request-timeout": "1s"}, name="fast",
                                ips=("10.96.0.11", "fd00::11")))
    p.sync({"shop/web", "shop/fast"})
    assert _explicit(p) == {"10.96.0.11:80"} and _explicit(p, 6) == {"[fd00::11]:80"}  # not the TCP port, not "web"
    custom = cluster_pb2.Cluster.FromString(p.store.get(res.CLUSTER, "10.96.0.11:80").data)  # type: ignore[union-attr]
    assert custom.connect_timeout.seconds == 5 and custom.outlier_detection.consecutive_5xx.value == 5
    # A cluster option changes the cluster only; a route option the route only.
    clusters_before = {n: p.store.get(res.CLUSTER, n).version for n in p.store.names(res.CLUSTER)}  # type: ignore[union-attr]
    p.services.upsert(annotated({"config.lightpath.cloud/http-request-timeout": "2s"}, name="fast",
                                ips=("10.96.0.11", "fd00::11")))
    p.sync({"shop/fast"})
    assert {n: p.store.get(res.CLUSTER, n).version for n in p.store.names(res.CLUSTER)} == clusters_before  # type: ignore[union-attr]
    p.services.upsert(annotated({"config.lightpath.cloud/lb-policy": "RANDOM"}, name="fast", ips=("10.96.0.11", "fd00::11")))
    p.sync({"shop/fast"})
    assert _explicit(p) == set() and _explicit(p, 6) == set()  # back to the default options: no explicit route
    random = cluster_pb2.Cluster.FromString(p.store.get(res.CLUSTER, "10.96.0.11:5432").data)  # type: ignore[union-attr]
    assert random.lb_policy == cluster_pb2.Cluster.RANDOM
    p.services.upsert(annotated({"config.lightpath.cloud/num-retries": "0"}, name="fast", ips=("10.96.0.11", "fd00::11")))
    p.sync({"shop/fast"})
    assert _explicit(p) == {"10.96.0.11:80"}
    p.services.delete(annotated({}, name="fast"))
    p.sync({"shop/fast"})
    assert _explicit(p) == set() and _explicit(p, 6) == set()
    assert p.store.get(res.ROUTE, res.route_name(4)).version == empty.version  # type: ignore[union-attr]


def test_bad_annotations_are_reported_per_service_and_change_nothing_else() -> None:
    p = plane()
    p._publish_static()  # what run() does first
    p.services.upsert(annotated({"config.lightpath.cloud/http-num-retries": "lots", "config.lightpath.cloud/web-x": "1"}))
    p.sync({"shop/web"})
    rows = p.report()["services"]
    assert len(rows[0]["problems"]) == 2 and "'lots' is not a whole number: default used" in rows[0]["problems"][0]
    assert _explicit(p) == set()


def test_an_http_key_is_servable_once_any_route_configuration_is_acked() -> None:
    """The default route serves a customized key correctly (with default options) until its explicit route is
    ACKed, so the gate does not wait for that particular route version (docs/l7.md)."""
    p = plane(ipv6=False)
    p.services.upsert(annotated({"config.lightpath.cloud/http-request-timeout": "1s"}))
    p.sync({"shop/web"})
    stream = Stream(NODE)
    key = Key(4, "10.96.0.10", 80)
    listener = p.store.get(res.LISTENER, res.listener_name(4))
    assert listener is not None
    for type_url, name in ((res.CLUSTER, "10.96.0.10:80"), (res.ENDPOINT, "10.96.0.10:80"),
                           (res.LISTENER, res.listener_name(4))):
        found = p.store.get(type_url, name)
        assert found is not None
        stream.types[type_url].acked[name] = found.version
    assert p._servable(stream, [key]) == set()  # no route configuration ACKed at all
    stream.types[res.ROUTE].acked[res.route_name(4)] = "some older version"
    assert p._servable(stream, [key]) == {key}


def test_the_nodes_addresses_reach_the_source_range_exception() -> None:
    p = plane()
    lb = service("lb", type_="LoadBalancer", ingress=["192.0.2.1"],
                 ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}])
    lb["spec"]["loadBalancerSourceRanges"] = ["10.0.0.0/8"]
    p.services.upsert(lb)
    p.sync({"shop/lb"})
    assert p.firewall == {Key(4, "192.0.2.1", 80): ("10.0.0.0/8",)}
    p.nodes.upsert({"metadata": {"name": NODE}, "status": {"addresses": [{"type": "InternalIP", "address": "10.1.2.3"}]}})
    assert p.node.ips == ("10.1.2.3",)
    p.sync(set(p._views))
    assert p.firewall == {Key(4, "192.0.2.1", 80): ("10.0.0.0/8", "192.0.2.1/32")}
    p.nodes.upsert({"metadata": {"name": "another-node"}, "status": {"addresses": [{"type": "InternalIP", "address": "172.16.0.1"}]}})
    assert p.node.ips == ("10.1.2.3",)  # only this node's Node counts


# -- keys whose first endpoint Envoy has not confirmed yet (conformance row 3) ----------------------------

def _blocked_plane(on_demand: bool = False) -> tuple[ControlPlane, Stream, list[dict[Key, str]]]:
    p, _server, stream, _gates = gated_plane(on_demand=on_demand)
    delivered: list[dict[Key, str]] = []
    p.on_blocked = lambda answers: delivered.append(dict(answers.blocked))
    p.services.upsert(service("db", ips=("10.96.0.20",), ports=[{"name": "db", "port": 5432}]))
    return p, stream, delivered


def _lists(p: ControlPlane) -> None:
    """The worker starts once both lists are in."""
    p.services.replace([service("db", ips=("10.96.0.20",), ports=[{"name": "db", "port": 5432}])])
    p.slices.replace([])


DB = Key(4, "10.96.0.20", 5432)
DB_SLICE = endpoint_slice("db-abc", "db", ports={"db": 5432}, endpoints=[endpoint("10.244.1.5")])


def test_a_key_that_gets_its_first_endpoint_stays_refused_until_envoy_acks_the_endpoints() -> None:
    p, stream, delivered = _blocked_plane()
    with running(p):
        _lists(p)
        until(lambda: bool(delivered) and delivered[-1].get(DB) == "reject", "no endpoint: refused")
        envoy_acks_everything(stream)
        before = len(delivered)
        p.slices.upsert(DB_SLICE)
        until(lambda: len(delivered) > before, "the worker's delivery after the endpoint came")
        assert load(p, "10.96.0.20:5432") == [("10.244.1.5", 5432)]
        assert delivered[-1].get(DB) == "reject", "unblocked before Envoy holds the endpoint"
        envoy_answers(stream)  # Envoy takes the new endpoints and ACKs them
        until(lambda: DB not in delivered[-1], "released by the ACK")
    assert p.unblock_hold == 2.0  # the bound was not what released it (the ACK came in milliseconds)


def test_without_an_ack_the_key_is_released_after_the_hold() -> None:
    p, stream, delivered = _blocked_plane()
    p.unblock_hold = 0.2
    with running(p):
        _lists(p)
        until(lambda: bool(delivered) and DB in delivered[-1], "no endpoint: refused")
        envoy_acks_everything(stream)
        p.slices.upsert(DB_SLICE)
        started = time.monotonic()
        until(lambda: load(p, "10.96.0.20:5432") is not None and DB not in delivered[-1], "released by time")
        assert time.monotonic() - started >= 0.2  # not before the hold was over (Envoy never ACKed)


def test_no_hold_on_demand_without_an_envoy_or_for_a_service_handed_back() -> None:
    p, stream, delivered = _blocked_plane(on_demand=True)  # Envoy fetches endpoints on first use
    p.sync({"shop/db"})
    assert delivered[-1].get(DB) == "reject"
    p.slices.upsert(DB_SLICE)
    p.sync({"shop/db"})
    assert DB not in delivered[-1]

    p, stream, delivered = _blocked_plane()  # no Envoy has identified itself on this stream: nothing to wait for
    p.sync({"shop/db"})
    p.slices.upsert(DB_SLICE)
    p.sync({"shop/db"})
    assert DB not in delivered[-1]

    p, stream, delivered = _blocked_plane()
    envoy_acks_everything(stream)
    p.sync({"shop/db"})
    assert delivered[-1].get(DB) == "reject"
    p.services.upsert(service("db", ips=("10.96.0.20",), ports=[{"name": "db", "port": 5432}], label=None))
    p.sync({"shop/db"})  # handed back to kube-proxy: its keys are left to it at once
    assert DB not in delivered[-1]
