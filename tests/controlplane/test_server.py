"""server: the optional TCP listener is loopback only; a stream waits for the first full translation."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.server import check_loopback
from tests.support.polling import wait_for


@pytest.mark.parametrize("address", ["127.0.0.1:18000", "[::1]:18000", "127.0.0.2:18000"])
def test_loopback_addresses_are_accepted(address: str) -> None:
    check_loopback(address)


@pytest.mark.parametrize("address", ["0.0.0.0:18000", "[::]:18000", "10.0.0.5:18000", "192.168.1.1:18000",
                                     "[fd00::1]:18000"])
def test_routable_addresses_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="not loopback"):
        check_loopback(address)


@pytest.mark.parametrize("address", ["localhost:18000", "xds.example:18000", "", "18000"])
def test_names_and_garbage_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="loopback IP:port"):
        check_loopback(address)


def test_a_restarted_agent_answers_a_running_envoy_only_once_its_store_is_built(tmp_path: Path) -> None:
    """Envoy reconnecting to a new agent says what it holds (initial_resource_versions). Until the new agent's
    first full translation is in its store, the stream waits: answered from a half-built store it would tell
    Envoy to remove everything it serves (found under load in CI: 503s and refused connections while the
    agent restarted). Real gRPC over the unix socket, the generated Envoy API."""
    import queue
    import threading

    import grpc
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    from controlplane.resources import CLUSTER, version_of
    from controlplane.server import AdsServer
    from controlplane.store import Store

    body = cluster_pb2.Cluster(name="shop_web_80").SerializeToString()
    store, ready = Store(), threading.Event()
    server = AdsServer(store, expected_node="n1", ready=ready).start(socket_path=tmp_path / "xds.sock")
    channel = grpc.insecure_channel(f"unix:{tmp_path / 'xds.sock'}")
    requests: queue.Queue[discovery_pb2.DeltaDiscoveryRequest | None] = queue.Queue()
    first = discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER, initial_resource_versions={"shop_web_80": version_of(body)})
    first.node.id = "n1"
    requests.put(first)
    responses = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources(iter(requests.get, None))
    try:
        # the stream reached the server, which holds it
        wait_for(lambda: server.waiting == 1, "the stream to be held", interval=0.01)
        store.update(CLUSTER, {"shop_web_80": body})  # the new agent's first translation...
        ready.set()  # ...done
        answer = next(responses)
        assert "shop_web_80" not in answer.removed_resources and not answer.resources  # Envoy has it already
    finally:
        requests.put(None)
        channel.close()
        server.stop()
