"""Labelled Services -> redirect entries (pure)."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from redirector.desired import DesiredIndex, desired_state, parse_ip, service_entries
from redirector.model import Key, Owner, UnservedPort, diff
from tests.redirector.factories import service as svc


def keys_of(service: dict[str, Any]) -> set[Key]:
    return {e.key for e in service_entries(service).entries}


def test_cluster_ips_times_tcp_ports_dual_stack() -> None:
    s = svc(cluster_ips=["10.96.0.10", "fd00:10:96::a"], families=["IPv4", "IPv6"],
            ports=[{"name": "http", "port": 80}, {"name": "grpc", "port": 9090, "protocol": "TCP"}])
    result = service_entries(s)
    assert {e.key for e in result.entries} == {
        Key(4, "10.96.0.10", 80), Key(4, "10.96.0.10", 9090), Key(6, "fd00:10:96::a", 80), Key(6, "fd00:10:96::a", 9090)
    }
    assert {(e.kind, e.owner) for e in result.entries if e.key.port == 9090} == {("clusterIP", Owner("shop", "web", "grpc"))}
    assert result.errors == () and result.unserved == ()


def test_only_cluster_ip_without_cluster_ips_list() -> None:
    s = svc()
    del s["spec"]["clusterIPs"]
    assert keys_of(s) == {Key(4, "10.96.0.10", 80)}


def test_external_and_load_balancer_ips_and_node_ports() -> None:
    s = svc(type_="LoadBalancer", families=["IPv4", "IPv6"], cluster_ips=["10.96.0.10", "fd00:10:96::a"],
            ports=[{"name": "http", "port": 80, "nodePort": 30080}],
            external_ips=["192.0.2.7"], ingress=[{"ip": "198.51.100.1"}, {"hostname": "lb.example"}, {"ip": "2001:db8::1"}])
    kinds = {e.key: e.kind for e in service_entries(s).entries}
    assert kinds == {
        Key(4, "10.96.0.10", 80): "clusterIP",
        Key(6, "fd00:10:96::a", 80): "clusterIP",
        Key(4, "192.0.2.7", 80): "externalIP",
        Key(4, "198.51.100.1", 80): "loadBalancer",
        Key(6, "2001:db8::1", 80): "loadBalancer",
        Key(4, None, 30080): "nodePort",
        Key(6, None, 30080): "nodePort",
    }


def test_node_ports_follow_the_service_families() -> None:
    single = svc(type_="NodePort", ports=[{"port": 80, "nodePort": 30080}])  # no ipFamilies: from the ClusterIP
    assert Key(4, None, 30080) in keys_of(single) and Key(6, None, 30080) not in keys_of(single)
    v6 = svc(type_="NodePort", cluster_ips=["fd00:10:96::a"], families=["IPv6"], ports=[{"port": 80, "nodePort": 30080}])
    assert keys_of(v6) == {Key(6, "fd00:10:96::a", 80), Key(6, None, 30080)}
    cluster_ip_type = svc(ports=[{"port": 80, "nodePort": 30080}])  # ClusterIP Services have no NodePort
    assert keys_of(cluster_ip_type) == {Key(4, "10.96.0.10", 80)}
    no_allocation = svc(type_="LoadBalancer", ports=[{"port": 80}])  # allocateLoadBalancerNodePorts: false
    assert keys_of(no_allocation) == {Key(4, "10.96.0.10", 80)}


def test_headless_and_external_name_produce_nothing() -> None:
    headless = svc(cluster_ips=["None"])
    assert service_entries(headless).entries == ()
    external = svc(type_="ExternalName", cluster_ips=[])
    external["spec"]["externalName"] = "db.example"
    assert service_entries(external).entries == ()


def test_udp_and_sctp_ports_are_unserved_and_tcp_ports_still_redirected() -> None:
    s = svc(ports=[{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                   {"name": "sig", "port": 2905, "protocol": "SCTP"}])
    result = service_entries(s)
    assert {e.key for e in result.entries} == {Key(4, "10.96.0.10", 53)}
    assert result.unserved == (UnservedPort(Owner("shop", "web", "dns"), "UDP", 53),
                               UnservedPort(Owner("shop", "web", "sig"), "SCTP", 2905))


def test_a_malformed_ip_is_skipped_with_an_error_for_that_service_only() -> None:
    bad = svc("bad", external_ips=["192.0.2.300", "not-an-ip"], ingress=[{"ip": "fe80::1%eth0"}])
    good = svc("good", cluster_ips=["10.96.0.11"])
    state = desired_state([bad, good])
    assert set(state.entries) == {Key(4, "10.96.0.10", 80), Key(4, "10.96.0.11", 80)}
    assert set(state.errors) == {"shop/bad"}
    assert "192.0.2.300" in state.errors["shop/bad"] and "not-an-ip" in state.errors["shop/bad"]


def test_invalid_ports_are_errors_not_crashes() -> None:
    s = svc(type_="NodePort", ports=[{"name": "a", "port": "eighty"}, {"name": "b", "port": 70000},
                                     {"name": "c", "port": 81, "nodePort": "x"}])
    result = service_entries(s)
    assert {e.key for e in result.entries} == {Key(4, "10.96.0.10", 81)}
    assert len(result.errors) == 3


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20))
def test_never_raises_on_odd_input(junk: Any) -> None:
    for shape in (junk, {"spec": junk}, {"metadata": junk, "spec": {"ports": junk, "clusterIPs": junk}},
                  {"spec": {"type": "NodePort", "clusterIPs": ["10.0.0.1"], "ports": [junk]}, "status": junk}):
        service_entries(shape if isinstance(shape, dict) else {"spec": shape})


def test_ipv6_addresses_are_canonical() -> None:
    assert parse_ip("FD00:0010:0096:0000::000A") == (6, "fd00:10:96::a")
    assert parse_ip("10.96.0.010") is None  # leading zeros are ambiguous: refused, as the apiserver does
    assert keys_of(svc(cluster_ips=["FD00:10:96::A"])) == {Key(6, "fd00:10:96::a", 80)}


def test_duplicate_keys_have_a_deterministic_winner_and_an_error_for_the_loser() -> None:
    a = svc("a", cluster_ips=["10.96.0.10"])
    b = svc("b", cluster_ips=["10.96.0.20"], external_ips=["10.96.0.10"])
    for order in ([a, b], [b, a]):
        state = desired_state(order)
        assert state.entries[Key(4, "10.96.0.10", 80)].owner.name == "a"
        assert set(state.errors) == {"shop/b"} and "shop/a" in state.errors["shop/b"]


def test_index_updates_one_service_and_reports_the_key_delta() -> None:
    index = DesiredIndex()
    a = svc("a", cluster_ips=["10.96.0.10"])
    assert index.upsert(a).add == {Key(4, "10.96.0.10", 80)}
    changed = copy.deepcopy(a)
    changed["spec"]["ports"][0]["port"] = 8080
    delta = index.upsert(changed)
    assert delta.add == {Key(4, "10.96.0.10", 8080)} and delta.delete == {Key(4, "10.96.0.10", 80)}
    assert not index.upsert(copy.deepcopy(changed))  # a no-op edit is no work
    assert index.remove("shop/a").delete == {Key(4, "10.96.0.10", 8080)}
    assert not index.remove("shop/a")
    assert index.keys() == frozenset()


def test_a_key_shared_by_two_services_stays_until_both_are_gone() -> None:
    index = DesiredIndex()
    shared = Key(4, "10.96.0.10", 80)
    index.upsert(svc("a"))
    assert not index.upsert(svc("b"))  # the kernel already has it
    assert shared in index.state().entries and "shop/b" in index.state().errors
    assert not index.remove("shop/a")
    assert index.entry(shared) is not None and index.entry(shared).owner.name == "b"  # type: ignore[union-attr]
    assert index.state().errors == {}
    assert index.remove("shop/b").delete == {shared}


def test_replace_all_removes_services_missing_from_a_relist() -> None:
    index = DesiredIndex()
    index.upsert(svc("a", cluster_ips=["10.96.0.1"]))
    index.upsert(svc("b", cluster_ips=["10.96.0.2"]))
    delta = index.replace_all([svc("b", cluster_ips=["10.96.0.2"]), svc("c", cluster_ips=["10.96.0.3"])])
    assert delta.delete == {Key(4, "10.96.0.1", 80)} and delta.add == {Key(4, "10.96.0.3", 80)}
    assert sorted(index.service_ids()) == ["shop/b", "shop/c"]


addresses = st.sampled_from(["10.96.0.1", "10.96.0.2", "fd00:10:96::1", "192.0.2.1"])
services = st.builds(
    lambda name, ips, ports, node_port: svc(
        name, type_="NodePort" if node_port else "ClusterIP", cluster_ips=ips,
        ports=[{"name": f"p{p}", "port": p, **({"nodePort": 30000 + p} if node_port else {})} for p in ports]),
    st.sampled_from(["a", "b", "c", "d"]), st.lists(addresses, min_size=1, max_size=2, unique=True),
    st.lists(st.sampled_from([80, 443, 8080]), min_size=1, max_size=2, unique=True), st.booleans(),
)
events = st.lists(st.tuples(st.booleans(), services), max_size=25)


@given(events)
def test_incremental_deltas_always_match_a_full_recompute(evts: list[tuple[bool, dict[str, Any]]]) -> None:
    """Applying each event's delta to a 'kernel' set keeps it equal to the desired state computed from scratch."""
    index, kernel, live = DesiredIndex(), set[Key](), dict[str, dict[str, Any]]()
    for delete, service in evts:
        sid = f"shop/{service['metadata']['name']}"
        if delete:
            delta = index.remove(sid)
            live.pop(sid, None)
        else:
            delta = index.upsert(service)
            live[sid] = service
        assert not (delta.add & kernel) and delta.delete <= kernel
        kernel = (kernel - delta.delete) | delta.add
        full = desired_state(live.values())
        assert kernel == set(full.entries)
        assert index.state() == full
        assert not diff(index.keys(), full.keys())


def test_a_type_that_is_a_list_or_a_map_is_no_entry_and_no_crash() -> None:
    from redirector.desired import service_entries

    for odd in (["ClusterIP"], {"a": 1}):
        svc = {"metadata": {"name": "x", "namespace": "n"},
               "spec": {"type": odd, "clusterIP": "10.96.0.1", "ports": [{"port": 80, "protocol": "TCP"}]}}
        assert service_entries(svc).keys == ()


def test_one_object_is_projected_once_for_the_kernel_side_and_the_control_plane() -> None:
    """uid + resourceVersion name an object's content: both consumers of a watch event share one projection
    (issue 11: agent memory); a new version, or an object without them, is projected afresh."""
    s = svc(cluster_ips=["10.96.0.10"], ports=[{"name": "http", "port": 80}])
    s["metadata"].update(uid="u-1", resourceVersion="7")
    first = service_entries(s)
    assert service_entries(copy.deepcopy(s)) is first
    changed = copy.deepcopy(s)
    changed["metadata"]["resourceVersion"] = "8"
    changed["spec"]["ports"][0]["port"] = 81
    assert {e.key for e in service_entries(changed).entries} == {Key(4, "10.96.0.10", 81)}
    bare = copy.deepcopy(s)
    del bare["metadata"]["uid"]
    again = service_entries(bare)
    assert again is not first and again.keys == first.keys
