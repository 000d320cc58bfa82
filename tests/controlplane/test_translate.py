"""translate: which Services Envoy serves, and the clusters, endpoints and listener entries of each."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane import endpoints as eps
from controlplane.translate import (
    NodeInfo,
    ServiceResources,
    project_service,
    translate_service,
    upstream_protocol,
)
from redirector.model import Key
from tests.controlplane.factories import NODE, endpoint, endpoint_slice, service

HERE = NodeInfo(NODE)


def slices(*objs: dict[str, Any]) -> list[eps.SliceView]:
    views = [eps.project_slice(o) for o in objs]
    assert all(v is not None for v in views)
    return [v for v in views if v is not None]


def translate(svc: dict[str, Any], *objs: dict[str, Any], node: NodeInfo = HERE) -> ServiceResources:
    return translate_service(project_service(svc), slices(*objs), node)


# -- served or not ------------------------------------------------------------------------------------------

def test_our_label_is_served_and_labelled() -> None:
    view = project_service(service())
    assert (view.served, view.labelled, view.sid) == (True, True, "shop/web")
    assert view.entries.keys == (Key(4, "10.96.0.10", 80),)


def test_unlabelled_eligible_service_is_served_but_not_labelled() -> None:
    view = project_service(service(label=None))
    assert (view.served, view.labelled) == (True, False)  # Envoy knows it before the webhook labels it
    assert translate(service(label=None)).clusters


def test_another_proxys_label_is_not_served() -> None:
    view = project_service(service(label="someone-else"))
    assert (view.served, view.labelled) == (False, False)
    assert translate(service(label="someone-else")) == ServiceResources()


def test_a_different_proxy_name_makes_our_label_foreign() -> None:
    assert project_service(service(), proxy_name="other.proxy").served is False
    assert project_service(service(label="other.proxy"), proxy_name="other.proxy").labelled is True


def test_unlabelled_udp_service_is_not_served() -> None:
    svc = service(label=None, ports=[{"name": "dns", "port": 53, "protocol": "UDP"}])
    assert project_service(svc).served is False
    assert translate(svc).clusters == ()


def test_labelled_but_ineligible_serves_only_its_tcp_ports_with_a_problem() -> None:
    svc = service(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}])
    view = project_service(svc)
    assert view.served and view.labelled
    assert any("labelled but not eligible" in p for p in view.problems), view.problems
    found = translate(svc)
    assert [s.name for s in found.clusters] == ["10.96.0.10:53"]
    assert found.problems == view.problems


def test_headless_service_contributes_nothing() -> None:
    svc = service(label=None)
    svc["spec"]["clusterIP"] = "None"
    svc["spec"]["clusterIPs"] = ["None"]
    assert translate(svc).clusters == ()


# -- protocols ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("app_protocol", "protocol"), [
    (None, "tcp"), ("http", "http"), ("HTTP", "http"), (" kubernetes.io/ws ", "http"), ("ws", "http"),
    ("h2c", "h2c"), ("kubernetes.io/h2c", "h2c"), ("grpc", "h2c"),
    ("https", "tcp"), ("h2", "tcp"), ("wss", "tcp"), ("kubernetes.io/wss", "tcp"), ("postgres", "tcp"), (7, "tcp"),
])
def test_upstream_protocol_by_app_protocol(app_protocol: object, protocol: str) -> None:
    assert upstream_protocol(app_protocol) == protocol


def test_chains_follow_the_port_protocol() -> None:
    svc = service(ports=[{"name": "web", "port": 80, "appProtocol": "http"},
                         {"name": "grpc", "port": 9090, "appProtocol": "kubernetes.io/h2c"},
                         {"name": "tls", "port": 443, "appProtocol": "https"},
                         {"name": "db", "port": 5432}])
    found = translate(svc)
    assert dict(found.chains) == {Key(4, "10.96.0.10", 80): "http", Key(4, "10.96.0.10", 9090): "http",
                                  Key(4, "10.96.0.10", 443): "tcp", Key(4, "10.96.0.10", 5432): "tcp"}
    assert {s.name: s.protocol for s in found.clusters} == {
        "10.96.0.10:80": "http", "10.96.0.10:9090": "h2c", "10.96.0.10:443": "tcp", "10.96.0.10:5432": "tcp"}


# -- one cluster per key ----------------------------------------------------------------------------------------

def test_one_cluster_per_redirected_key_with_names_and_stat_names() -> None:
    svc = service(ips=("10.96.0.10", "fd00::10"), type_="LoadBalancer", external_ips=["192.0.2.7"],
                  ingress=["203.0.113.9"],
                  ports=[{"name": "http", "port": 80, "nodePort": 30080, "appProtocol": "http"}])
    found = translate(svc, endpoint_slice(endpoints=[endpoint("10.0.0.1")]),
                      endpoint_slice("web-v6", family="IPv6", endpoints=[endpoint("fd00:1::1")]))
    stats = {s.name: s.stat_name for s in found.clusters}
    assert stats == {
        "10.96.0.10:80": "shop_web_80_ipv4",
        "[fd00::10]:80": "shop_web_80_ipv6",
        "192.0.2.7:80": "shop_web_80_ipv4_ext",
        "203.0.113.9:80": "shop_web_80_ipv4_lb",
        "nodeport4:30080": "shop_web_80_ipv4_np",  # the Service port, not the node port
        "nodeport6:30080": "shop_web_80_ipv6_np",
    }
    assert all(s.service == "shop/web" for s in found.clusters)
    assert [s.name for s in found.loads] == [s.name for s in found.clusters]
    loads = {s.name: s.endpoints for s in found.loads}
    assert loads["10.96.0.10:80"] == loads["nodeport4:30080"] == (("10.0.0.1", 8080),)
    assert loads["[fd00::10]:80"] == loads["nodeport6:30080"] == (("fd00:1::1", 8080),)
    assert Key(4, None, 30080) in dict(found.chains) and Key(6, "fd00::10", 80) in dict(found.chains)


def test_ipv6_keys_are_skipped_on_a_node_without_ipv6() -> None:
    svc = service(ips=("10.96.0.10", "fd00::10"))
    assert [s.name for s in translate(svc, node=NodeInfo(NODE, ipv6=False)).clusters] == ["10.96.0.10:80"]
    assert [s.name for s in translate(svc).clusters] == ["10.96.0.10:80", "[fd00::10]:80"]


# -- traffic policies -------------------------------------------------------------------------------------------

SPREAD = endpoint_slice(endpoints=[endpoint("10.0.0.1", NODE), endpoint("10.0.0.2", "node-b"), endpoint("10.0.0.3", None)])
ALL = (("10.0.0.1", 8080), ("10.0.0.2", 8080), ("10.0.0.3", 8080))
LOCAL = (("10.0.0.1", 8080),)


def loads_of(svc: dict[str, Any]) -> dict[str, tuple[eps.Endpoint, ...]]:
    found = translate(svc, SPREAD)
    return {s.name: s.endpoints for s in found.loads}


def nodeport_service(**kw: Any) -> dict[str, Any]:
    return service(type_="NodePort", ports=[{"name": "http", "port": 80, "nodePort": 30080}], **kw)


def test_internal_traffic_policy_local_narrows_cluster_ip_keys_only() -> None:
    assert loads_of(nodeport_service(itp="Local")) == {"10.96.0.10:80": LOCAL, "nodeport4:30080": ALL}


def test_external_traffic_policy_local_narrows_node_port_keys_only() -> None:
    assert loads_of(nodeport_service(etp="Local")) == {"10.96.0.10:80": ALL, "nodeport4:30080": LOCAL}


def test_external_traffic_policy_local_applies_to_external_ips() -> None:
    found = loads_of(service(etp="Local", external_ips=["192.0.2.7"]))
    assert found == {"10.96.0.10:80": ALL, "192.0.2.7:80": LOCAL}


def test_cluster_policies_use_every_endpoint() -> None:
    assert loads_of(nodeport_service(itp="Cluster", etp="Cluster")) == {"10.96.0.10:80": ALL, "nodeport4:30080": ALL}
    assert project_service(nodeport_service(itp="Cluster", etp="Cluster")).problems == ()


def test_local_policy_with_no_endpoint_here_sends_nowhere() -> None:
    assert translate(service(itp="Local"), endpoint_slice(endpoints=[endpoint("10.0.0.2", "node-b")])).loads[0].endpoints == ()


@pytest.mark.parametrize("value", ["local", "Topology", 3, ["Local"]])
def test_unknown_policy_values_are_problems_and_treated_as_cluster(value: object) -> None:
    svc = nodeport_service(itp=value, etp=value)
    problems = project_service(svc).problems
    assert any("internalTrafficPolicy" in p and "treated as Cluster" in p for p in problems), problems
    assert any("externalTrafficPolicy" in p and "treated as Cluster" in p for p in problems), problems
    assert loads_of(svc) == {"10.96.0.10:80": ALL, "nodeport4:30080": ALL}
    assert translate(svc, SPREAD).problems == problems


def test_named_target_ports_are_resolved_per_service_port_name() -> None:
    svc = service(ports=[{"name": "http", "port": 80}, {"name": "admin", "port": 81}])
    found = translate(svc, endpoint_slice(ports={"http": 8080, "admin": 9090}, endpoints=[endpoint("10.0.0.1")]))
    assert {s.name: s.endpoints for s in found.loads} == {"10.96.0.10:80": (("10.0.0.1", 8080),),
                                                          "10.96.0.10:81": (("10.0.0.1", 9090),)}


def test_translation_is_a_value() -> None:
    """The controller compares translations to decide what changed: same input, equal output."""
    a = translate(nodeport_service(itp="Local"), SPREAD)
    b = translate(nodeport_service(itp="Local"), SPREAD)
    assert a == b and a is not b
    assert translate(nodeport_service(), SPREAD) != a


# -- odd input never raises -------------------------------------------------------------------------------------

FIELDS = ["metadata", "spec", "labels", "name", "namespace", "ports", "port", "protocol", "appProtocol", "nodePort",
          "targetPort", "type", "clusterIP", "clusterIPs", "ipFamilies", "externalIPs", "status", "loadBalancer",
          "ingress", "ip", "internalTrafficPolicy", "externalTrafficPolicy", "service.kubernetes.io/service-proxy-name",
          "kubernetes.io/service-name", "addressType", "endpoints", "addresses", "conditions", "ready", "serving",
          "terminating", "nodeName", "zone"]
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True), st.text(max_size=12),
    st.sampled_from(["TCP", "UDP", "IPv4", "IPv6", "FQDN", "Local", "Cluster", "NodePort", "LoadBalancer", "ClusterIP",
                     "None", "10.96.0.10", "fd00::10", "0.0.0.0", "::", "10.0.0.1", "http", "h2c", "lightpath.cloud",
                     "web", "shop", "node-a", 80, 30080, 65535, 0, 65536]))
JSONISH = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=5), max_leaves=12)
OBJECTS = st.dictionaries(st.sampled_from(FIELDS), JSONISH, max_size=6)


def _plausible_service() -> st.SearchStrategy[dict[str, Any]]:
    port = st.fixed_dictionaries({}, optional={k: JSONISH | LEAVES for k in ("name", "port", "protocol", "appProtocol",
                                                                            "nodePort")})
    spec = st.fixed_dictionaries({}, optional={"type": LEAVES, "clusterIP": LEAVES, "clusterIPs": st.lists(LEAVES, max_size=3),
                                               "ipFamilies": st.lists(LEAVES, max_size=3), "ports": st.lists(port, max_size=3),
                                               "externalIPs": JSONISH, "internalTrafficPolicy": LEAVES,
                                               "externalTrafficPolicy": LEAVES})
    meta = st.fixed_dictionaries({}, optional={"name": LEAVES, "namespace": LEAVES,
                                               "labels": st.dictionaries(st.sampled_from(FIELDS), LEAVES, max_size=3)})
    return st.fixed_dictionaries({"metadata": meta, "spec": spec}, optional={"status": JSONISH})


def _plausible_slice() -> st.SearchStrategy[dict[str, Any]]:
    ep = st.fixed_dictionaries({}, optional={"addresses": st.lists(LEAVES, max_size=3), "conditions": JSONISH,
                                             "nodeName": LEAVES, "zone": LEAVES})
    port = st.fixed_dictionaries({}, optional={"name": LEAVES, "port": LEAVES, "protocol": LEAVES})
    meta = st.fixed_dictionaries({"labels": st.fixed_dictionaries({"kubernetes.io/service-name": LEAVES})},
                                 optional={"name": LEAVES, "namespace": LEAVES})
    return st.fixed_dictionaries({"metadata": meta}, optional={"addressType": LEAVES, "ports": st.lists(port, max_size=3),
                                                               "endpoints": st.lists(ep, max_size=3)})


def _check(svc: dict[str, Any], slice_objs: list[dict[str, Any]], ipv6: bool) -> None:
    view = project_service(svc)
    views = [v for v in (eps.project_slice(s) for s in slice_objs) if v is not None]
    found = translate_service(view, views, NodeInfo("node-a", ipv6=ipv6))
    assert isinstance(found, ServiceResources)
    assert len(found.clusters) == len(found.loads) == len(found.chains)
    if not view.served:
        assert found.clusters == ()


@settings(max_examples=60)
@given(OBJECTS, st.lists(OBJECTS, max_size=3), st.booleans())
def test_random_nested_dicts_never_raise(svc: dict[str, Any], slice_objs: list[dict[str, Any]], ipv6: bool) -> None:
    _check(svc, slice_objs, ipv6)


@settings(max_examples=80)
@given(_plausible_service(), st.lists(_plausible_slice(), max_size=3), st.booleans())
def test_plausible_but_odd_objects_never_raise(svc: dict[str, Any], slice_objs: list[dict[str, Any]], ipv6: bool) -> None:
    _check(svc, slice_objs, ipv6)


# -- loadBalancerSourceRanges (conformance row 10) ------------------------------------------------------------

@pytest.mark.parametrize(("ranges", "firewall", "problem"), [
    ([" 10.0.0.0/8", "203.0.113.9/25"], {Key(4, "192.0.2.1", 80): ("10.0.0.0/8", "203.0.113.0/25")}, None),
    (["fd00::/64"], {}, None),  # none of the LB IP's family: no filter, as kube-proxy
    (["10.0.0.0/8", "bogus", 7], {Key(4, "192.0.2.1", 80): ("10.0.0.0/8",)}, "'bogus' is not a CIDR"),
    ("10.0.0.0/8", {}, "not a list"),
    ([], {}, None),
])
def test_source_ranges_filter_the_load_balancer_keys_of_their_family(ranges: Any, firewall: dict[Key, Any],
                                                                        problem: str | None) -> None:
    svc = service(type_="LoadBalancer", ingress=["192.0.2.1"],
                  ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}])
    svc["spec"]["loadBalancerSourceRanges"] = ranges
    res = translate(svc, endpoint_slice(endpoints=[endpoint("10.244.0.5")]))
    assert dict(res.firewall) == firewall  # never the ClusterIP or the NodePort (kube-proxy: NodePorts bypass)
    assert any(problem in p for p in res.problems) if problem else not res.problems
    theirs = service(label=None, type_="LoadBalancer", ingress=["192.0.2.1"])
    theirs["spec"]["loadBalancerSourceRanges"] = ["10.0.0.0/8"]
    assert translate(theirs).firewall == ()  # kube-proxy's to filter


def test_a_range_holding_the_nodes_ip_also_admits_the_load_balancers_own_ip() -> None:
    """kube-proxy: "if we have a node IP in the source ranges, also allow traffic from the LB IPs"."""
    svc = service(type_="LoadBalancer", ingress=["192.0.2.1"],
                  ports=[{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}])
    svc["spec"]["loadBalancerSourceRanges"] = ["10.0.0.0/8"]
    lb = Key(4, "192.0.2.1", 80)
    inside = NodeInfo(NODE, ips=("10.1.2.3", "fd00::3"))
    assert dict(translate(svc, node=inside).firewall) == {lb: ("10.0.0.0/8", "192.0.2.1/32")}
    outside = NodeInfo(NODE, ips=("172.16.0.3",))
    assert dict(translate(svc, node=outside).firewall) == {lb: ("10.0.0.0/8",)}
    assert dict(translate(svc).firewall) == {lb: ("10.0.0.0/8",)}  # node addresses unknown: the ranges alone


def test_node_ips_are_the_first_internal_else_external_address_per_family() -> None:
    from controlplane.controller import node_ips

    node = {"status": {"addresses": [
        {"type": "Hostname", "address": "n1"}, {"type": "ExternalIP", "address": "203.0.113.5"},
        {"type": "InternalIP", "address": "10.1.2.3"}, {"type": "InternalIP", "address": "10.1.2.4"},
        {"type": "ExternalIP", "address": "2001:db8::5"}, {"type": "InternalIP", "address": "not-an-ip"}, "junk"]}}
    assert node_ips(node) == ("10.1.2.3", "2001:db8::5")
    assert node_ips(None) == () and node_ips({"status": {"addresses": "x"}}) == ()
