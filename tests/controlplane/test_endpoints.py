"""endpoints: an EndpointSlice projected, and kube-proxy's choice of endpoints per Service port."""

from __future__ import annotations

from typing import Any

from controlplane import endpoints as eps
from tests.controlplane.factories import NODE, endpoint, endpoint_slice


def view(obj: dict[str, Any]) -> eps.SliceView:
    found = eps.project_slice(obj)
    assert found is not None
    return found


def pick(*objs: dict[str, Any], port: str = "http", family: int = 4, node: str | None = None) -> tuple[eps.Endpoint, ...]:
    return eps.select([view(o) for o in objs], port, family, node=node, local=node is not None)  # type: ignore[arg-type]


def test_projection_keeps_what_the_translation_needs() -> None:
    found = view(endpoint_slice(endpoints=[endpoint("10.0.0.1", NODE)]))
    assert (found.name, found.service, found.family, found.ports) == ("shop/web-abc", "shop/web", 4, (("http", 8080),))
    assert found.endpoints == (eps.EndpointView(("10.0.0.1",), True, True, False, NODE, None),)


def test_slices_without_a_service_or_with_fqdn_addresses_are_dropped() -> None:
    orphan = endpoint_slice()
    del orphan["metadata"]["labels"]
    assert eps.project_slice(orphan) is None
    assert eps.project_slice(endpoint_slice(family="FQDN")) is None


def test_nil_conditions_default_as_the_api_documents() -> None:
    found = view(endpoint_slice(endpoints=[endpoint("10.0.0.1", ready=None), endpoint("10.0.0.2", ready=False)]))
    assert [(e.ready, e.serving, e.terminating) for e in found.endpoints] == [(True, True, False), (False, False, False)]


def test_ready_endpoints_are_chosen() -> None:
    s = endpoint_slice(endpoints=[endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False, serving=False)])
    assert pick(s) == (("10.0.0.1", 8080),)


def test_serving_terminating_fallback_only_when_none_is_ready() -> None:
    draining = endpoint("10.0.0.9", ready=False, serving=True, terminating=True)
    assert pick(endpoint_slice(endpoints=[draining])) == (("10.0.0.9", 8080),)
    assert pick(endpoint_slice(endpoints=[draining, endpoint("10.0.0.1")])) == (("10.0.0.1", 8080),)
    gone = endpoint("10.0.0.8", ready=False, serving=False, terminating=True)
    assert pick(endpoint_slice(endpoints=[gone])) == ()


def test_not_ready_and_not_serving_endpoints_are_ignored() -> None:
    assert pick(endpoint_slice(endpoints=[endpoint("10.0.0.1", ready=False)])) == ()
    # serving but not terminating and not ready: not a fallback either
    assert pick(endpoint_slice(endpoints=[endpoint("10.0.0.1", ready=False, serving=True, terminating=False)])) == ()


def test_local_policy_fallback_is_among_this_nodes_endpoints() -> None:
    s = endpoint_slice(endpoints=[endpoint("10.0.0.1", "node-b"),
                                  endpoint("10.0.0.9", NODE, ready=False, serving=True, terminating=True)])
    assert pick(s, node=NODE) == (("10.0.0.9", 8080),)
    assert pick(s) == (("10.0.0.1", 8080),)
    assert pick(s, node="node-c") == ()


def test_other_protocol_ports_are_ignored() -> None:
    s = endpoint_slice(ports=[("http", 8080, "UDP"), ("dns", 53, "SCTP")], endpoints=[endpoint("10.0.0.1")])
    assert view(s).ports == ()
    assert pick(s) == ()
    missing_protocol = endpoint_slice(endpoints=[endpoint("10.0.0.1")])
    del missing_protocol["ports"][0]["protocol"]  # defaults to TCP
    assert pick(missing_protocol) == (("10.0.0.1", 8080),)


def test_invalid_port_numbers_are_ignored() -> None:
    s = endpoint_slice(ports=[("a", 0, "TCP"), ("b", 65536, "TCP"), ("c", True, "TCP"), ("d", "80", "TCP"), ("e", 1, "TCP")])
    assert view(s).ports == (("e", 1),)


def test_wrong_family_and_invalid_addresses_are_ignored() -> None:
    s = endpoint_slice(endpoints=[endpoint("fd00::1"), endpoint("10.0.0.01"), endpoint("nonsense"), endpoint("10.0.0.2")])
    assert [e.addresses for e in view(s).endpoints] == [("10.0.0.2",)]
    v6 = endpoint_slice(family="IPv6", endpoints=[endpoint("10.0.0.3"), endpoint("FD00:0::1")])
    assert pick(v6, family=6) == (("fd00::1", 8080),)  # canonical text
    assert pick(v6, family=4) == ()  # the slice's family decides


def test_only_the_first_address_of_an_endpoint_is_used() -> None:
    assert pick(endpoint_slice(endpoints=[endpoint("10.0.0.1", more=["10.0.0.2"])])) == (("10.0.0.1", 8080),)


def test_named_ports_are_resolved_per_slice() -> None:
    a = endpoint_slice("web-a", ports={"http": 8080}, endpoints=[endpoint("10.0.0.1")])
    b = endpoint_slice("web-b", ports={"http": 9090}, endpoints=[endpoint("10.0.0.2")])
    assert pick(a, b) == (("10.0.0.1", 8080), ("10.0.0.2", 9090))
    other = endpoint_slice("web-c", ports={"admin": 7070}, endpoints=[endpoint("10.0.0.3")])
    assert pick(a, other) == (("10.0.0.1", 8080),)
    assert pick(a, other, port="admin") == (("10.0.0.3", 7070),)


def test_unnamed_port_matches_the_empty_name() -> None:
    s = endpoint_slice(ports=[("", 8080, "TCP")], endpoints=[endpoint("10.0.0.1")])
    s["ports"][0].pop("name")
    assert pick(s, port="") == (("10.0.0.1", 8080),)


def test_deduplicated_and_sorted() -> None:
    a = endpoint_slice("web-a", endpoints=[endpoint("10.0.0.3"), endpoint("10.0.0.1"), endpoint("10.0.0.2")])
    b = endpoint_slice("web-b", endpoints=[endpoint("10.0.0.1"), endpoint("10.0.0.3")])
    assert pick(a, b) == (("10.0.0.1", 8080), ("10.0.0.2", 8080), ("10.0.0.3", 8080))
    assert pick(b, a) == pick(a, b)


def test_odd_values_inside_a_slice_are_skipped() -> None:
    s = endpoint_slice(endpoints=[endpoint("10.0.0.1")])
    s["endpoints"] += ["not a map", {"addresses": "10.0.0.2"}, {"addresses": [None, 7, "10.0.0.4"], "nodeName": 3,
                                                               "conditions": "ready"}]
    s["ports"].append({"name": ["x"], "port": 81})
    found = view(s)
    assert found.ports == (("http", 8080), ("", 81))
    assert [e.addresses for e in found.endpoints] == [("10.0.0.1",), ("10.0.0.4",)]
    assert found.endpoints[1].node is None and found.endpoints[1].ready is True


def _hinted(ip: str, zones: list[str] | None = None, nodes: list[str] | None = None, **kw: object) -> dict[str, object]:
    ep: dict[str, object] = endpoint(ip, **kw)  # type: ignore[arg-type]
    hints: dict[str, object] = {}
    if zones is not None:
        hints["forZones"] = [{"name": z} for z in zones]
    if nodes is not None:
        hints["forNodes"] = [{"name": n} for n in nodes]
    if hints:
        ep["hints"] = hints
    return ep


def _topo(s: dict[str, object], *, node: str = NODE, zone: str | None = "zone-a") -> tuple[tuple[str, int], ...]:
    return eps.select([view(s)], "http", 4, node=node, zone=zone)  # type: ignore[arg-type]


def test_zone_hints_narrow_to_this_zone_only_when_every_ready_endpoint_has_them() -> None:
    s = endpoint_slice(endpoints=[_hinted("10.0.0.1", ["zone-a"]), _hinted("10.0.0.2", ["zone-b"])])
    assert _topo(s) == (("10.0.0.1", 8080),)
    assert _topo(s, zone=None) == (("10.0.0.1", 8080), ("10.0.0.2", 8080))  # no zone label: all
    assert _topo(s, zone="zone-c") == (("10.0.0.1", 8080), ("10.0.0.2", 8080))  # no hint for us: all
    partial = endpoint_slice(endpoints=[_hinted("10.0.0.1", ["zone-a"]), _hinted("10.0.0.2")])
    assert _topo(partial) == (("10.0.0.1", 8080), ("10.0.0.2", 8080))
    # A not-ready endpoint without hints does not disable them (kube-proxy looks at ready ones only).
    with_unready = endpoint_slice(endpoints=[_hinted("10.0.0.1", ["zone-a"]), _hinted("10.0.0.2", ["zone-b"]),
                                             _hinted("10.0.0.3", ready=False)])
    assert _topo(with_unready) == (("10.0.0.1", 8080),)


def test_node_hints_win_over_zone_hints_when_they_name_this_node() -> None:
    s = endpoint_slice(endpoints=[_hinted("10.0.0.1", ["zone-a"], ["other"]), _hinted("10.0.0.2", ["zone-a"], [NODE])])
    assert _topo(s) == (("10.0.0.2", 8080),)
    assert _topo(s, node="third") == (("10.0.0.1", 8080), ("10.0.0.2", 8080))  # falls back to zone hints
    # A Local traffic policy ignores hints: both endpoints are on this node.
    local = eps.select([view(s)], "http", 4, node=NODE, local=True, zone="zone-a")  # type: ignore[arg-type]
    assert local == (("10.0.0.1", 8080), ("10.0.0.2", 8080))
