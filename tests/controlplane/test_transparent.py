"""The transparent listener (--preserve-source-ip, docs/conformance.md row 6): which keys it routes, and the
kernel overlay that sends a key there only once Envoy serves it there (real Stream, no gRPC; the data path
with a real Envoy and real packets is tests/e2e/test_conformance.py)."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.listener.original_src.v3 import original_src_pb2

from controlplane import resources as res
from controlplane.controller import ControlPlane
from controlplane.server import AdsServer
from controlplane.stream import Stream
from controlplane.translate import NodeInfo, project_service, translate_service
from redirector.model import Key
from sandbox.node.traffic import wait_until
from tests.controlplane.factories import NODE, endpoint, endpoint_slice, service
from tests.controlplane.test_controller import envoy_acks_everything, envoy_answers, running

PORTS = [{"name": "tcp", "port": 81, "protocol": "TCP", "nodePort": 30081}]
NODEPORT, EXTERNAL, CLUSTER_IP = Key(4, None, 30081), Key(4, "192.0.2.7", 81), Key(4, "10.96.0.30", 81)
SLICE = endpoint_slice("lb-abc", "lb", ports={"tcp": 8081}, endpoints=[endpoint("10.244.1.5")])


def lb(etp: str = "Local") -> dict[str, object]:
    return service("lb", ips=("10.96.0.30",), type_="NodePort", etp=etp, ports=PORTS, external_ips=("192.0.2.7",))


def test_the_external_keys_of_a_local_policy_are_transparent() -> None:
    node = NodeInfo(NODE, ipv6=False)
    from controlplane.endpoints import project_slice

    local = translate_service(project_service(lb("Local")), [], node)  # endpoints do not decide it
    assert dict(local.transparent) == {NODEPORT: (), EXTERNAL: ()}  # not the ClusterIP: internal traffic
    assert translate_service(project_service(lb("Cluster")), [], node).transparent == ()
    sliced = project_slice(SLICE)
    assert sliced is not None
    # With each key its endpoints: their own connections to it (hairpin) keep the ordinary listener.
    hairpin = dict(translate_service(project_service(lb("Local")), [sliced], node).transparent)
    assert hairpin == {NODEPORT: ("10.244.1.5",), EXTERNAL: ("10.244.1.5",)}


def test_pod_cidrs_are_read_from_the_node_and_odd_values_skipped() -> None:
    from controlplane.controller import pod_cidrs

    assert pod_cidrs({"spec": {"podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64", "nope", 7]}}) == (
        "10.244.1.0/24", "fd00:10:244:1::/64")
    assert pod_cidrs({"spec": {"podCIDR": "10.244.1.1/24"}}) == ("10.244.1.0/24",)  # host bits allowed
    assert pod_cidrs(None) == () and pod_cidrs({"spec": "odd"}) == ()


def test_the_transparent_listener_keeps_the_client_address_on_its_own_port() -> None:
    builder = res.ListenerBuilder(4, 1667, transparent_mark=0x1666)
    listener = builder.listener
    assert listener.name == res.listener_name(4, transparent=True) != res.listener_name(4)
    assert listener.address.socket_address.port_value == 1667
    filters = [f.name for f in listener.listener_filters]
    assert filters == ["envoy.filters.listener.original_dst", "envoy.filters.listener.original_src"]
    config = original_src_pb2.OriginalSrc()
    listener.listener_filters[1].typed_config.Unpack(config)
    assert config.mark == 0x1666  # the proxy mark: never redirected, and its replies are recognised by it
    assert [f.name for f in res.ListenerBuilder(4).listener.listener_filters] == ["envoy.filters.listener.original_dst"]


def _plane() -> tuple[ControlPlane, Stream, list[dict[Key, tuple[str, ...]]]]:
    p = ControlPlane(NodeInfo(NODE, ipv6=False), transparent=(1667, 0x1666))
    server = AdsServer(p.store, expected_node=NODE, on_ack=p.acked)  # never started: no gRPC
    p.attach(server)
    stream = Stream(p.store, expected_node=NODE, on_ack=lambda t, v: p.acked(stream, t, v))
    server.streams.append(stream)
    delivered: list[dict[Key, tuple[str, ...]]] = []
    p.on_blocked = lambda answers: delivered.append(dict(answers.transparent))
    return p, stream, delivered


def _routed(p: ControlPlane) -> set[str]:
    stored = p.store.get(res.LISTENER, res.listener_name(4, transparent=True))
    assert stored is not None
    listener = listener_pb2.Listener.FromString(stored.data)
    return set(listener.filter_chain_matcher.matcher_tree.exact_match_map.map)


def test_a_key_goes_to_the_transparent_listener_only_once_envoy_serves_it_there() -> None:
    p, stream, delivered = _plane()
    with running(p):
        p.services.replace([lb()])
        p.slices.replace([SLICE])
        wait_until(lambda: "30081" in _routed(p) and "81" in _routed(p), timeout=5, what="the transparent listener")
        assert not any(delivered), "sent to the transparent listener before Envoy had it"
        envoy_acks_everything(stream)
        wait_until(lambda: bool(delivered) and delivered[-1] == {NODEPORT: ("10.244.1.5",), EXTERNAL: ("10.244.1.5",)},
                   timeout=5, what="the overlay after Envoy's ACKs, with the endpoint to exempt")
        assert CLUSTER_IP not in delivered[-1]
        # /debug/proxy says, per key, whether the backend sees the client's address or the node's.
        rows = {k["key"]: k.get("client_address") for k in p.report(service="shop/lb")["services"][0]["keys"]}
        assert rows == {str(NODEPORT): "kept", str(EXTERNAL): "kept", str(CLUSTER_IP): "node"}
        # A Cluster policy: out of the overlay at once (the ordinary redirect still serves the keys).
        p.services.upsert(lb("Cluster"))
        wait_until(lambda: delivered[-1] == {}, timeout=5, what="the overlay emptied")
        envoy_answers(stream)
        wait_until(lambda: "30081" not in _routed(p), timeout=5, what="the key off the transparent listener")


def test_an_unlabelled_service_is_prepared_on_the_listener_but_never_in_the_overlay() -> None:
    p, stream, delivered = _plane()
    with running(p):
        p.services.replace([{**lb(), "metadata": {"name": "lb", "namespace": "shop", "resourceVersion": "1", "labels": {}}}])
        p.slices.replace([SLICE])
        wait_until(lambda: "30081" in _routed(p), timeout=5, what="Envoy prepared for a handover")
        envoy_acks_everything(stream)
        assert p.in_sync()
        assert not any(delivered)


def test_the_first_translation_delivers_the_kernel_answers_even_when_there_are_none() -> None:
    """A previous agent's table may hold keys this configuration no longer sends anywhere (a transparent
    listener turned off, a key blocked before the agent restarted): the first full translation rewrites it."""
    p, _stream, delivered = _plane()
    with running(p):
        p.services.replace([service("db", ips=("10.96.0.20",), ports=[{"name": "db", "port": 5432}])])
        p.slices.replace([endpoint_slice("db-abc", "db", ports={"db": 5432}, endpoints=[endpoint("10.244.1.5")])])
        wait_until(lambda: p.first_push_done.is_set() and bool(delivered), timeout=5, what="a first delivery")
    assert delivered[0] == {}



def test_unchanged_answers_are_delivered_again_for_drift_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from controlplane import controller

    monkeypatch.setattr(controller, "ANSWERS_RESYNC", 0.05)
    p, _stream, delivered = _plane()
    with running(p):
        p.services.replace([lb()])
        p.slices.replace([SLICE])
        wait_until(lambda: len(delivered) >= 4, timeout=5, what="periodic deliveries without a change")
    assert all(d == delivered[0] for d in delivered)  # nothing changed: the same answers each time


def test_a_contested_external_ip_takes_its_winners_endpoints() -> None:
    """Two Services claiming the same externalIP:port: the key is the smallest (namespace, name)'s, in the
    kernel index and Envoy alike, so its hairpin exemption is that Service's endpoints, not the loser's."""
    p, stream, delivered = _plane()
    a = service("a", ips=("10.96.0.31",), type_="NodePort", etp="Local", external_ips=("192.0.2.7",),
                ports=[{"name": "tcp", "port": 81, "protocol": "TCP", "nodePort": 30091}])
    b = service("b", ips=("10.96.0.32",), type_="NodePort", etp="Local", external_ips=("192.0.2.7",),
                ports=[{"name": "tcp", "port": 81, "protocol": "TCP", "nodePort": 30092}])
    with running(p):
        p.services.replace([b, a])
        p.slices.replace([endpoint_slice("a-1", "a", ports={"tcp": 8081}, endpoints=[endpoint("10.244.1.5")]),
                          endpoint_slice("b-1", "b", ports={"tcp": 8081}, endpoints=[endpoint("10.244.1.6")])])
        wait_until(lambda: "81" in _routed(p), timeout=5, what="the transparent listener")
        envoy_acks_everything(stream)
        wait_until(lambda: bool(delivered) and EXTERNAL in delivered[-1], timeout=5, what="the overlay")
        assert delivered[-1][EXTERNAL] == ("10.244.1.5",)  # shop/a wins


def test_the_debug_text_shows_the_client_address_column_only_with_the_feature() -> None:
    from redirector.debug.text import proxy_text

    key = {"key": "*local*:30081", "chain": "tcp", "endpoints": 1, "acked": True, "served": True, "refused": None}
    body = {"node": NODE, "streams": [], "services": [{"service": "shop/lb", "keys": [key], "problems": []}]}
    assert "CLIENT ADDRESS" not in proxy_text(body)
    key["client_address"] = "kept"
    text = proxy_text(body)
    assert "CLIENT ADDRESS" in text and "kept" in text.splitlines()[-1]


def test_envoy_down_withdraws_the_overlay_at_once_and_it_comes_back() -> None:
    """The watchdog's switch to the kernel fallback withdraws the overlay synchronously (on the iptables
    backend it precedes the fallback's chains); Envoy serving again brings it back through the worker."""
    p, stream, delivered = _plane()
    with running(p):
        p.services.replace([lb()])
        p.slices.replace([SLICE])
        wait_until(lambda: "30081" in _routed(p), timeout=5, what="the transparent listener")
        envoy_acks_everything(stream)
        wait_until(lambda: bool(delivered) and bool(delivered[-1]), timeout=5, what="the overlay")
        p.set_proxy_down(True)
        assert delivered[-1] == {}  # already, not after the worker's next round
        p.set_proxy_down(False)
        wait_until(lambda: bool(delivered[-1]), timeout=5, what="the overlay again")


def test_only_acks_that_can_change_the_overlay_wake_it() -> None:
    p, _stream, _delivered = _plane()
    p.services.replace([lb()])
    p.slices.replace([SLICE])
    p.sync(["shop/lb"])
    assert p._concerns_overlay(res.LISTENER, {}) and p._concerns_overlay(res.ROUTE, {})
    assert p._concerns_overlay(res.ENDPOINT, {"nodeport4:30081": "v1"})
    assert not p._concerns_overlay(res.ENDPOINT, {"10.96.0.99:80": "v1"})  # another Service's endpoints


def test_a_key_leaves_the_kernel_overlay_before_the_listener_without_it_is_published() -> None:
    p, stream, delivered = _plane()
    events: list[str] = []
    update = p.store.update

    def recording(type_url: str, upserts: Any = {}, removes: Any = ()) -> frozenset[str]:  # noqa: B006
        if type_url == res.LISTENER and res.listener_name(4, transparent=True) in upserts:
            events.append("listener")
        return update(type_url, upserts, removes)

    p.store.update = recording  # type: ignore[method-assign]
    p.on_blocked = lambda answers: (events.append(f"kernel {len(answers.transparent)}"),
                                    delivered.append(dict(answers.transparent)))
    with running(p):
        p.services.replace([lb()])
        p.slices.replace([SLICE])
        wait_until(lambda: "30081" in _routed(p), timeout=5, what="the transparent listener")
        envoy_acks_everything(stream)
        wait_until(lambda: "kernel 2" in events, timeout=5, what="the overlay")
        events.clear()
        p.services.upsert(lb("Cluster"))
        wait_until(lambda: "listener" in events, timeout=5, what="the listener without the keys")
    assert events.index("kernel 0") < events.index("listener"), events
