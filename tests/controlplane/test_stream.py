"""Stream: the Delta ADS state machine driven by real DeltaDiscoveryRequest messages, no gRPC."""

from __future__ import annotations

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from controlplane.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, version_of
from controlplane.store import Store
from controlplane.stream import Stream, StreamError
from tests.controlplane.factories import NODE, contents, request

Response = discovery_pb2.DeltaDiscoveryResponse


class Envoy:
    """One stream plus what its callbacks heard."""

    def __init__(self, store: Store | None = None, **kw: object) -> None:
        self.store = store or Store()
        self.acks: list[tuple[str, dict[str, str | None]]] = []
        self.nacks: list[tuple[str, list[str], str]] = []
        self.stream = Stream(self.store, expected_node=NODE, on_ack=lambda t, v: self.acks.append((t, v)),
                             on_nack=lambda t, n, m: self.nacks.append((t, n, m)), **kw)  # type: ignore[arg-type]
        self.store.subscribe(self.stream.changed)

    def send(self, type_url: str, **kw: object) -> None:
        self.stream.handle(request(type_url, **kw))  # type: ignore[arg-type]

    def out(self) -> dict[str, Response]:
        responses = self.stream.responses()
        by_type = {r.type_url: r for r in responses}
        assert len(by_type) == len(responses), "at most one response per type at a time"
        return by_type

    def ack(self, response: Response, **kw: object) -> None:
        self.send(response.type_url, nonce=response.nonce, **kw)

    def nack(self, response: Response, error: str = "refused") -> None:
        self.send(response.type_url, nonce=response.nonce, error=error)

    def state(self, type_url: str):  # noqa: ANN201 - TypeState
        return self.stream.types[type_url]


def v(data: bytes) -> str:
    return version_of(data)


def open_lds(envoy: Envoy) -> None:
    """Envoy's (empty) listener subscription, answered and ACKed: in_sync needs both wildcard types."""
    envoy.send(LISTENER)
    envoy.ack(envoy.out()[LISTENER])


# -- node id ------------------------------------------------------------------------------------------------

def test_first_request_without_a_node_id_ends_the_stream() -> None:
    envoy = Envoy()
    with pytest.raises(StreamError, match="no node id"):
        envoy.send(CLUSTER, node=None)
    with pytest.raises(StreamError, match="no node id"):
        envoy.send(CLUSTER, node="")
    assert envoy.stream.node_id is None and envoy.stream.responses() == []


def test_another_nodes_envoy_is_refused() -> None:
    envoy = Envoy()
    with pytest.raises(StreamError, match="'node-b' is not this node"):
        envoy.send(CLUSTER, node="node-b")
    assert envoy.stream.responses() == []


def test_node_id_only_on_the_first_request() -> None:
    envoy = Envoy()
    envoy.send(CLUSTER)
    envoy.send(LISTENER, node=None)  # set_node_on_first_message_only
    assert envoy.stream.node_id == NODE
    assert set(envoy.out()) == {CLUSTER}


def test_without_an_expected_node_any_id_is_accepted() -> None:
    stream = Stream(Store())
    stream.handle(request(CLUSTER, node="whoever"))
    assert stream.node_id == "whoever"


def test_unknown_type_urls_are_a_warning() -> None:
    envoy = Envoy()
    envoy.send("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret")
    assert "unknown type URL" in envoy.stream.warnings[0]
    assert envoy.out() == {}


# -- the first answer ----------------------------------------------------------------------------------------

def test_initial_wildcard_cds_request_is_answered_even_when_empty() -> None:
    envoy = Envoy()
    assert envoy.stream.responses() == []  # nothing asked yet
    envoy.send(CLUSTER)
    response = envoy.out()[CLUSTER]
    assert contents(response) == ({}, []) and response.nonce
    envoy.ack(response)
    assert envoy.out() == {} and envoy.state(CLUSTER).inflight is None


def test_initial_request_sends_everything_of_a_wildcard_type() -> None:
    envoy = Envoy()
    envoy.store.update(CLUSTER, {"a": b"1", "b": b"2"})
    envoy.send(CLUSTER)
    response = envoy.out()[CLUSTER]
    assert contents(response) == ({"a": v(b"1"), "b": v(b"2")}, [])
    assert response.system_version_info == str(envoy.store.revision)
    assert {r.name: r.resource.value for r in response.resources} == {"a": b"1", "b": b"2"}
    assert {r.resource.type_url for r in response.resources} == {CLUSTER}  # the store keeps bytes only


# -- warming order --------------------------------------------------------------------------------------------

def test_no_listener_while_a_cluster_update_is_in_flight() -> None:
    envoy = Envoy()
    envoy.store.update(CLUSTER, {"c": b"1"})
    envoy.store.update(LISTENER, {"l": b"1"})
    envoy.store.update(ROUTE, {"r": b"1"})
    envoy.send(CLUSTER)
    envoy.send(LISTENER)
    first = envoy.out()
    assert set(first) == {CLUSTER}
    envoy.send(ROUTE, subscribe=["r"])
    assert envoy.out() == {}  # routes wait too
    envoy.ack(first[CLUSTER])
    second = envoy.out()
    assert set(second) == {LISTENER, ROUTE}
    assert contents(second[LISTENER]) == ({"l": v(b"1")}, [])
    # a cluster change while the listener is in flight goes out at once (clusters never wait for listeners)
    envoy.store.update(CLUSTER, {"c": b"2"})
    assert set(envoy.out()) == {CLUSTER}


def test_one_response_in_flight_per_type() -> None:
    envoy = Envoy()
    envoy.send(CLUSTER)
    first = envoy.out()[CLUSTER]
    envoy.store.update(CLUSTER, {"a": b"1"})
    assert envoy.out() == {}  # waits for the ACK
    envoy.send(CLUSTER, nonce="stale-nonce")  # not the one in flight: no ACK
    assert envoy.out() == {}
    envoy.ack(first)
    assert contents(envoy.out()[CLUSTER]) == ({"a": v(b"1")}, [])


# -- ACK / NACK ------------------------------------------------------------------------------------------------

def test_ack_moves_versions_to_acked_and_tells_on_ack() -> None:
    envoy = Envoy()
    envoy.store.update(CLUSTER, {"a": b"1", "b": b"2"})
    envoy.send(CLUSTER)
    response = envoy.out()[CLUSTER]
    assert envoy.state(CLUSTER).acked == {} and envoy.acks == []
    envoy.ack(response)
    assert envoy.state(CLUSTER).acked == {"a": v(b"1"), "b": v(b"2")}
    assert envoy.acks == [(CLUSTER, {"a": v(b"1"), "b": v(b"2")})]
    envoy.store.update(CLUSTER, removes=["a"])
    removal = envoy.out()[CLUSTER]
    assert contents(removal) == ({}, ["a"])
    envoy.ack(removal)
    assert envoy.state(CLUSTER).acked == {"b": v(b"2")}
    assert envoy.acks[-1] == (CLUSTER, {"a": None})
    assert envoy.state(CLUSTER).acks == 2


def test_a_nacked_batch_is_probed_one_by_one_and_only_the_refused_resource_is_recorded() -> None:
    envoy = Envoy()
    envoy.store.update(CLUSTER, {"a": b"1", "b": b"bad", "c": b"3"})
    envoy.send(CLUSTER)
    batch = envoy.out()[CLUSTER]
    assert len(batch.resources) == 3
    envoy.nack(batch, "cluster b: invalid")
    assert envoy.nacks == [(CLUSTER, ["a", "b", "c"], "cluster b: invalid")]
    assert envoy.state(CLUSTER).nacked == {}  # not known yet which one
    probed = []
    while (out := envoy.out()).get(CLUSTER) is not None:
        response = out[CLUSTER]
        assert len(response.resources) == 1
        name = response.resources[0].name
        probed.append(name)
        if name == "b":
            envoy.nack(response, "cluster b: invalid")
        else:
            envoy.ack(response)
    assert probed == ["a", "b", "c"]
    state = envoy.state(CLUSTER)
    assert state.nacked == {"b": (v(b"bad"), "cluster b: invalid")}
    assert state.acked == {"a": v(b"1"), "c": v(b"3")}
    open_lds(envoy)
    assert envoy.stream.in_sync()  # refused resources aside
    # the refused version is not sent again ...
    envoy.store.update(CLUSTER, {"b": b"bad", "a": b"1"})
    assert envoy.out() == {}
    # ... a new one is, and its ACK clears the refusal
    envoy.store.update(CLUSTER, {"b": b"good"})
    fixed = envoy.out()[CLUSTER]
    assert contents(fixed) == ({"b": v(b"good")}, [])
    envoy.ack(fixed)
    assert state.nacked == {} and state.acked["b"] == v(b"good")


def test_a_nacked_single_resource_is_recorded_at_once_and_the_previous_version_kept() -> None:
    envoy = Envoy()
    envoy.store.update(CLUSTER, {"a": b"1"})
    envoy.send(CLUSTER)
    envoy.ack(envoy.out()[CLUSTER])
    envoy.store.update(CLUSTER, {"a": b"2"})
    envoy.nack(envoy.out()[CLUSTER], "no")
    state = envoy.state(CLUSTER)
    assert state.nacked == {"a": (v(b"2"), "no")} and state.acked == {"a": v(b"1")} and state.sent == {"a": v(b"1")}
    assert (state.nacks, state.last_error) == (1, "no")
    assert envoy.out() == {}
    open_lds(envoy)
    assert envoy.stream.in_sync()  # the refused version aside
    envoy.store.update(CLUSTER, {"a": b"1"})  # back to what Envoy holds: nothing to send
    assert envoy.out() == {}
    assert envoy.stream.in_sync()


def test_probes_skip_resources_that_vanished_meanwhile() -> None:
    envoy = Envoy()
    envoy.store.update(CLUSTER, {"a": b"1", "b": b"2", "c": b"3"})
    envoy.send(CLUSTER)
    envoy.nack(envoy.out()[CLUSTER])
    envoy.store.update(CLUSTER, removes=["a", "b"])
    response = envoy.out()[CLUSTER]  # straight to the one still there: no idle round per vanished name
    assert contents(response) == ({"c": v(b"3")}, [])
    envoy.ack(response)
    assert envoy.out() == {}
    open_lds(envoy)
    assert envoy.stream.in_sync()


# -- removals and warming --------------------------------------------------------------------------------------

def synced(envoy: Envoy) -> None:
    """Open CDS and LDS and ACK everything until nothing is left to send."""
    envoy.send(CLUSTER)
    envoy.send(LISTENER)
    for _ in range(10):
        out = envoy.out()
        if not out:
            return
        for response in out.values():
            envoy.ack(response)
    raise AssertionError("still sending after 10 rounds")


def test_cluster_removal_waits_while_the_listener_is_busy() -> None:
    envoy = Envoy()
    envoy.store.update(CLUSTER, {"c1": b"1", "c2": b"2"})
    envoy.store.update(LISTENER, {"l": b"with c1 and c2"})
    synced(envoy)
    envoy.store.update(LISTENER, {"l": b"with c2"})  # as the controller does: listener first, then removals
    envoy.store.update(CLUSTER, removes=["c1"])
    out = envoy.out()
    assert set(out) == {LISTENER}  # the cluster removal is held
    assert "c1" in envoy.state(CLUSTER).sent and not envoy.stream.in_sync()
    assert envoy.out() == {}  # still held while the listener is in flight
    envoy.ack(out[LISTENER])
    removal = envoy.out()[CLUSTER]
    assert contents(removal) == ({}, ["c1"])
    envoy.ack(removal)
    assert envoy.stream.in_sync() and envoy.state(CLUSTER).acked == {"c2": v(b"2")}


def test_cluster_updates_are_not_held_with_removals() -> None:
    envoy = Envoy()
    envoy.store.update(CLUSTER, {"c1": b"1"})
    envoy.store.update(LISTENER, {"l": b"1"})
    synced(envoy)
    envoy.store.update(LISTENER, {"l": b"2"})
    envoy.store.update(CLUSTER, {"c2": b"2"}, removes=["c1"])
    out = envoy.out()
    assert contents(out[CLUSTER]) == ({"c2": v(b"2")}, [])  # the new cluster goes, its removal partner waits
    assert LISTENER not in out


# -- EDS: names Envoy asks for --------------------------------------------------------------------------------

def test_eds_sends_only_subscribed_names_and_unsubscribe_forgets() -> None:
    envoy = Envoy()
    envoy.store.update(ENDPOINT, {"a": b"1", "b": b"2"})
    envoy.send(ENDPOINT, subscribe=["a", "missing"])
    response = envoy.out()[ENDPOINT]
    assert contents(response) == ({"a": v(b"1")}, [])
    envoy.ack(response)
    envoy.store.update(ENDPOINT, {"b": b"3"})  # not subscribed: nothing
    assert envoy.out() == {}
    envoy.store.update(ENDPOINT, {"missing": b"4"})  # subscribed before it existed
    late = envoy.out()[ENDPOINT]
    assert contents(late) == ({"missing": v(b"4")}, [])
    envoy.ack(late, unsubscribe=["a"])
    state = envoy.state(ENDPOINT)
    assert "a" not in state.sent and "a" not in state.acked and state.subscribed == {"missing"}
    envoy.store.update(ENDPOINT, {"a": b"5"})
    assert envoy.out() == {}
    envoy.send(ENDPOINT, subscribe=["a"])  # subscribing again sends the current version
    assert contents(envoy.out()[ENDPOINT]) == ({"a": v(b"5")}, [])


def test_eds_removal_of_a_subscribed_name() -> None:
    envoy = Envoy()
    envoy.store.update(ENDPOINT, {"a": b"1"})
    envoy.send(ENDPOINT, subscribe=["a"])
    envoy.ack(envoy.out()[ENDPOINT])
    envoy.store.update(ENDPOINT, removes=["a"])
    assert contents(envoy.out()[ENDPOINT]) == ({}, ["a"])


def test_eds_wildcard_star_adds_nothing() -> None:
    envoy = Envoy()
    envoy.store.update(ENDPOINT, {"a": b"1"})
    envoy.send(ENDPOINT, subscribe=["*"])
    assert contents(envoy.out()[ENDPOINT]) == ({}, [])


# -- reconnecting with what Envoy holds -----------------------------------------------------------------------

def test_initial_versions_matching_the_store_mean_nothing_is_resent() -> None:
    store = Store()
    store.update(CLUSTER, {"a": b"1", "b": b"2"})
    store.update(ENDPOINT, {"a": b"e1"})
    envoy = Envoy(store)
    envoy.send(CLUSTER, initial={"a": v(b"1"), "b": v(b"2")})
    assert envoy.state(CLUSTER).acked == {"a": v(b"1"), "b": v(b"2")}
    assert envoy.acks == [(CLUSTER, {"a": v(b"1"), "b": v(b"2")})]  # the gate hears what Envoy already serves
    response = envoy.out()[CLUSTER]
    assert contents(response) == ({}, [])  # the answer Envoy waits for, with nothing in it
    envoy.ack(response)
    envoy.send(ENDPOINT, subscribe=["a"], initial={"a": v(b"e1")})
    assert contents(envoy.out()[ENDPOINT]) == ({}, [])


def test_initial_versions_that_differ_or_are_gone_are_corrected() -> None:
    store = Store()
    store.update(CLUSTER, {"a": b"1", "b": b"2"})
    envoy = Envoy(store)
    envoy.send(CLUSTER, initial={"a": v(b"1"), "b": "old", "zombie": "v0"})
    assert envoy.state(CLUSTER).acked == {"a": v(b"1")}
    assert contents(envoy.out()[CLUSTER]) == ({"b": v(b"2")}, ["zombie"])


# -- in_sync -------------------------------------------------------------------------------------------------

def test_in_sync_needs_cds_and_lds_opened_and_everything_acked() -> None:
    envoy = Envoy()
    envoy.store.update(CLUSTER, {"c": b"1"})
    envoy.store.update(LISTENER, {"l": b"1"})
    assert not envoy.stream.in_sync()  # nothing opened
    envoy.send(CLUSTER)
    assert not envoy.stream.in_sync()  # LDS not opened, CDS answer due
    first = envoy.out()[CLUSTER]
    assert not envoy.stream.in_sync()  # in flight
    envoy.ack(first)
    envoy.send(LISTENER)
    assert not envoy.stream.in_sync()
    envoy.ack(envoy.out()[LISTENER])
    assert envoy.stream.in_sync()  # EDS and RDS never opened: nothing asked, nothing owed
    envoy.store.update(LISTENER, {"l": b"2"})
    assert not envoy.stream.in_sync()  # a change not yet sent
    envoy.ack(envoy.out()[LISTENER])
    assert envoy.stream.in_sync()
    summary = envoy.stream.summary()
    assert summary["in_sync"] is True and summary["node"] == NODE
    assert summary["types"]["lds"]["acked"] == 1  # type: ignore[index]


def test_latency_is_measured_from_response_to_ack() -> None:
    now = [100.0]
    envoy = Envoy(clock=lambda: now[0])
    envoy.send(CLUSTER)
    response = envoy.out()[CLUSTER]
    now[0] = 100.25
    envoy.ack(response)
    assert list(envoy.stream.latencies) == [0.25]


# -- on-demand clusters -------------------------------------------------------------------------------------

def test_on_demand_cds_sends_only_the_clusters_envoy_asks_for() -> None:
    store = Store()
    store.update(CLUSTER, {"10.96.0.10:80": b"web", "10.96.0.20:5432": b"db"})
    envoy = Envoy(store, on_demand=True)
    envoy.send(CLUSTER)  # the bootstrap's wildcard request: answered, with nothing
    first = envoy.out()[CLUSTER]
    assert contents(first) == ({}, [])
    envoy.ack(first)
    envoy.send(CLUSTER, subscribe=["10.96.0.10:80", "*"])  # a connection needs web ("*" is no name)
    asked = envoy.out()[CLUSTER]
    assert contents(asked) == ({"10.96.0.10:80": v(b"web")}, [])
    envoy.ack(asked)
    assert envoy.state(CLUSTER).acked == {"10.96.0.10:80": v(b"web")}
    store.update(CLUSTER, {"10.96.0.20:5432": b"db2"})  # not asked for: nothing to send
    assert envoy.out() == {}
    store.update(CLUSTER, {"10.96.0.10:80": b"web2"})  # held: its new version goes out
    assert contents(envoy.out()[CLUSTER]) == ({"10.96.0.10:80": v(b"web2")}, [])


def test_on_demand_cds_answers_an_unknown_name_with_its_removal_at_once() -> None:
    envoy = Envoy(on_demand=True)
    envoy.send(CLUSTER)
    envoy.ack(envoy.out()[CLUSTER])
    envoy.send(CLUSTER, subscribe=["10.96.0.99:80"])  # a Service deleted a moment ago
    gone = envoy.out()[CLUSTER]
    assert contents(gone) == ({}, ["10.96.0.99:80"])  # Envoy fails the connection now, not at its timeout
    envoy.ack(gone)
    assert envoy.out() == {}
    envoy.store.update(CLUSTER, {"10.96.0.99:80": b"back"})  # still subscribed: it comes when it exists
    assert contents(envoy.out()[CLUSTER]) == ({"10.96.0.99:80": v(b"back")}, [])


def test_eager_cds_ignores_names_and_sends_everything() -> None:
    store = Store()
    store.update(CLUSTER, {"10.96.0.10:80": b"web"})
    envoy = Envoy(store)
    envoy.send(CLUSTER, subscribe=["10.96.0.99:80"])
    assert contents(envoy.out()[CLUSTER]) == ({"10.96.0.10:80": v(b"web")}, [])
